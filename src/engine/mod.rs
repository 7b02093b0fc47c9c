//! The protocol's decisions, free of I/O: one verification pipeline and a state machine per role.
//!
//! The shell (`node`) reads raw mail, hands it to [`verify::open`] with a keyring over its state, and
//! gives the [`verify::Verified`] message to the role's engine ([`owner`], [`recipient`]) together with
//! a read-only view of the state and the time. The engine answers with an outcome: a refusal, which
//! changes nothing, or a plan with the effects the shell applies, in order, in the one database
//! transaction that also queues the mail the step sends.
//!
//! # Invariants
//! - Nothing under `engine` opens a file, a socket or a database, reads the clock or draws random bytes:
//!   the time comes in as `now`, randomness through [`Entropy`], state through the view traits.
//! - A refused message yields no effect: refusals are outcomes without effects by construction.

pub mod owner;
pub mod recipient;
pub mod verify;

#[cfg(test)]
mod tests;

/// Where the engine gets random bytes: the system's generator in the shell, a seeded one in tests.
pub trait Entropy {
    /// Fills `buf` with random bytes.
    fn fill(&mut self, buf: &mut [u8]);

    /// `n` random bytes as lowercase hex (reply ids).
    fn hex_id(&mut self, n: usize) -> String {
        let mut buf = vec![0; n];
        self.fill(&mut buf);
        crate::crypto::hex(&buf)
    }
}

/// A deterministic generator for tests and reproducible fixtures: BLAKE3 in extendable-output mode
/// over a seed. Never for keys or nonces in production.
#[derive(Debug, Clone)]
pub struct SeededEntropy(blake3::OutputReader);

impl SeededEntropy {
    /// A generator that yields the same bytes for the same seed.
    pub fn new(seed: u64) -> SeededEntropy {
        let mut h = blake3::Hasher::new_derive_key("mailferry seeded entropy v1");
        h.update(&seed.to_le_bytes());
        SeededEntropy(h.finalize_xof())
    }
}

impl Entropy for SeededEntropy {
    fn fill(&mut self, buf: &mut [u8]) {
        self.0.fill(buf);
    }
}
