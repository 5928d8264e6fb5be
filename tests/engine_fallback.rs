//! With io_uring disabled by the kernel (`kernel.io_uring_disabled=2`), `--backend auto`
//! falls back to the synchronous engine with a warning, and `--backend uring` refuses to start
//! with a message that says what to do. Alone in its test binary because the sysctl is
//! machine-wide; it restores the previous value.

mod common;

use std::path::Path;

use common::*;

const SYSCTL: &str = "/proc/sys/kernel/io_uring_disabled";

struct Restore(String);

impl Drop for Restore {
    fn drop(&mut self) {
        let _ = std::fs::write(SYSCTL, &self.0);
    }
}

#[test]
fn auto_falls_back_to_sync_when_io_uring_is_disabled() {
    let writable = Path::new(SYSCTL).exists() && nix::unistd::geteuid().is_root();
    if !writable {
        assert!(
            std::env::var_os("REDUN_SKIP_PRIVILEGED").is_some(),
            "needs root and {SYSCTL}; set REDUN_SKIP_PRIVILEGED=1 to skip it explicitly"
        );
        eprintln!("SKIPPED: io_uring fallback needs root and {SYSCTL}");
        return;
    }
    let before = std::fs::read_to_string(SYSCTL).unwrap().trim().to_string();
    let _restore = Restore(before);
    std::fs::write(SYSCTL, "2").unwrap();

    let t = Tracker::start("auto", 1 << 30);
    let s = t.status_json();
    assert_eq!(
        s["tracker"]["status"]["volumes"][0]["engine"], "sync",
        "{s}"
    );
    assert!(
        t.log_text().contains("using the synchronous backend"),
        "{}",
        t.log_text()
    );
    python("nbd_conformance.py", &[&t.uri()]);
    drop(t);

    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("v.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let out = std::process::Command::new(bin("redun-tracker"))
        .arg("--volume")
        .arg(format!("v={}", img.display()))
        .args(["--backend", "uring", "--admin-socket"])
        .arg(dir.path().join("a.sock"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("io_uring is not usable") && err.contains("--backend sync"),
        "{err}"
    );
}
