//! The daemon loop behind `owner run` and `recipient run`: one step at a time under the state lock, a wait
//! for news in between (IMAP IDLE or polling for the mail transport, a sleep for a spool), capped
//! exponential backoff after a failure, staleness notices and summaries of refused messages.
//!
//! It knows nothing about the command line, signals or exit codes. The caller injects the shutdown
//! future (the binary's is SIGINT or SIGTERM), the randomness of the request jitter, and what to do
//! with a step's [`RunReport`]. Time is tokio's, so the tests run the loop under `tokio::time::pause`.
//!
//! # Invariants
//! - The shutdown future is polled only while the loop waits between steps, so a step in progress (an
//!   apply, a reply being written, a message being filed) always finishes; a shutdown that comes during a
//!   step ends the next wait at once.
//! - The state lock is held for one step only ([`Owner::open`] and [`Recipient::open`] take it, and the
//!   node is dropped at the end of the step), so one-shot commands such as `owner publish` work while a
//!   daemon runs.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::time::Duration;

use anyhow::Result;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::config::{OwnerConfig, RecipientConfig};
use crate::db::Db;
use crate::node::owner::Owner;
use crate::node::recipient::{self, Recipient};
use crate::node::{self, Outbox, Role as _, RunReport};
use crate::transport::{AnyTransport, ReceiveMode, Transport, TransportError, Wake};

/// A transport a daemon can wait on between steps.
#[allow(async_fn_in_trait)]
pub trait Listen: Transport {
    /// Waits until new mail may have arrived, at most `max`.
    ///
    /// # Errors
    /// The mail server could not be reached again before `max` passed, or refused the login.
    async fn wait_for_mail(&mut self, max: Duration) -> Result<Wake, TransportError>;

    /// How new mail is noticed; `None` while it is not known yet.
    fn receive_mode(&self) -> Option<ReceiveMode>;

    /// Whether new mail is reported by a server rather than found by looking at a spool.
    fn is_mail(&self) -> bool;

    /// Closes server connections politely.
    async fn close(&mut self);
}

impl Listen for AnyTransport {
    async fn wait_for_mail(&mut self, max: Duration) -> Result<Wake, TransportError> {
        AnyTransport::wait_for_mail(self, max).await
    }

    fn receive_mode(&self) -> Option<ReceiveMode> {
        AnyTransport::receive_mode(self)
    }

    fn is_mail(&self) -> bool {
        AnyTransport::is_mail(self)
    }

    async fn close(&mut self) {
        AnyTransport::close(self).await;
    }
}

/// Where a node's summaries of refused messages go.
#[derive(Debug, Clone)]
pub struct Admin<'a> {
    /// The node's own address, the summary's sender.
    pub from: &'a str,
    /// The admin address; no summaries without one.
    pub to: Option<&'a str>,
    /// How the summary names the node (`owner ADDR`, `recipient NAME`).
    pub node: String,
}

impl Admin<'_> {
    /// The owner's: from its address, named by it.
    pub fn owner(cfg: &OwnerConfig) -> Admin<'_> {
        let o = &cfg.owner;
        Admin { from: &o.address, to: o.admin_address.as_deref(), node: format!("owner {}", o.address) }
    }

    /// A recipient's: from its address, named by its name.
    pub fn recipient(cfg: &RecipientConfig) -> Admin<'_> {
        let r = &cfg.recipient;
        Admin { from: &r.address, to: r.admin_address.as_deref(), node: format!("recipient {}", r.name) }
    }
}

/// What one step of a daemon did.
#[derive(Debug)]
pub struct Step {
    /// The run's report, or why it failed (retried after a backoff).
    pub res: Result<RunReport>,
    /// When a request was due but an unanswered one held it back: when that one times out (Unix seconds).
    pub blocked_until: Option<u64>,
}

/// What the loop needs from a role. [`OwnerDaemon`] and [`RecipientDaemon`] are the two real ones.
#[allow(async_fn_in_trait)]
pub trait Daemon {
    /// How often the node runs even when no mail arrives; for a node that [requests](Daemon::requests),
    /// how often it asks.
    fn interval(&self) -> Duration;

