//! Test harness: starts the real `redun-tracker` binary on a temporary sparse image and runs
//! real NBD clients against it. Every process a test starts is stopped by its PID when the
//! guard drops; temporary files live in a `TempDir`.

#![allow(dead_code)]

pub mod objstore;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Directory of the built binaries: `REDUN_BIN_DIR`, else the profile directory this test
/// binary was built into (`target/<profile>/deps/..`).
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("REDUN_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf()
}

pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: build the workspace first (cargo build --release --workspace), \
         or set REDUN_BIN_DIR",
        p.display()
    );
    p
}

/// Fails with an actionable message when a client tool is missing.
pub fn require(tool: &str) {
    let ok = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "{tool} is not installed: run scripts/install-test-deps.sh"
    );
}

/// Runs a command with /usr/bin first in PATH (libnbd's Python lives there, not in pyenv)
/// and panics with its output if it fails.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .env(
            "PATH",
            format!(
                "/usr/bin:/usr/sbin:/sbin:{}",
                std::env::var("PATH").unwrap_or_default()
            ),
        )
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn sh(script: &str) -> Output {
    run(Command::new("bash").arg("-c").arg(script))
}

pub const EXPORT: &str = "disk";
pub const BACKENDS: [&str; 2] = ["uring", "sync"];

/// A running tracker serving one sparse image over a Unix socket.
#[derive(Debug)]
pub struct Tracker {
    pub child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub image: PathBuf,
    pub sock: PathBuf,
    pub admin: PathBuf,
    pub log: PathBuf,
    pub tcp: Option<String>,
}

impl Tracker {
    /// Starts a tracker on a new sparse image of `size` bytes with `backend`.
    pub fn start(backend: &str, size: u64) -> Tracker {
        Self::start_with(backend, size, &[])
    }

    pub fn start_with(backend: &str, size: u64, extra: &[&str]) -> Tracker {
        Self::start_on(backend, size, extra, |_| {})
    }

    /// Starts a tracker on a new image of `size` bytes that `prepare` may fill first (data
    /// that exists before the volume is protected).
    pub fn start_on(
        backend: &str,
        size: u64,
        extra: &[&str],
        prepare: impl FnOnce(&std::path::Path),
    ) -> Tracker {
        let dir = tempfile::Builder::new()
            .prefix("redun-test-")
            .tempdir_in(std::env::var_os("REDUN_TEST_TMP").unwrap_or_else(|| "/tmp".into()))
            .unwrap();
        let image = dir.path().join("disk.img");
        let f = std::fs::File::create(&image).unwrap();
        f.set_len(size).unwrap();
        drop(f);
        prepare(&image);
        let mut t = Tracker {
            child: None,
            image,
            sock: dir.path().join("nbd.sock"),
            admin: dir.path().join("admin.sock"),
            log: dir.path().join("tracker.log"),
            dir,
            tcp: None,
        };
        t.spawn(backend, extra);
        t
    }

    /// (Re)starts the process on the existing image.
    pub fn spawn(&mut self, backend: &str, extra: &[&str]) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = Command::new(bin("redun-tracker"));
        cmd.arg("--volume")
            .arg(format!("{EXPORT}={}", self.image.display()))
            .arg("--listen")
            .arg(format!("unix:{}", self.sock.display()))
            .arg("--admin-socket")
            .arg(&self.admin)
            .arg("--backend")
            .arg(backend)
            .args(extra)
            .args(self.default_journal(extra))
            .env("RUST_LOG", "info")
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let readies = self.ready_lines().len();
        self.child = Some(cmd.spawn().expect("spawn redun-tracker"));
        self.wait_ready(readies);
    }

    /// The journal in the test's directory ([`Tracker::journal_dir`], never the system's
    /// default directory), 64 MiB unless the test says otherwise.
    fn default_journal(&self, extra: &[&str]) -> Vec<String> {
        let given = |flag: &str| extra.iter().any(|a| *a == flag || *a == "--no-journal");
        let mut out = Vec::new();
        if !given("--journal-dir") {
            out.push("--journal-dir".into());
            out.push(self.journal_dir().display().to_string());
        }
        if !given("--journal-size") {
            out.push("--journal-size".into());
            out.push("64M".into());
        }
        out
    }

    /// Where the tracker keeps its journals (unless a test gives `--journal-dir`).
    pub fn journal_dir(&self) -> PathBuf {
        self.dir.path().join("journal")
    }

    /// The journal of the test's export.
    pub fn journal_path(&self) -> PathBuf {
        self.journal_dir().join(format!("{EXPORT}.journal"))
    }

    fn ready_lines(&self) -> Vec<String> {
        self.log_text()
            .lines()
            .filter(|l| l.contains("ready:"))
            .map(String::from)
            .collect()
    }

    /// Waits for the ready line of this run (the log keeps those of earlier runs).
    fn wait_ready(&mut self, earlier: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("redun-tracker exited early with {st}:\n{}", self.log_text());
            }
            if self.admin.exists() && self.sock.exists() {
                if let Some(l) = self.ready_lines().get(earlier) {
                    self.tcp = l
                        .split(", ")
                        .map(|s| s.trim())
                        .find(|s| s.starts_with("127.0.0.1:"))
                        .map(String::from);
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redun-tracker did not become ready:\n{}", self.log_text());
    }

    pub fn uri(&self) -> String {
        format!("nbd+unix:///{EXPORT}?socket={}", self.sock.display())
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(i32::try_from(self.child.as_ref().unwrap().id()).unwrap())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then wait for the exit status.
    pub fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let _ = kill(
            Pid::from_raw(i32::try_from(child.id()).unwrap()),
            Signal::SIGTERM,
        );
        wait_timeout(&mut child, Duration::from_secs(60))
            .unwrap_or_else(|| panic!("tracker ignored SIGTERM:\n{}", self.log_text()))
    }

    /// `redun status --json` against this tracker.
    pub fn status_json(&self) -> serde_json::Value {
        let out = run(Command::new(bin("redun"))
            .args(["status", "--json", "--tracker-socket"])
            .arg(&self.admin));
        serde_json::from_slice(&out.stdout).expect("status JSON")
    }

    /// The journal's head sequence number (the last record written), from `redun status`.
    pub fn head_seq(&self) -> u64 {
        let st = self.status_json();
        st["tracker"]["status"]["volumes"][0]["journal"]["head_seq"]
            .as_u64()
            .expect("journal head_seq")
    }
}

