//! The system calls neither std nor nix wraps safely: a thread's scheduling and I/O
//! priorities, and putting SIGPIPE back to its default for a command-line tool.

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

/// Puts the calling thread's I/O at the lowest level of the best-effort class (ioprio_set,
/// which has no libc wrapper). Not the idle class: a thread that syncs a file under a lock
/// others need could starve behind them in the idle class and hold the lock meanwhile.
pub fn set_thread_io_lowest() -> io::Result<()> {
    const IOPRIO_WHO_PROCESS: libc::c_long = 1;
    const IOPRIO_CLASS_BE: libc::c_long = 2;
    const IOPRIO_CLASS_SHIFT: libc::c_long = 13;
    const LOWEST_LEVEL: libc::c_long = 7;
    // `who` 0 is the calling thread.
    // SAFETY: ioprio_set takes plain integers and touches no memory of this process.
    let r = unsafe {
        libc::syscall(
            libc::SYS_ioprio_set,
            IOPRIO_WHO_PROCESS,
            0 as libc::c_long,
            (IOPRIO_CLASS_BE << IOPRIO_CLASS_SHIFT) | LOWEST_LEVEL,
        )
    };
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
