//! systemd service integration shared by the three daemons: `READY=1` once a daemon serves
//! (units use `Type=notify`), watchdog pings while it runs, `STOPPING=1` when it stops.
//! Without `NOTIFY_SOCKET` (not started by systemd) every call does nothing.

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
