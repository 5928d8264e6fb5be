//! systemd integration: the install script (DESTDIR, --uninstall), the unit files
//! (`systemd-analyze verify`), and `Type=notify` readiness and watchdog pings.

mod common;

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn repo() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn install_puts_everything_under_destdir_and_uninstall_takes_it_away() {
    require("systemd-analyze");
    let dest = tempfile::tempdir().unwrap();
    let d = dest.path();
    let out = run(Command::new("bash")
        .arg(repo().join("scripts/install.sh"))
        .env("DESTDIR", d)
        .env("PREFIX", "/opt/redun")
        .env("BIN_DIR", bin_dir()));
    assert!(String::from_utf8_lossy(&out.stdout).contains("installed"));
    for f in [
        "opt/redun/bin/redun",
        "opt/redun/bin/redun-tracker",
        "opt/redun/bin/redun-shipper",
        "opt/redun/bin/redun-target",
        "etc/redun/redun.toml.example",
        "etc/systemd/system/redun-tracker.service",
        "etc/systemd/system/redun-shipper.service",
        "etc/systemd/system/redun-target.service",
        "etc/systemd/system/redun-nbd@.service",
        "opt/redun/share/doc/redun/CONFIG.md",
    ] {
        assert!(d.join(f).is_file(), "{f} was not installed");
    }
    // The units point at the installed binaries, and systemd finds nothing else to say.
    let unit = std::fs::read_to_string(d.join("etc/systemd/system/redun-tracker.service")).unwrap();
    assert!(unit.contains("ExecStart=/opt/redun/bin/redun-tracker --config /etc/redun/redun.toml"));
    assert!(unit.contains("Type=notify"));
    for u in [
        "redun-tracker",
        "redun-shipper",
        "redun-target",
        "redun-nbd@",
    ] {
        let out = Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(repo().join(format!("scripts/systemd/{u}.service")))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stderr).into_owned()
            + &String::from_utf8_lossy(&out.stdout);
        let other: Vec<&str> = text
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.contains("is not executable"))
            .collect();
        assert!(other.is_empty(), "{u}.service: {other:?}");
    }
    // Someone's own config beside the example is never touched.
    std::fs::write(d.join("etc/redun/redun.toml"), "# mine\n").unwrap();
    run(Command::new("bash")
        .arg(repo().join("scripts/install.sh"))
        .arg("--uninstall")
        .env("DESTDIR", d)
        .env("PREFIX", "/opt/redun"));
    let left: Vec<_> = walk(d);
    assert_eq!(
        left,
        vec![d.join("etc/redun/redun.toml")],
        "left behind: {left:?}"
    );
}

fn walk(d: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(d).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn the_tracker_notifies_ready_after_its_sockets_pings_the_watchdog_and_says_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let notify = UnixDatagram::bind(d.join("notify.sock")).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let img = d.join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let mut child = Command::new(bin("redun-tracker"))
        .arg("--volume")
        .arg(format!("disk={}", img.display()))
        .arg("--listen")
        .arg(format!("unix:{}", d.join("nbd.sock").display()))
        .arg("--admin-socket")
        .arg(d.join("admin.sock"))
        .arg("--journal-dir")
        .arg(d.join("journal"))
        .args(["--journal-size", "8M"])
        .env("NOTIFY_SOCKET", d.join("notify.sock"))
        .env("WATCHDOG_USEC", "200000")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut ready_seen_with_sockets = None;
    while Instant::now() < deadline
        && got
            .iter()
            .filter(|m: &&String| m.contains("WATCHDOG=1"))
            .count()
            < 2
    {
        let mut buf = [0u8; 4096];
        if let Ok(n) = notify.recv(&mut buf) {
            let m = String::from_utf8_lossy(&buf[..n]).into_owned();
            if m.contains("READY=1") {
                ready_seen_with_sockets =
                    Some(d.join("admin.sock").exists() && d.join("nbd.sock").exists());
            }
            got.push(m);
        }
    }
    assert_eq!(ready_seen_with_sockets, Some(true), "{got:?}");
    assert!(
        got.iter().any(|m| m.contains("STATUS=1 volume(s)")),
        "{got:?}"
    );
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap()),
        nix::sys::signal::Signal::SIGTERM,
    );
    let mut stopping = false;
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline && !stopping {
        let mut buf = [0u8; 4096];
        if let Ok(n) = notify.recv(&mut buf) {
            stopping = String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1");
        }
    }
    assert!(stopping, "no STOPPING=1 after SIGTERM");
    assert!(wait_timeout(&mut child, Duration::from_secs(30)).is_some_and(|s| s.success()));
}
