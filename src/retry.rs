//! Capped exponential backoff with jitter, for the daemons' retries and the IMAP reconnect loop.
//!
//! The delay ceiling doubles from one second to five minutes; each delay takes up to half of its ceiling
//! off at random ("equal jitter"), so after an outage a fleet of nodes does not retry in lockstep, while
//! no node retries sooner than half the ceiling. The randomness is a parameter, so the callers' tests
//! choose it (the daemon loop's [`crate::node::run::RunConfig::random`]); [`random_unit`] is the
//! operating system's.
//!
//! It is written here rather than taken from `backon`: that crate's jitter adds up to a whole delay on top
//! (a capped delay of five minutes becomes up to ten) and draws from its own generator, which a test under
//! `tokio::time::pause` cannot steer; what is needed is twenty lines.

use std::time::Duration;

/// Capped exponential backoff: [`Backoff::MIN`] after the first failure, doubling up to [`Backoff::MAX`],
/// back to the start after a success.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// The first delay ceiling: one second.
    pub const MIN: Duration = Duration::from_secs(1);
    /// The highest delay ceiling: five minutes.
    pub const MAX: Duration = Duration::from_secs(300);

    /// Starts at `min` and doubles up to `max`.
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff { min, max, next: min }
    }

    /// The ceiling of the next delay, without jitter; the ceiling after it doubles.
    pub fn failed(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }

    /// The next delay: [`Backoff::failed`] with [`jitter`] from `random` (a number in [0, 1)).
    pub fn failed_with(&mut self, random: f64) -> Duration {
        jitter(self.failed(), random)
    }

    /// Back to the first delay, after a success.
    pub fn reset(&mut self) {
        self.next = self.min;
    }
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff::new(Backoff::MIN, Backoff::MAX)
    }
}

/// `ceiling` less up to half of it: `random` (in [0, 1), clamped) 0 gives `ceiling`, near 1 gives half.
pub fn jitter(ceiling: Duration, random: f64) -> Duration {
    ceiling.mul_f64(1.0 - random.clamp(0.0, 1.0) / 2.0)
}

/// A uniformly distributed number in [0, 1) from the operating system (0 if it has none to give).
pub fn random_unit() -> f64 {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).unwrap_or_default();
    (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jittered_delays_stay_between_half_the_ceiling_and_the_ceiling() {
        let mut b = Backoff::default();
        let ceilings = [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300];
        for (i, c) in ceilings.iter().enumerate() {
            let r = [0.0, 0.3, 0.999_999][i % 3];
            let d = b.failed_with(r).as_secs_f64();
            let c = *c as f64;
            assert!((c / 2.0..=c).contains(&d), "delay {d} for ceiling {c}");
        }
        assert_eq!(jitter(Duration::from_secs(300), 0.0), Duration::from_secs(300));
        assert_eq!(jitter(Duration::from_secs(300), 0.5), Duration::from_secs(225));
        assert!(jitter(Duration::from_secs(300), 0.999_999) > Duration::from_secs(150));
        // Out-of-range randomness cannot make a delay longer than the ceiling or shorter than half.
        assert_eq!(jitter(Duration::from_secs(10), -1.0), Duration::from_secs(10));
        assert_eq!(jitter(Duration::from_secs(10), 7.0), Duration::from_secs(5));
    }

    #[test]
    fn the_operating_system_gives_numbers_in_the_unit_interval_that_differ() {
        let draws: Vec<f64> = (0..32).map(|_| random_unit()).collect();
        assert!(draws.iter().all(|r| (0.0..1.0).contains(r)));
        assert!(draws.windows(2).any(|w| w[0] != w[1]), "{draws:?}");
    }
}