    /// The state directory; the loop keeps its own connection to its `state.db` for what it records
    /// between steps.
    fn state_dir(&self) -> &Path;

    /// Where summaries of refused messages go.
    fn admin(&self) -> Admin<'_>;

    /// Whether the node sends requests of its own: the loop then also wakes up when one is due.
    fn requests(&self) -> bool {
        false
    }

    /// The longest wait on a spool, which reports nothing by itself; `None` waits for the whole interval.
    fn spool_wait(&self) -> Option<Duration> {
        None
    }

    /// Runs before a step, at most once an interval, with the loop's database (the recipient's staleness
    /// warning; a notice it queues is sent by the step after it).
    ///
    /// # Errors
    /// State failures, which end the daemon.
    fn every_interval(&mut self, db: &Db) -> Result<()> {
        let _ = db;
        Ok(())
    }

    /// Runs after each step with the loop's database: queues the owner's fleet alert when one is due
    /// ([`crate::fleet::queue_alerts`]). Returns whether one was queued (the loop then sends it at once).
    ///
    /// # Errors
    /// State failures, which end the daemon.
    fn alerts(&self, db: &Db) -> Result<bool> {
        let _ = db;
        Ok(false)
    }

    /// Whether a successful step's report is worth showing.
    fn worth_showing(&self, report: &RunReport) -> bool;

    /// One step, holding the state lock while it runs; `request`: a request is due.
    ///
    /// # Errors
    /// A failure that ends the daemon; a failed step is [`Step::res`] instead, retried after a backoff.
    async fn step<T: Transport>(&mut self, transport: &mut T, request: bool) -> Result<Step>;
}

pub use crate::retry::Backoff;

/// How the loop runs, apart from the role.
pub struct RunConfig {
    /// The delays between retries of failed steps.
    pub backoff: Backoff,
    /// A number in [0, 1): a request is sent `interval` plus up to 10% of it after the last, and a retry
    /// waits its backoff delay less up to half of it ([`crate::retry::jitter`]), so that a fleet does not
    /// ask, or retry after an outage, all at once. [`RunConfig::default`] takes it from the operating
    /// system.
    pub random: Box<dyn FnMut() -> f64>,
}

impl Default for RunConfig {
    fn default() -> RunConfig {
        RunConfig { backoff: Backoff::default(), random: Box::new(crate::retry::random_unit) }
    }
}

impl std::fmt::Debug for RunConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunConfig").field("backoff", &self.backoff).finish_non_exhaustive()
    }
}

/// Runs `daemon` until `shutdown` completes: a step, then a wait for news, again and again. `show` gets
/// the report of every step that did something worth showing ([`Daemon::worth_showing`]).
///
/// After a successful step the loop waits for mail on `transport` (IMAP IDLE or polling; a spool is
/// slept on) until the next interval, or the next request when the daemon requests (capped at
/// [`Daemon::spool_wait`] on a spool). A failed step, mail the server could not take yet, and a failed
/// wait are retried after the [`Backoff`] delay, jittered. What each step left behind is recorded for `status`
/// ([`note_step`]). The transport is closed on the way out.
///
/// # Errors
/// State failures (the database, the staleness check, queuing a summary) end the loop; failures of a step
/// or of the transport do not.
pub async fn run<D: Daemon, L: Listen>(
    daemon: &mut D,
    transport: &mut L,
    mut cfg: RunConfig,
    shutdown: impl Future,
    mut show: impl FnMut(&RunReport),
) -> Result<()> {
    let interval = daemon.interval();
    let db = Db::open(&daemon.state_dir().join("state.db"))?;
    let mut next_request = Instant::now();
    let mut next_interval = Instant::now();
    let RunConfig { backoff, random } = &mut cfg;
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        if Instant::now() >= next_interval {
            daemon.every_interval(&db)?;
            next_interval = Instant::now() + interval;
        }
        let due = daemon.requests() && Instant::now() >= next_request;
        let Step { res, blocked_until } = daemon.step(transport, due).await?;
        match &res {
            Ok(rep) => {
                if rep.requested {
                    next_request = Instant::now() + interval + (interval / 10).mul_f64(random());
                } else if due {
                    // An unanswered request holds the next one back until it is `reply-timeout` old.
                    next_request = match blocked_until {
                        Some(at) => Instant::now() + Duration::from_secs(at.saturating_sub(crate::db::now()) + 1),
                        None => Instant::now() + interval,
                    };
                }
                if daemon.worth_showing(rep) {
                    show(rep);
                }
            }
            Err(e) => warn!(error = %format!("{e:#}"), "run failed"),
        }
        admin_summary(&db, transport, &daemon.admin()).await?;
        if daemon.alerts(&db)? {
            Outbox::flush(&db, transport).await?;
        }
        if note_step(&db, transport, &res)? {
            let delay = backoff.failed_with(random());
            info!(retry_in = %humantime::format_duration(delay), "retrying soon");
            if until(shutdown.as_mut(), tokio::time::sleep(delay)).await.is_none() {
                break;
            }
            continue;
        }
        backoff.reset();
        let mut max = if daemon.requests() { next_request.saturating_duration_since(Instant::now()) } else { interval };
        if let Some(cap) = daemon.spool_wait()
            && !transport.is_mail()
        {
            max = max.min(cap);
        }
        match until(shutdown.as_mut(), transport.wait_for_mail(max)).await {
            None => break,
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                node::record_transport_error(&db, &format!("{e:#}"))?;
                let delay = backoff.failed_with(random());
                warn!(error = %format!("{e:#}"), retry_in = %humantime::format_duration(delay), "waiting for mail failed");
                if until(shutdown.as_mut(), tokio::time::sleep(delay)).await.is_none() {
                    break;
                }
            }
        }
    }
    transport.close().await;
    Ok(())
}

