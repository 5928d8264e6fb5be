//! SIGTERM under load: in-flight requests complete, acknowledged writes are on disk, and the
//! tracker exits 0.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

#[test]
fn sigterm_while_fio_writes() {
    require("fio");
    for backend in BACKENDS {
        let mut t = Tracker::start(backend, 256 << 20);
        let mut fio = Command::new("fio")
            .args([
                "--name=load",
                // One process: a kill reaches the job, not only its parent.
                "--thread",
                "--ioengine=nbd",
                "--rw=randwrite",
                "--bs=4k",
                "--iodepth=16",
                "--size=128m",
                "--time_based",
                "--runtime=30",
            ])
            .arg(format!("--uri={}", t.uri()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("fio");
        // Let fio get going.
        std::thread::sleep(Duration::from_secs(2));
        let st = t.stop();
        let log = t.log_text();
        let _ = fio.kill();
        let _ = fio.wait();
        assert!(st.success(), "{backend}: tracker exit {st}\n{log}");
        assert!(log.contains("finishing in-flight requests"), "{log}");
        assert!(log.contains("redun-tracker stopped"), "{log}");
        assert!(!log.contains("still busy"), "{log}");
    }
}

#[test]
fn sigterm_completes_in_flight_requests() {
    for backend in BACKENDS {
        let mut t = Tracker::start(backend, 64 << 20);
        let pid = t.pid().to_string();
        let out = python(
            "inflight_sigterm.py",
            &[&t.uri(), &pid, t.image.to_str().unwrap()],
        );
        let st = t
            .child
            .as_mut()
            .map(|c| wait_timeout(c, Duration::from_secs(30)));
        let st = st.flatten().expect("tracker did not exit after SIGTERM");
        t.child = None;
        assert!(st.success(), "{backend}: exit {st}\n{}", t.log_text());
        // The script checked that no write got an error; now every acknowledged write must
        // be in the backing file.
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let acked: Vec<u64> = text
            .lines()
            .filter_map(|l| l.strip_prefix("acked "))
            .map(|n| n.trim().parse().unwrap())
            .collect();
        assert!(
            !acked.is_empty(),
            "{backend}: no write was acknowledged: {text}"
        );
        let image = std::fs::read(&t.image).unwrap();
        for i in &acked {
            let off = usize::try_from(i * 4096).unwrap();
            let want = u8::try_from(i % 251 + 1).unwrap();
            assert!(
                image[off..off + 4096].iter().all(|&b| b == want),
                "{backend}: acknowledged write {i} is not on disk"
            );
        }
    }
}

/// A client writing through a tracker restart (SIGTERM, or kill -9) reconnects as soon as the
/// new process listens and reads back every write it had acknowledged: what an attached
/// kernel client with `nbd-client -persist` relies on during an upgrade.
#[test]
fn a_client_reconnects_after_a_restart_and_sees_every_acknowledged_write() {
    for (backend, crash) in [("uring", false), ("uring", true), ("sync", false)] {
        let mut t = Tracker::start(backend, 32 << 20);
        let ready = t.dir.path().join("writing");
        let client = python_spawn(
            "reconnect_after_restart.py",
            &[&t.uri(), ready.to_str().unwrap()],
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !ready.exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "the client never wrote"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(200));
        if crash {
            let mut c = t.child.take().unwrap();
            let _ = c.kill();
            let _ = c.wait();
        } else {
            assert!(t.stop().success(), "{}", t.log_text());
        }
        t.spawn(backend, &[]);
        let out = client.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "{backend} (kill -9: {crash}): {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let acked: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix("acked "))
            .and_then(|n| n.trim().parse().ok())
            .unwrap();
        eprintln!("{backend} (kill -9: {crash}): {}", text.replace('\n', "; "));
        assert!(acked >= 64, "{text}");
        assert!(text.contains("verified"), "{text}");
    }
}
