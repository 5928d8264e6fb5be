//! NBD conformance of redun-tracker against real clients (libnbd's nbdinfo, nbdsh's Python
//! bindings and nbdcopy; qemu-io and qemu-img), each run on both I/O engines.

mod common;

use std::process::Command;

use common::*;

const GIB: u64 = 1 << 30;

#[test]
fn nbdinfo_reports_size_and_capabilities() {
    require("nbdinfo");
    for backend in BACKENDS {
        let t = Tracker::start(backend, GIB);
        let out = run(Command::new("nbdinfo").arg("--json").arg(t.uri()));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let e = &v["exports"][0];
        assert_eq!(e["export-size"], GIB, "{v}");
        assert_eq!(e["export-name"], EXPORT);
        assert_eq!(v["protocol"], "newstyle-fixed");
        assert_eq!(e["block_size_maximum"], 32 << 20);
        for can in [
            "flush",
            "fua",
            "trim",
            "zero",
            "fast-zero",
            "df",
            "cache",
            "multi-conn",
            "structured-reply",
        ] {
            let st = Command::new("nbdinfo")
                .args(["--can", can])
                .arg(t.uri())
                .status()
                .unwrap();
            assert!(st.success(), "{backend}: nbdinfo --can {can} is false");
        }
        let st = Command::new("nbdinfo")
            .args(["--is", "read-only"])
            .arg(t.uri())
            .status()
            .unwrap();
        assert_eq!(
            st.code(),
            Some(2),
            "{backend}: export must not be read-only"
        );
        let list = run(Command::new("nbdinfo").arg("--list").arg(t.uri()));
        assert!(String::from_utf8_lossy(&list.stdout).contains("export=\"disk\""));
    }
}

#[test]
fn libnbd_conformance_script() {
    for backend in BACKENDS {
        let t = Tracker::start(backend, GIB);
        let out = python("nbd_conformance.py", &[&t.uri()]);
        assert!(String::from_utf8_lossy(&out.stdout).contains("conformance ok"));
        let s = t.status_json();
        let vol = &s["tracker"]["status"]["volumes"][0];
        assert!(vol["writes"].as_u64().unwrap() > 64, "{s}");
        assert!(vol["errors"].as_u64().unwrap() >= 7, "{s}");
    }
}

#[test]
fn libnbd_option_negotiation() {
    for backend in BACKENDS {
        let t = Tracker::start(backend, GIB);
        let out = python("nbd_options.py", &[t.sock.to_str().unwrap(), EXPORT]);
        assert!(String::from_utf8_lossy(&out.stdout).contains("options ok"));
    }
}

#[test]
fn nbdcopy_round_trip_256mib_multi_conn() {
    require("nbdcopy");
    for backend in BACKENDS {
        let t = Tracker::start(backend, 256 << 20);
        let src = t.dir.path().join("src.raw");
        let back = t.dir.path().join("back.raw");
        sh(&format!("head -c 256M /dev/urandom > {}", src.display()));
        run(Command::new("nbdcopy")
            .args(["--connections=4", "--requests=16", "--flush"])
            .arg(&src)
            .arg(t.uri()));
        run(Command::new("nbdcopy")
            .args(["--connections=4", "--requests=16"])
            .arg(t.uri())
            .arg(&back));
        run(Command::new("cmp").arg(&src).arg(&back));
        run(Command::new("cmp").arg(&src).arg(&t.image));
    }
}

#[test]
fn qemu_io_script() {
    require("qemu-io");
    for backend in BACKENDS {
        let t = Tracker::start(backend, GIB);
        let out = run(Command::new("qemu-io")
            .args(["-f", "raw"])
            .arg(t.uri())
            .args([
                "-c",
                "write -P 0xab 0 64k",
                "-c",
                "read -P 0xab 0 64k",
                "-c",
                "write -f -P 0xcd 64k 4k",
                "-c",
                "read -P 0xcd 64k 4k",
                "-c",
                "flush",
                "-c",
                "write -P 0x11 128k 64k",
                "-c",
                "discard 128k 64k",
                "-c",
                "write -z 256k 64k",
                "-c",
                "read -P 0 256k 64k",
                "-c",
                "write -z -u 320k 64k",
                "-c",
                "read -P 0 320k 64k",
                "-c",
                "write -P 0x5a 1000 333",
                "-c",
                "read -P 0x5a 1000 333",
                "-c",
                "aio_write -P 0x77 1M 64k",
                "-c",
                "aio_write -P 0x78 2M 64k",
                "-c",
                "aio_flush",
                "-c",
                "read -P 0x77 1M 64k",
                "-c",
                "read -P 0x78 2M 64k",
                "-c",
                "map",
            ]));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(!text.contains("failed"), "{backend}: {text}");
        assert!(text.contains("allocated at offset"), "{backend}: {text}");
        // A failed pattern check must fail the tool, or the checks above prove nothing.
        let bad = Command::new("qemu-io")
            .args(["-f", "raw"])
            .arg(t.uri())
            .args(["-c", "read -P 0xee 0 4k"])
            .output()
            .unwrap();
        assert!(String::from_utf8_lossy(&bad.stdout).contains("Pattern verification failed"));
        let map = run(Command::new("qemu-img")
            .args(["map", "-f", "raw", "--output=json"])
            .arg(t.uri()));
        let map: serde_json::Value = serde_json::from_slice(&map.stdout).unwrap();
        let zero_tail = map.as_array().unwrap().iter().any(|e| {
            let (start, len) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
            e["zero"] == true && e["data"] == false && start <= 512 << 20 && 512 << 20 < start + len
        });
        assert!(zero_tail, "{backend}: block status shows no hole: {map}");
    }
}

#[test]
fn qemu_img_convert_in_and_out() {
    require("qemu-img");
    for backend in BACKENDS {
        let t = Tracker::start(backend, 128 << 20);
        let src = t.dir.path().join("src.raw");
        let out = t.dir.path().join("out.qcow2");
        let back = t.dir.path().join("back.raw");
        // Data with holes in it, so both data and zero extents travel.
        sh(&format!(
            "truncate -s 128M {0} && head -c 8M /dev/urandom | dd of={0} bs=1M seek=3 conv=notrunc status=none \
             && head -c 1M /dev/urandom | dd of={0} bs=1M seek=100 conv=notrunc status=none",
            src.display()
        ));
        run(Command::new("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&src)
            .arg(t.uri()));
        run(Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "qcow2"])
            .arg(t.uri())
            .arg(&out));
        run(Command::new("qemu-img")
            .args(["convert", "-f", "qcow2", "-O", "raw"])
            .arg(&out)
            .arg(&back));
        run(Command::new("cmp").arg(&src).arg(&back));
        run(Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&src)
            .arg(t.uri()));
    }
}

#[test]
fn tcp_listener_serves_the_same_export() {
    require("nbdinfo");
    let t = Tracker::start_with("uring", GIB, &["--listen", "127.0.0.1:0"]);
    let addr = t.tcp.clone().expect("TCP address in the ready line");
    let out = run(Command::new("nbdinfo")
        .arg("--size")
        .arg(format!("nbd://{addr}/{EXPORT}")));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), GIB.to_string());
    let s = t.status_json();
    let listen = s["tracker"]["status"]["listen"].to_string();
    assert!(listen.contains(&addr), "{listen}");
}