/// Runs `f` until it finishes (`Some`) or `shutdown` completes (`None`; `f` is dropped, which for IMAP
/// IDLE drops the connection). A shutdown that is already complete wins.
async fn until<F: Future>(shutdown: Pin<&mut impl Future>, f: F) -> Option<F::Output> {
    let out = tokio::select! {
        biased;
        _ = shutdown => None,
        v = f => Some(v),
    };
    if out.is_none() {
        info!("stopping");
    }
    out
}

/// If the node has an admin address, mails it a summary of newly refused messages (at most one an hour),
/// sending it at once.
///
/// # Errors
/// State failures, or the outbox could not be flushed.
pub async fn admin_summary<T: Transport>(db: &Db, transport: &mut T, admin: &Admin<'_>) -> Result<()> {
    if let Some(to) = admin.to
        && node::summarize_rejections(db, admin.from, to, &admin.node)?
    {
        Outbox::flush(db, transport).await?;
    }
    Ok(())
}

/// Records what a step left behind for `status` (the last error, or that all went well; how new mail is
/// noticed). Returns true when the step needs a retry soon: it failed, or mail is still queued because
/// the server could not take it.
///
/// # Errors
/// State failures.
pub fn note_step<L: Listen>(db: &Db, transport: &L, res: &Result<RunReport>) -> Result<bool> {
    if let Some(mode) = transport.receive_mode() {
        node::record_receive_mode(db, mode.as_str())?;
    }
    match res {
        Err(e) => {
            node::record_transport_error(db, &format!("{e:#}"))?;
            Ok(true)
        }
        Ok(_) if Outbox::status(db)?.pending > 0 => Ok(true),
        Ok(_) => {
            node::record_transport_ok(db)?;
            Ok(false)
        }
    }
}

/// `owner run`: answers every waiting request and records every receipt, each step with its own
/// [`Owner::open`]; it also runs every `interval` when no mail comes.
#[derive(Debug, Clone)]
pub struct OwnerDaemon {
    cfg: OwnerConfig,
}

impl OwnerDaemon {
    /// The owner daemon for `cfg`.
    pub fn new(cfg: OwnerConfig) -> OwnerDaemon {
        OwnerDaemon { cfg }
    }

    /// `owner run --once`: one step and its bookkeeping, holding the state lock throughout; closes the
    /// transport unless the bookkeeping failed.
    ///
    /// # Errors
    /// The step's failure (after it was recorded for `status`), or a state failure.
    pub async fn once<L: Listen>(&self, transport: &mut L) -> Result<RunReport> {
        let mut o = Owner::open(self.cfg.clone())?;
        let res = o.run_once(transport).await;
        note_step(o.db(), transport, &res)?;
        admin_summary(o.db(), transport, &self.admin()).await?;
        if self.alerts(o.db())? {
            Outbox::flush(o.db(), transport).await?;
        }
        transport.close().await;
        res
    }
}

