//! The daemons' shutdown: SIGINT or SIGTERM.

use std::future::Future;

use anyhow::Result;
use tokio::signal::unix::{SignalKind, signal};

/// A future that completes at the first SIGINT or SIGTERM. The handlers are installed here, before it
/// is first polled, so a signal that arrives while a daemon is in a step is kept and ends the next wait
/// at once (see [`mailferry::node::run`]).
///
/// # Errors
/// The signal handlers could not be installed.
pub fn shutdown() -> Result<impl Future<Output = ()>> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}
