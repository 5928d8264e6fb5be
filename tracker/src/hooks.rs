//! App-consistent recovery points: the volume's freeze hook, the marker, then the thaw hook,
//! which runs whatever happened before it (a failed or timed-out freeze may have frozen part
//! of the application).
//!
//! Hooks are shell commands (`sh -c`), run with the tracker's environment plus
//! `REDUN_VOLUME` and `REDUN_HOOK` (`pre` or `post`), with a clean signal mask (the tracker
//! blocks its stop signals in every thread) in a process group of their own, which is killed
//! when the hook outlives its timeout.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::time::{Duration, Instant};

use log::{info, warn};
use nix::sys::signal::{SigSet, Signal, killpg};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

use crate::journal::format::PointKind;
use crate::track::ChangeLog;

/// A volume's hooks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Hooks {
    pub pre: Option<String>,
    pub post: Option<String>,
    pub timeout: Duration,
}

impl Hooks {
    /// Neither a pre-hook nor a post-hook.
    pub fn is_empty(&self) -> bool {
        self.pre.is_none() && self.post.is_none()
    }

    /// The pre-hook of `volume`, if it has one.
    pub fn run_pre(&self, volume: &str) -> Result<(), String> {
        self.pre
            .as_deref()
            .map_or(Ok(()), |c| run(c, volume, "pre", self.timeout))
    }

    /// The post-hook of `volume`, if it has one.
    pub fn run_post(&self, volume: &str) -> Result<(), String> {
        self.post
            .as_deref()
            .map_or(Ok(()), |c| run(c, volume, "post", self.timeout))
    }
}

/// Runs `cmd` for `volume` and waits at most `timeout` for it to exit 0.
pub fn run(cmd: &str, volume: &str, which: &str, timeout: Duration) -> Result<(), String> {
    let cstr = |s: &[u8]| CString::new(s).map_err(|_| format!("{which}-hook contains a NUL byte"));
    let args = [cstr(b"sh")?, cstr(b"-c")?, cstr(cmd.as_bytes())?];
    let mut env = Vec::new();
    for (k, v) in std::env::vars_os() {
        if k == "REDUN_VOLUME" || k == "REDUN_HOOK" {
            continue;
        }
        let mut kv = k.as_bytes().to_vec();
        kv.push(b'=');
        kv.extend_from_slice(v.as_bytes());
        if let Ok(c) = CString::new(kv) {
            env.push(c);
        }
    }
    env.push(cstr(format!("REDUN_VOLUME={volume}").as_bytes())?);
    env.push(cstr(format!("REDUN_HOOK={which}").as_bytes())?);
    let spawn = || -> nix::Result<Pid> {
        use nix::spawn::{PosixSpawnAttr, PosixSpawnFileActions, PosixSpawnFlags, posix_spawnp};
        let mut attr = PosixSpawnAttr::init()?;
        attr.set_flags(
            PosixSpawnFlags::POSIX_SPAWN_SETPGROUP | PosixSpawnFlags::POSIX_SPAWN_SETSIGMASK,
        )?;
        attr.set_pgroup(Pid::from_raw(0))?;
        attr.set_sigmask(&SigSet::empty())?;
        let actions = PosixSpawnFileActions::init()?;
        posix_spawnp(&args[0], &actions, &attr, &args, &env)
    };
    let pid = spawn().map_err(|e| format!("{which}-hook {cmd:?} cannot start: {e}"))?;
    let deadline = Instant::now() + timeout;
    loop {
        match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, 0)) => return Ok(()),
            Ok(WaitStatus::Exited(_, code)) => {
                return Err(format!("{which}-hook {cmd:?} exited with status {code}"));
            }
            Ok(WaitStatus::Signaled(_, sig, _)) => {
                return Err(format!("{which}-hook {cmd:?} was killed by {sig}"));
            }
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(format!("{which}-hook {cmd:?}: cannot wait for it: {e}")),
        }
        if Instant::now() >= deadline {
            let _ = killpg(pid, Signal::SIGKILL);
            let _ = waitpid(pid, None);
            return Err(format!(
                "{which}-hook {cmd:?} did not finish within {timeout:?} and was killed \
                 (points.hook_timeout)"
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Places an app-consistent point in `log`: pre-hook, marker, post-hook. The post-hook runs
/// even when the pre-hook or the marker failed; the point counts only when all three worked
/// (a point whose thaw failed was still taken frozen, so it is kept, and the error says so).
pub fn app_point(log: &ChangeLog, volume: &str, hooks: &Hooks) -> Result<u64, String> {
    if hooks.is_empty() {
        return Err(format!(
            "volume {volume} has no pre_hook or post_hook: an app-consistent point needs the \
             commands that freeze and thaw the application (set them in its [[volume]] entry)"
        ));
    }
    let started = Instant::now();
    let pre = hooks.run_pre(volume);
    let marked = match &pre {
        Ok(()) => log
            .mark(PointKind::App, false)
            .map_err(|e| format!("volume {volume}: {e}"))
            .and_then(|id| id.ok_or_else(|| format!("volume {volume}: no point placed"))),
        Err(e) => Err(format!("volume {volume}: {e}; no point placed")),
    };
    let post = hooks.run_post(volume);
    match (marked, post) {
        (Ok(id), Ok(())) => {
            info!(
                "volume={volume}: app-consistent point {id} placed (hooks took {:?})",
                started.elapsed()
            );
            Ok(id)
        }
        (Ok(id), Err(e)) => {
            log.note_point_failed();
            warn!("volume={volume}: app-consistent point {id} placed, but {e}");
            Err(format!(
                "volume {volume}: point {id} was placed while frozen, but {e}: check that the \
                 application is running again"
            ))
        }
        (Err(e), Ok(())) => {
            log.note_point_failed();
            warn!("{e}");
            Err(e)
        }
        (Err(e), Err(p)) => {
            log.note_point_failed();
            warn!("{e}; and {p}");
            Err(format!(
                "{e}; and {p}: check that the application is running again"
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hooks_run_with_the_volume_and_time_out() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let cmd = format!("echo \"$REDUN_VOLUME $REDUN_HOOK\" > {}", out.display());
        run(&cmd, "db", "pre", Duration::from_secs(5)).unwrap();
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "db pre\n");
        let e = run("exit 3", "db", "post", Duration::from_secs(5)).unwrap_err();
        assert!(e.contains("post-hook") && e.contains("status 3"), "{e}");
        let t = Instant::now();
        // The hook's own child is killed with it (process group).
        let e = run("sleep 30 & wait", "db", "pre", Duration::from_millis(200)).unwrap_err();
        assert!(
            e.contains("did not finish") && e.contains("hook_timeout"),
            "{e}"
        );
        assert!(t.elapsed() < Duration::from_secs(5));
    }
}