impl Daemon for OwnerDaemon {
    fn interval(&self) -> Duration {
        self.cfg.owner.interval
    }

    fn state_dir(&self) -> &Path {
        &self.cfg.state_dir
    }

    fn admin(&self) -> Admin<'_> {
        Admin::owner(&self.cfg)
    }

    fn alerts(&self, db: &Db) -> Result<bool> {
        crate::fleet::queue_alerts(db, &self.cfg, crate::db::now())
    }

    fn worth_showing(&self, report: &RunReport) -> bool {
        report.messages > 0 || report.sent > 0
    }

    async fn step<T: Transport>(&mut self, transport: &mut T, _request: bool) -> Result<Step> {
        let res = match Owner::open(self.cfg.clone()) {
            Ok(mut o) => o.run_once(transport).await,
            Err(e) => Err(e),
        };
        Ok(Step { res, blocked_until: None })
    }
}

/// `recipient run`: applies replies as they arrive, requests every `interval` (unless told not to), asks
/// again once an unanswered request is `reply-timeout` old, and warns once an interval while it is stale.
#[derive(Debug, Clone)]
pub struct RecipientDaemon {
    cfg: RecipientConfig,
    request: bool,
}

impl RecipientDaemon {
    /// A spool is looked at at least this often.
    pub const SPOOL_WAIT: Duration = Duration::from_secs(30);

    /// The recipient daemon for `cfg`; it sends requests when `request` is true (`--no-request` is false).
    pub fn new(cfg: RecipientConfig, request: bool) -> RecipientDaemon {
        RecipientDaemon { cfg, request }
    }

    /// `recipient run --once`: one step (a request if `request` and none is outstanding) and its
    /// bookkeeping, holding the state lock throughout; a staleness notice is sent at once. Closes the
    /// transport unless the bookkeeping failed.
    ///
    /// # Errors
    /// The step's failure (after it was recorded for `status`), or a state failure.
    pub async fn once<L: Listen>(&self, transport: &mut L) -> Result<RunReport> {
        let mut r = Recipient::open(self.cfg.clone())?;
        let res = r.run_once(transport, self.request).await;
        note_step(r.db(), transport, &res)?;
        admin_summary(r.db(), transport, &self.admin()).await?;
        if res.is_ok() && recipient::notice_staleness(r.db(), r.config())? {
            // Send the admin notice, if one was queued, now rather than on the next run.
            Outbox::flush(r.db(), transport).await?;
        }
        transport.close().await;
        res
    }
}

impl Daemon for RecipientDaemon {
    fn interval(&self) -> Duration {
        self.cfg.recipient.interval
    }

    fn state_dir(&self) -> &Path {
        &self.cfg.state_dir
    }

    fn admin(&self) -> Admin<'_> {
        Admin::recipient(&self.cfg)
    }

    fn requests(&self) -> bool {
        self.request
    }

    fn spool_wait(&self) -> Option<Duration> {
        Some(RecipientDaemon::SPOOL_WAIT)
    }

    fn every_interval(&mut self, db: &Db) -> Result<()> {
        // Warns, and queues the admin notice that the next step sends.
        recipient::notice_staleness(db, &self.cfg)?;
        Ok(())
    }

    fn worth_showing(&self, report: &RunReport) -> bool {
        report.messages > 0 || report.requested
    }

    async fn step<T: Transport>(&mut self, transport: &mut T, request: bool) -> Result<Step> {
        let mut r = match Recipient::open(self.cfg.clone()) {
            Ok(r) => r,
            Err(e) => return Ok(Step { res: Err(e), blocked_until: None }),
        };
        let res = r.run_once(transport, request).await;
        let blocked_until =
            if matches!(&res, Ok(rep) if request && !rep.requested) { r.request_blocked_until()? } else { None };
        Ok(Step { res, blocked_until })
    }
}