pub fn wait_timeout(child: &mut Child, t: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + t;
    while Instant::now() < deadline {
        if let Some(st) = child.try_wait().unwrap() {
            return Some(st);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

impl Drop for Tracker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `nbdsh` running a script of tests/scripts (libnbd's Python shell; `-n`: the script makes
/// its own handles) with `args` as `sys.argv[1..]`, with /usr/bin first in PATH.
fn nbdsh(script: &str, args: &[&str]) -> Command {
    require("nbdsh");
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/scripts")
        .join(script);
    let argv: Vec<String> = std::iter::once(path.display().to_string())
        .chain(args.iter().map(|a| a.to_string()))
        .collect();
    let code = format!(
        "import sys; sys.argv = {}; exec(compile(open(sys.argv[0]).read(), sys.argv[0], 'exec'))",
        serde_json::to_string(&argv).unwrap()
    );
    let mut cmd = Command::new("nbdsh");
    cmd.arg("-n").arg("-c").arg(code).env(
        "PATH",
        format!(
            "/usr/bin:/usr/sbin:/sbin:{}",
            std::env::var("PATH").unwrap_or_default()
        ),
    );
    cmd
}

/// Starts a script like [`python`], without waiting; its output is piped.
pub fn python_spawn(script: &str, args: &[&str]) -> Child {
    nbdsh(script, args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("nbdsh")
}

/// Runs a script of tests/scripts in `nbdsh` with `args` as `sys.argv[1..]`; panics with its
/// output if it fails.
pub fn python(script: &str, args: &[&str]) -> Output {
    run(&mut nbdsh(script, args))
}

/// The arguments of `ip` that run `bin_name` with `args` in network namespace `ns`
/// (`ip netns exec NS BIN ARGS...`; `ip` execs it, so the PID is the daemon's).
pub fn netns_exec(ns: &str, bin_name: &str, args: &[String]) -> Vec<String> {
    let mut v = vec![
        "netns".to_string(),
        "exec".into(),
        ns.into(),
        s(&bin(bin_name)),
    ];
    v.extend_from_slice(args);
    v
}

/// Waits up to 20 s for `path` to exist; `what` names it when it does not.
pub fn wait_for(path: &Path, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{what} ({}) never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A block device made of an NBD export (this machine has no kernel NBD client): nbdfuse
/// exposes the export as a file, a loop device turns it into a block device, optionally
/// mounted. Dropping it undoes the stack in reverse order, whatever happened to the test.
pub struct Stack {
    pub mnt: PathBuf,
    pub loopdev: Option<String>,
    pub fuse_dir: PathBuf,
    pub nbdfuse: Option<Child>,
}

impl Stack {
    /// Attaches `uri` under `dir` (`dir/fuse`, mount point `dir/mnt`).
    pub fn attach(uri: &str, dir: &Path, read_only: bool) -> Stack {
        let fuse_dir = dir.join("fuse");
        let mnt = dir.join("mnt");
        std::fs::create_dir_all(&fuse_dir).unwrap();
        std::fs::create_dir_all(&mnt).unwrap();
        let mut stack = Stack {
            mnt,
            loopdev: None,
            fuse_dir: fuse_dir.clone(),
            nbdfuse: None,
        };
        let mut cmd = Command::new("nbdfuse");
        if read_only {
            cmd.arg("-r");
        }
        stack.nbdfuse = Some(
            cmd.arg(&fuse_dir)
                .arg(uri)
                .stdout(Stdio::null())
                .spawn()
                .expect("nbdfuse"),
        );
        let node = fuse_dir.join("nbd");
        wait_for(&node, "nbdfuse's export file");
        let mut losetup = Command::new("losetup");
        losetup.args(["-f", "--show", "--direct-io=on"]);
        if read_only {
            losetup.arg("--read-only");
        }
        let out = run(losetup.arg(&node));
        stack.loopdev = Some(String::from_utf8_lossy(&out.stdout).trim().to_string());
        stack
    }

    pub fn dev(&self) -> &str {
        self.loopdev.as_deref().expect("attached")
    }

    /// Mounts the loop device on `mnt` with `options` (e.g. "ro,noload"; "" for none).
    pub fn mount(&self, options: &str) {
        let mut cmd = Command::new("mount");
        if !options.is_empty() {
            cmd.args(["-o", options]);
        }
        run(cmd.arg(self.dev()).arg(&self.mnt));
    }
}

/// True while something is mounted on `dir`.
fn mounted(dir: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let d = dir.display().to_string();
    mounts
        .lines()
        .any(|l| l.split(' ').nth(1) == Some(d.as_str()))
}

/// Unmounts `dir` with `cmd`, retrying for a while (processes that used it may still be on
/// their way out), lazily as a last resort.
fn unmount(cmd: &str, args: &[&str], lazy: &str, dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while mounted(dir) && Instant::now() < deadline {
        let _ = Command::new(cmd)
            .args(args)
            .arg(dir)
            .stderr(Stdio::null())
            .status();
        if mounted(dir) {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    if mounted(dir) {
        let _ = Command::new(cmd).args(args).arg(lazy).arg(dir).status();
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        unmount("umount", &[], "-l", &self.mnt);
        if let Some(l) = self.loopdev.take() {
            let _ = Command::new("losetup").arg("-d").arg(l).status();
        }
        unmount("fusermount3", &["-u"], "-z", &self.fuse_dir);
        if let Some(mut c) = self.nbdfuse.take() {
            if wait_timeout(&mut c, Duration::from_secs(10)).is_none() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// True when filesystem tests can run (root and /dev/fuse); otherwise fails, unless
/// `REDUN_SKIP_PRIVILEGED` says to skip them.
pub fn privileged() -> bool {
    let root = nix::unistd::geteuid().is_root();
    let fuse = Path::new("/dev/fuse").exists();
    if root && fuse {
        return true;
    }
    let why = format!("needs root and /dev/fuse (root={root}, /dev/fuse={fuse})");
    if std::env::var_os("REDUN_SKIP_PRIVILEGED").is_some() {
        eprintln!("SKIPPED: ext4 on nbdfuse {why}");
        return false;
    }
    panic!("ext4 on nbdfuse {why}; set REDUN_SKIP_PRIVILEGED=1 to skip it explicitly");
}

/// A daemon this test started; killed by PID when dropped.
pub struct Daemon {
    pub child: Option<Child>,
    pub log: PathBuf,
}

impl Daemon {
    pub fn start(bin_name: &str, args: &[String], log: &Path) -> Daemon {
        Daemon::start_program(&bin(bin_name), args, log)
    }

    /// A daemon started through another program that execs it (`ip netns exec NS BIN ...`),
    /// so that its PID is the daemon's.
    pub fn start_program(program: &Path, args: &[String], log: &Path) -> Daemon {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = Command::new(program)
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .unwrap();
        Daemon {
            child: Some(child),
            log: log.to_path_buf(),
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(i32::try_from(self.child.as_ref().unwrap().id()).unwrap())
    }

    pub fn kill9(&mut self) {
        let mut c = self.child.take().unwrap();
        kill(self.pid_of(&c), Signal::SIGKILL).unwrap();
        let _ = c.wait();
    }

    pub fn pid_of(&self, c: &Child) -> Pid {
        Pid::from_raw(i32::try_from(c.id()).unwrap())
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = kill(self.pid_of(&c), Signal::SIGTERM);
            if wait_timeout(&mut c, Duration::from_secs(30)).is_none() {
                let _ = c.kill();
                let _ = c.wait();
                panic!(
                    "{} ignored SIGTERM:\n{}",
                    self.log.display(),
                    self.log_text()
                );
            }
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `redun pki init` in `dir` with a certificate for every name.
pub fn pki(dir: &Path, names: &[&str]) {
    let mut cmd = Command::new(bin("redun"));
    cmd.args(["pki", "init", "--dir"]).arg(dir);
    for n in names {
        cmd.args(["--name", n]);
    }
    run(&mut cmd);
}

/// A path as an argument.
pub fn s(p: &Path) -> String {
    p.display().to_string()
}
