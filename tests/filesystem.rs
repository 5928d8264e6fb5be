//! A real ext4 filesystem on a redun export: nbdfuse exposes the export as a file, a loop
//! device turns it into a block device (this machine has no kernel NBD client).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Undoes the mount stack in reverse order, whatever happened to the test.
struct Stack {
    mnt: PathBuf,
    loopdev: Option<String>,
    fuse_dir: PathBuf,
    nbdfuse: Option<Child>,
}

impl Drop for Stack {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mnt).status();
        if let Some(l) = self.loopdev.take() {
            let _ = Command::new("losetup").arg("-d").arg(l).status();
        }
        let _ = Command::new("fusermount3")
            .arg("-u")
            .arg(&self.fuse_dir)
            .status();
        if let Some(mut c) = self.nbdfuse.take() {
            if wait_timeout(&mut c, Duration::from_secs(10)).is_none() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

fn privileged() -> bool {
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

#[test]
fn ext4_on_nbdfuse_and_loop() {
    if !privileged() {
        return;
    }
    require("nbdfuse");
    require("mkfs.ext4");
    for backend in BACKENDS {
        let mut t = Tracker::start(backend, 512 << 20);
        let fuse_dir = t.dir.path().join("nbdmnt");
        let mnt = t.dir.path().join("mnt");
        std::fs::create_dir_all(&fuse_dir).unwrap();
        std::fs::create_dir_all(&mnt).unwrap();
        let mut stack = Stack {
            mnt: mnt.clone(),
            loopdev: None,
            fuse_dir: fuse_dir.clone(),
            nbdfuse: None,
        };
        stack.nbdfuse = Some(
            Command::new("nbdfuse")
                .arg(&fuse_dir)
                .arg(t.uri())
                .stdout(Stdio::null())
                .spawn()
                .expect("nbdfuse"),
        );
        let node = fuse_dir.join("nbd");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !node.exists() {
            assert!(
                Instant::now() < deadline,
                "nbdfuse did not expose {}",
                node.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = run(Command::new("losetup")
            .args(["-f", "--show", "--direct-io=on"])
            .arg(&node));
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        stack.loopdev = Some(dev.clone());
        run(Command::new("mkfs.ext4").args(["-F", "-q", &dev]));
        run(Command::new("mount").arg(&dev).arg(&mnt));
        sh(&format!(
            "cd {m} && mkdir -p d && for i in $(seq 1 20); do head -c $((i * 997 * 1024)) /dev/urandom > d/f$i; done \
             && dd if=/dev/urandom of=big bs=1M count=64 status=none && sync && sha256sum d/* big > ../sums",
            m = mnt.display()
        ));
        drop(stack);
        let st = t.stop();
        assert!(st.success(), "{backend}: tracker exit {st}");
        // The backing file itself is a clean ext4 holding the same files.
        run(Command::new("e2fsck").arg("-fn").arg(&t.image));
        let ro = t.dir.path().join("ro");
        std::fs::create_dir_all(&ro).unwrap();
        run(Command::new("mount")
            .args(["-o", "ro,loop"])
            .arg(&t.image)
            .arg(&ro));
        let check = Command::new("bash")
            .arg("-c")
            .arg(format!(
                "cd {} && sha256sum -c --quiet ../sums",
                ro.display()
            ))
            .output()
            .unwrap();
        let _ = Command::new("umount").arg(&ro).status();
        assert!(
            check.status.success(),
            "{backend}: checksums differ: {}",
            String::from_utf8_lossy(&check.stdout)
        );
    }
}
