//! Asking a daemon's admin socket from the CLI: the answer when it says `ok`, else why, in
//! the words `redun` prints (`redun CMD: WHY`) and with the exit status that goes with it.

use std::path::Path;
use std::process::ExitCode;

use redun_tracker::admin;

/// The daemons whose JSON admin requests the CLI sends.
#[derive(Debug, Clone, Copy)]
pub enum Daemon {
    Shipper,
    Target,
}

impl Daemon {
    fn name(self) -> &'static str {
        match self {
            Daemon::Shipper => "shipper",
            Daemon::Target => "target",
        }
    }

    fn hint(self) -> &'static str {
        match self {
            Daemon::Shipper => "is redun-shipper running? --shipper-socket",
            Daemon::Target => "is redun-target running on this host? --target-socket",
        }
    }
}

/// Why a request got no answer to use.
#[derive(Debug)]
pub enum AskError {
    /// The daemon answered with an error (exit status 1).
    Refused(String),
    /// The daemon could not be reached (exit status 2).
    Unreachable(String),
}

impl AskError {
    pub fn code(&self) -> ExitCode {
        match self {
            AskError::Refused(_) => ExitCode::from(1),
            AskError::Unreachable(_) => ExitCode::from(2),
        }
    }
}

impl std::fmt::Display for AskError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AskError::Refused(m) | AskError::Unreachable(m) => f.write_str(m),
        }
    }
}

/// Sends `req` to `daemon` on `socket`.
pub fn ask(
    daemon: Daemon,
    socket: &Path,
    req: &serde_json::Value,
) -> Result<serde_json::Value, AskError> {
    match admin::request_json(socket, req) {
        Ok(v) if v["ok"] == true => Ok(v),
        Ok(v) => Err(AskError::Refused(v["error"].as_str().map_or_else(
            || format!("the {} refused", daemon.name()),
            String::from,
        ))),
        Err(e) => Err(AskError::Unreachable(format!(
            "cannot reach the {} on {}: {e} ({})",
            daemon.name(),
            socket.display(),
            daemon.hint()
        ))),
    }
}

/// [`ask`] for a command that ends on failure: prints `redun CMD: WHY` and gives the exit
/// status.
pub fn ask_or_exit(
    cmd: &str,
    daemon: Daemon,
    socket: &Path,
    req: &serde_json::Value,
) -> Result<serde_json::Value, ExitCode> {
    ask(daemon, socket, req).map_err(|e| {
        eprintln!("redun {cmd}: {e}");
        e.code()
    })
}

/// The `volumes` of `daemon`'s status.
pub fn volumes(daemon: Daemon, socket: &Path) -> Result<Vec<serde_json::Value>, AskError> {
    let v = ask(daemon, socket, &serde_json::json!({"cmd": "status"}))?;
    Ok(v["status"]["volumes"]
        .as_array()
        .cloned()
        .unwrap_or_default())
}
