//! A real ext4 filesystem on a redun export: nbdfuse exposes the export as a file, a loop
//! device turns it into a block device (this machine has no kernel NBD client).

mod common;

use std::process::Command;

use common::*;

#[test]
fn ext4_on_nbdfuse_and_loop() {
    if !privileged() {
        return;
    }
    require("nbdfuse");
    require("mkfs.ext4");
    for backend in BACKENDS {
        let mut t = Tracker::start(backend, 512 << 20);
        let stack = Stack::attach(&t.uri(), t.dir.path(), false);
        let mnt = stack.mnt.clone();
        let dev = stack.dev().to_string();
        run(Command::new("mkfs.ext4").args(["-F", "-q", &dev]));
        stack.mount("");
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