#[cfg(test)]
mod tests {
    //! The loop under `tokio::time::pause`: time only moves when every task waits, and then jumps straight
    //! to the next timer, so the instants a fake daemon records are exact and the tests take no real time.

    use std::collections::VecDeque;

    use super::*;
    use crate::node::TransportStatus;
    use crate::transport::{Disposition, Incoming, TransportErrorKind};

    /// An in-memory transport with nothing in it: waits sleep for their whole `max`, except the ones told
    /// to fail.
    #[derive(Debug, Default)]
    struct Memory {
        /// Whether it pretends to be a mail server (no spool cap on waits).
        mail: bool,
        /// How many of the next waits fail at once.
        failing_waits: usize,
        /// Whether `close` was called.
        closed: bool,
    }

    impl Transport for Memory {
        async fn send(&mut self, _from: &str, _to: &str, _raw: &[u8]) -> Result<(), TransportError> {
            Ok(())
        }

        async fn fetch(&mut self) -> Result<Vec<Incoming>, TransportError> {
            Ok(vec![])
        }

        async fn settle(&mut self, _id: &str, _disposition: Disposition) -> Result<(), TransportError> {
            Ok(())
        }
    }

    impl Listen for Memory {
        async fn wait_for_mail(&mut self, max: Duration) -> Result<Wake, TransportError> {
            if self.failing_waits > 0 {
                self.failing_waits -= 1;
                return Err(TransportError::new(
                    TransportErrorKind::Transient,
                    "idle on imap.example",
                    anyhow::anyhow!("connection reset"),
                ));
            }
            tokio::time::sleep(max).await;
            Ok(Wake::TimedOut)
        }

        fn receive_mode(&self) -> Option<ReceiveMode> {
            Some(if self.mail { ReceiveMode::Idle } else { ReceiveMode::Interval })
        }

        fn is_mail(&self) -> bool {
            self.mail
        }

        async fn close(&mut self) {
            self.closed = true;
        }
    }

    /// How a scripted step ends.
    #[derive(Debug, Clone, Copy)]
    enum Outcome {
        Fail,
        Ok,
        /// A due request was held back by an unanswered one that times out this many seconds from now.
        Blocked(u64),
    }

    /// A daemon whose steps follow a script (then succeed) and record when they ran.
    struct Fake {
        dir: tempfile::TempDir,
        interval: Duration,
        requests: bool,
        spool_wait: Option<Duration>,
        /// How long a step takes.
        step_takes: Duration,
        script: VecDeque<Outcome>,
        /// Seconds since `start` at which each step began, and whether a request was due.
        steps: Vec<(f64, bool)>,
        /// Steps that ran to their end.
        finished: usize,
        /// Seconds since `start` of each `every_interval` call.
        hooks: Vec<f64>,
        start: Instant,
    }

    impl Fake {
        fn new(interval: Duration) -> Fake {
            Fake {
                dir: tempfile::tempdir().unwrap(),
                interval,
                requests: false,
                spool_wait: None,
                step_takes: Duration::ZERO,
                script: VecDeque::new(),
                steps: vec![],
                finished: 0,
                hooks: vec![],
                start: Instant::now(),
            }
        }

        fn script(mut self, outcomes: &[Outcome]) -> Fake {
            self.script = outcomes.iter().copied().collect();
            self
        }

        fn at(&self) -> Vec<f64> {
            self.steps.iter().map(|(t, _)| *t).collect()
        }

        fn gaps(&self) -> Vec<f64> {
            self.at().windows(2).map(|w| w[1] - w[0]).collect()
        }

        fn status(&self) -> TransportStatus {
            TransportStatus::read(&Db::open(&self.dir.path().join("state.db")).unwrap()).unwrap()
        }
    }

    impl Daemon for Fake {
        fn interval(&self) -> Duration {
            self.interval
        }

        fn state_dir(&self) -> &Path {
            self.dir.path()
        }

        fn admin(&self) -> Admin<'_> {
            Admin { from: "node@example.org", to: None, node: "test".into() }
        }

        fn requests(&self) -> bool {
            self.requests
        }

        fn spool_wait(&self) -> Option<Duration> {
            self.spool_wait
        }

