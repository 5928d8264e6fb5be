//! The two system calls neither std nor nix wraps safely: a thread's scheduling priority, and
//! putting SIGPIPE back to its default for a command-line tool.

use std::io;

/// Sets the nice value of the calling thread (Linux schedules threads one by one: the
/// process's other threads keep theirs). Lowering it below the current value needs
/// CAP_SYS_NICE.
pub fn set_thread_nice(nice: i32) -> io::Result<()> {
    let tid = libc::id_t::try_from(nix::unistd::gettid().as_raw())
        .map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))?;
    // SAFETY: setpriority takes plain integers and touches no memory of this process.
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, nice) };
    if r == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Lets SIGPIPE end the process, as it does other Unix tools: Rust ignores it, so that
/// printing to a pipe whose reader is gone (`redun points ... | head`) panics instead. For
/// the `redun` command line only; the daemons keep ignoring it (a peer that goes away is
/// an error on its connection).
pub fn default_sigpipe() {
    // SAFETY: installs the default disposition; no handler of this process is involved.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
