//! systemd service integration shared by the three daemons: `READY=1` once a daemon serves
//! (units use `Type=notify`), watchdog pings while it runs, `STOPPING=1` when it stops.
//! Without `NOTIFY_SOCKET` (not started by systemd) every call does nothing. Also the line a
//! daemon (or the CLI) ends with when it fails ([`error_line`]).

use std::time::Duration;

use log::{debug, info, warn};
use nix::sys::signal::{SigSet, Signal};
use sd_notify::NotifyState;

/// Blocks SIGTERM and SIGINT in the calling thread. Call it before any thread exists: every
/// thread inherits the mask, so only [`wait_stop`] receives them (through sigwait).
pub fn block_stop_signals() -> std::io::Result<SigSet> {
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    signals.thread_block()?;
    Ok(signals)
}

/// Waits for SIGTERM or SIGINT, tells systemd the daemon is stopping and logs it.
pub fn wait_stop(signals: &SigSet, daemon: &str) -> std::io::Result<Signal> {
    let sig = signals.wait()?;
    stopping();
    info!("daemon={daemon} signal={sig:?}: received, stopping");
    Ok(sig)
}

/// Logs `DAEMON ready: STATUS` and tells systemd the daemon is ready, with the status line;
/// starts watchdog pings when the unit asks for them (`WatchdogSec=`).
pub fn ready(daemon: &str, status: &str) {
    info!("daemon={daemon}: ready: {status}");
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = sd_notify::notify(&[NotifyState::Ready, NotifyState::Status(status)]) {
        warn!("cannot notify systemd that the daemon is ready: {e}");
    }
    if let Some(every) = sd_notify::watchdog_enabled() {
        let spawned = std::thread::Builder::new()
            .name("watchdog".into())
            .spawn(move || watchdog(every / 2));
        if let Err(e) = spawned {
            warn!("cannot start the systemd watchdog thread: {e}");
        }
    }
}

fn watchdog(every: Duration) {
    loop {
        if let Err(e) = sd_notify::notify(&[NotifyState::Watchdog]) {
            debug!("watchdog ping failed: {e}");
        }
        std::thread::sleep(every.max(Duration::from_millis(100)));
    }
}

/// Tells systemd the daemon is stopping.
pub fn stopping() {
    if std::env::var_os("NOTIFY_SOCKET").is_some() {
        let _ = sd_notify::notify(&[NotifyState::Stopping]);
    }
}

/// `e` and its causes on one line, as `{:#}` prints them, but without a cause that a message
/// before it already quotes: our errors put their cause in their message and also name it as
/// the `#[source]`, so `{:#}` says it twice ("...: No such file or directory (os error 2):
/// No such file or directory (os error 2)").
pub fn error_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

/// Accepts on the non-blocking `listener` until `stop`, handing every connection to `conn`;
/// `what` names the listener in the log. A stop is seen within 50 ms.
pub fn accept_until(
    listener: &std::net::TcpListener,
    stop: &std::sync::atomic::AtomicBool,
    what: &str,
    mut conn: impl FnMut(std::net::TcpStream, std::net::SocketAddr),
) {
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
        match listener.accept() {
            Ok((s, peer)) => conn(s, peer),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => {
                warn!("{what}: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::error_line;

    #[derive(Debug, thiserror::Error)]
    #[error("Cannot open backing /x: {source}")]
    struct Quoting {
        #[source]
        source: std::io::Error,
    }

    #[test]
    fn a_cause_the_message_quotes_is_said_once() {
        let io = std::io::Error::from_raw_os_error(2);
        let e = anyhow::Error::new(Quoting { source: io }).context("volume \"x\"");
        assert_eq!(
            error_line(&e),
            "volume \"x\": Cannot open backing /x: No such file or directory (os error 2)"
        );
        // A cause the message does not quote is kept.
        let e = anyhow::Error::new(std::io::Error::from_raw_os_error(13)).context("journal /j");
        assert_eq!(
            error_line(&e),
            "journal /j: Permission denied (os error 13)"
        );
    }
}
