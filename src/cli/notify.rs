//! systemd readiness (`Type=notify`): one datagram to `$NOTIFY_SOCKET` once a daemon's loop starts.
//!
//! This is the whole of `sd_notify(3)` that mailferry needs, so it is written here instead of adding a
//! crate. Without `$NOTIFY_SOCKET` (not started by systemd) it does nothing; a failure to notify is
//! logged and otherwise ignored, because systemd then reports the start as timed out by itself.

use std::os::unix::net::{SocketAddr, UnixDatagram};

/// Tells the service manager the daemon is ready (`READY=1`), with a human-readable `STATUS=`.
pub fn ready(status: &str) {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else { return };
    if let Err(e) = send(&socket, &format!("READY=1\nSTATUS={status}\nMAINPID={}\n", std::process::id())) {
        tracing::warn!(error = %e, "failed to notify the service manager that the daemon is ready");
    }
}

fn send(socket: &std::ffi::OsStr, message: &str) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = socket.as_bytes();
    // `@name` is a socket in the abstract namespace; anything else is a path.
    let addr = match bytes.strip_prefix(b"@") {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(name)?
        }
        None => SocketAddr::from_pathname(std::path::Path::new(socket))?,
    };
    let sock = UnixDatagram::unbound()?;
    sock.send_to_addr(message.as_bytes(), &addr)?;
    Ok(())
}