        fn every_interval(&mut self, _db: &Db) -> Result<()> {
            self.hooks.push(self.start.elapsed().as_secs_f64());
            Ok(())
        }

        fn worth_showing(&self, report: &RunReport) -> bool {
            report.requested
        }

        async fn step<T: Transport>(&mut self, _transport: &mut T, request: bool) -> Result<Step> {
            self.steps.push((self.start.elapsed().as_secs_f64(), request));
            tokio::time::sleep(self.step_takes).await;
            self.finished += 1;
            let ok = Ok(RunReport { requested: request, ..RunReport::default() });
            Ok(match self.script.pop_front().unwrap_or(Outcome::Ok) {
                Outcome::Fail => {
                    Step { res: Err(anyhow::anyhow!("smtp.example: connection refused")), blocked_until: None }
                }
                Outcome::Ok => Step { res: ok, blocked_until: None },
                Outcome::Blocked(secs) => {
                    Step { res: Ok(RunReport::default()), blocked_until: Some(crate::db::now() + secs) }
                }
            })
        }
    }

    /// Runs `d` on `t` until `stop_after` (seconds), with `random` as the jitter's source; returns how long
    /// the loop ran. A loop that does not stop within a simulated day fails the test instead of hanging it.
    async fn run_until(d: &mut Fake, t: &mut Memory, stop_after: u64, random: f64) -> f64 {
        let cfg = RunConfig { backoff: Backoff::default(), random: Box::new(move || random) };
        let started = Instant::now();
        let shutdown = tokio::time::sleep(Duration::from_secs(stop_after));
        let ran = tokio::time::timeout(Duration::from_secs(86_400), run(d, t, cfg, shutdown, |_| {})).await;
        ran.expect("the loop did not stop when asked to").unwrap();
        started.elapsed().as_secs_f64()
    }

    #[test]
    fn backoff_doubles_from_one_second_and_caps_at_five_minutes() {
        let mut b = Backoff::default();
        let secs: Vec<u64> = (0..11).map(|_| b.failed().as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]);
        b.reset();
        assert_eq!(b.failed(), Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn failing_steps_are_retried_after_a_growing_capped_backoff_and_shutdown_ends_a_retry_wait() {
        let mut d = Fake::new(Duration::from_secs(60)).script(&[Outcome::Fail; 20]);
        let mut t = Memory::default();
        let ran = run_until(&mut d, &mut t, 2000, 0.0).await;
        assert_eq!(d.gaps(), [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 300.0, 300.0, 300.0, 300.0]);
        // The last retry was due at 2011 s: the shutdown at 2000 s ended the wait at once.
        assert_eq!(ran, 2000.0);
        assert!(t.closed, "the transport is closed on the way out");
        let status = d.status();
        assert!(status.failing(), "{status:?}");
        assert!(status.last_error.unwrap().contains("connection refused"));
    }

    #[tokio::test(start_paused = true)]
    async fn retries_are_jittered_between_half_the_ceiling_and_the_ceiling() {
        let ceilings = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 300.0, 300.0];
        let mut schedules = vec![];
        for seed in [1u64, 2] {
            let mut d = Fake::new(Duration::from_secs(60)).script(&[Outcome::Fail; 11]);
            let mut t = Memory::default();
            // Two nodes with their own randomness (xorshift), as two machines of a fleet would have.
            let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
            let random = move || {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 11) as f64 / (1u64 << 53) as f64
            };
            let cfg = RunConfig { backoff: Backoff::default(), random: Box::new(random) };
            let shutdown = tokio::time::sleep(Duration::from_secs(3000));
            tokio::time::timeout(Duration::from_secs(86_400), run(&mut d, &mut t, cfg, shutdown, |_| {}))
                .await
                .expect("the loop did not stop when asked to")
                .unwrap();
            let gaps = d.gaps();
            assert!(gaps.len() > ceilings.len(), "{gaps:?}");
            for (g, c) in gaps.iter().zip(ceilings) {
                assert!((c / 2.0..c).contains(g), "retry after {g} s for a ceiling of {c} s: {gaps:?}");
            }
            schedules.push(gaps[..ceilings.len()].to_vec());
        }
        assert_ne!(schedules[0], schedules[1], "two nodes retry at different times");
    }

    #[tokio::test(start_paused = true)]
    async fn a_successful_step_resets_the_backoff() {
        use Outcome::{Fail, Ok};
        let mut d = Fake::new(Duration::from_secs(60)).script(&[Fail, Fail, Fail, Ok, Fail, Fail, Ok]);
        let mut t = Memory { mail: true, ..Memory::default() };
        run_until(&mut d, &mut t, 200, 0.0).await;
        // After a success the loop waits the interval; the next failure starts again at one second.
        assert_eq!(d.gaps(), [1.0, 2.0, 4.0, 60.0, 1.0, 2.0, 60.0, 60.0]);
        assert!(!d.status().failing(), "the last step went well");
    }

    #[tokio::test(start_paused = true)]
    async fn a_shutdown_during_a_step_lets_it_finish_and_ends_the_next_wait() {
        let mut d = Fake::new(Duration::from_secs(60));
        d.step_takes = Duration::from_secs(5);
        let mut t = Memory::default();
        let ran = run_until(&mut d, &mut t, 2, 0.0).await;
        assert_eq!((d.at().len(), d.finished), (1, 1), "the step in progress finished, no other began");
        assert_eq!(ran, 5.0, "stopped as the step ended, not after the interval");
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_wait_for_mail_is_recorded_and_retried_after_a_backoff() {
        let mut d = Fake::new(Duration::from_secs(60));
        let mut t = Memory { mail: true, failing_waits: 2, ..Memory::default() };
        let db = Db::open(&d.dir.path().join("state.db")).unwrap();
        let ran = run_until(&mut d, &mut t, 3, 0.0).await;
        // Each failed wait is retried a second later (the step before it went well), then the wait lasts.
        assert_eq!(d.at(), [0.0, 1.0, 2.0]);
        assert_eq!(ran, 3.0);
        let status = TransportStatus::read(&db).unwrap();
        assert!(status.last_error.unwrap().contains("connection reset"));
        assert_eq!(status.receive_mode.as_deref(), Some("idle"));
    }

    #[tokio::test(start_paused = true)]
    async fn requests_are_due_every_interval_plus_the_jitter() {
        let mut d = Fake::new(Duration::from_secs(100));
        d.requests = true;
        let mut t = Memory { mail: true, ..Memory::default() };
        run_until(&mut d, &mut t, 300, 0.5).await;
        // 100 s plus half of the 10% jitter.
        assert_eq!(d.steps, [(0.0, true), (105.0, true), (210.0, true)]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_spool_is_looked_at_every_30_seconds_between_requests() {
        let mut d = Fake::new(Duration::from_secs(100));
        d.requests = true;
        d.spool_wait = Some(RecipientDaemon::SPOOL_WAIT);
        let mut t = Memory::default();
        run_until(&mut d, &mut t, 110, 0.0).await;
        assert_eq!(d.steps, [(0.0, true), (30.0, false), (60.0, false), (90.0, false), (100.0, true)]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_held_back_is_due_again_when_the_unanswered_one_times_out() {
        let mut d = Fake::new(Duration::from_secs(1000)).script(&[Outcome::Blocked(50)]);
        d.requests = true;
        let mut t = Memory { mail: true, ..Memory::default() };
        run_until(&mut d, &mut t, 60, 0.0).await;
        let steps = &d.steps;
        assert_eq!(steps.len(), 2, "{steps:?}");
        // 50 s and one more; the wall clock may tick between the step and the loop's reckoning.
        assert!(steps[1].1 && (50.0..=51.0).contains(&steps[1].0), "{steps:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn the_interval_hook_runs_at_most_once_an_interval() {
        let mut d = Fake::new(Duration::from_secs(100));
        d.spool_wait = Some(Duration::from_secs(30));
        d.requests = true;
        let mut t = Memory::default();
        run_until(&mut d, &mut t, 250, 0.0).await;
        assert_eq!(d.at(), [0.0, 30.0, 60.0, 90.0, 100.0, 130.0, 160.0, 190.0, 200.0, 230.0]);
        assert_eq!(d.hooks, [0.0, 100.0, 200.0]);
    }
}
