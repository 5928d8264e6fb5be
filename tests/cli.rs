//! The `redun` CLI and the tracker's flags, config file and start-up errors.

mod common;

use std::process::Command;

use common::*;

#[test]
fn status_reports_volumes_and_a_stopped_daemon() {
    let t = Tracker::start("sync", 16 << 20);
    let s = t.status_json();
    let st = &s["tracker"]["status"];
    assert_eq!(s["tracker"]["running"], true, "{s}");
    assert_eq!(st["daemon"], "tracker");
    assert_eq!(st["volumes"][0]["name"], EXPORT);
    assert_eq!(st["volumes"][0]["size"], 16 << 20);
    assert_eq!(st["volumes"][0]["engine"], "sync");
    for key in [
        "reads",
        "writes",
        "bytes_read",
        "bytes_written",
        "errors",
        "connections",
    ] {
        assert!(st["volumes"][0][key].is_u64(), "{key} missing: {s}");
    }
    let table = run(Command::new(bin("redun"))
        .args(["status", "--tracker-socket"])
        .arg(&t.admin));
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.contains("tracker: running"), "{table}");
    assert!(
        table.contains("disk") && table.contains("16.0 MiB"),
        "{table}"
    );

    let gone = t.dir.path().join("nobody.sock");
    let out = run(Command::new(bin("redun"))
        .args(["status", "--json", "--tracker-socket"])
        .arg(&gone));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["tracker"]["running"], false);
    assert!(
        v["tracker"]["error"]
            .as_str()
            .unwrap()
            .contains("not running"),
        "{v}"
    );
}

fn tracker_fails(args: &[&str]) -> String {
    let out = Command::new(bin("redun-tracker"))
        .args(args)
        .output()
        .unwrap();
    assert!(!out.status.success(), "{args:?} should fail");
    String::from_utf8_lossy(&out.stderr).to_string()
}

#[test]
fn bad_flags_and_config_name_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let admin = dir.path().join("a.sock");
    let admin = admin.to_str().unwrap();
    let e = tracker_fails(&["--volume", "novalue", "--admin-socket", admin]);
    assert!(e.contains("NAME=PATH"), "{e}");
    let e = tracker_fails(&["--volume", "v=/nonexistent/x.img", "--admin-socket", admin]);
    assert!(
        e.contains("/nonexistent/x.img") && e.contains("\"v\""),
        "{e}"
    );
    let e = tracker_fails(&["--admin-socket", admin]);
    assert!(e.contains("no volumes"), "{e}");
    let e = tracker_fails(&[
        "--volume",
        "v=/dev/null",
        "--backend",
        "turbo",
        "--admin-socket",
        admin,
    ]);
    assert!(e.contains("turbo"), "{e}");
    let img = dir.path().join("x.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let vol = format!("v={}", img.display());
    let e = tracker_fails(&[
        "--volume",
        &vol,
        "--listen",
        "nowhere",
        "--admin-socket",
        admin,
    ]);
    assert!(e.contains("nowhere"), "{e}");
    let jdir = dir.path().join("journals");
    let e = tracker_fails(&[
        "--volume",
        &vol,
        "--journal-dir",
        jdir.to_str().unwrap(),
        "--journal-size",
        "900T",
        "--admin-socket",
        admin,
    ]);
    assert!(
        e.contains("tracker.journal.size") && e.contains("free"),
        "{e}"
    );
    assert!(
        !jdir.exists(),
        "a journal that cannot fit left files behind"
    );
    let e = tracker_fails(&[
        "--volume",
        &vol,
        "--pre-hook",
        "w=true",
        "--admin-socket",
        admin,
    ]);
    assert!(e.contains("no volume \"w\""), "{e}");
    let e = tracker_fails(&[
        "--volume",
        &vol,
        "--crash-interval",
        "5",
        "--admin-socket",
        admin,
    ]);
    assert!(
        e.contains("--crash-interval") && e.contains("no unit"),
        "{e}"
    );
    let empty = dir.path().join("empty.img");
    std::fs::File::create(&empty).unwrap();
    let e = tracker_fails(&[
        "--volume",
        &format!("v={}", empty.display()),
        "--admin-socket",
        admin,
    ]);
    assert!(e.contains("is empty"), "{e}");
    let cfg = dir.path().join("redun.toml");
    std::fs::write(&cfg, "[tracker]\nlisten_on = [\"x\"]\n").unwrap();
    let e = tracker_fails(&["--config", cfg.to_str().unwrap()]);
    assert!(e.contains("listen_on") && e.contains("redun.toml"), "{e}");
}

#[test]
fn config_file_alone_starts_the_tracker() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("c.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let sock = dir.path().join("nbd.sock");
    let admin = dir.path().join("admin.sock");
    let cfg = dir.path().join("redun.toml");
    std::fs::write(
        &cfg,
        format!(
            "[tracker]\nlisten = [\"unix:{}\"]\nadmin_socket = \"{}\"\nbackend = \"sync\"\n\
             journal.dir = \"{}\"\njournal.size = \"2M\"\njournal.on_full = \"block\"\n\n\
             [[volume]]\nname = \"cfgvol\"\npath = \"{}\"\n",
            sock.display(),
            admin.display(),
            dir.path().join("journal").display(),
            img.display()
        ),
    )
    .unwrap();
    let mut child = Command::new(bin("redun-tracker"))
        .arg("--config")
        .arg(&cfg)
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !admin.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "tracker did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = run(Command::new(bin("redun"))
        .args(["status", "--json", "--tracker-socket"])
        .arg(&admin));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        v["tracker"]["status"]["volumes"][0]["name"], "cfgvol",
        "{v}"
    );
    assert_eq!(
        v["tracker"]["status"]["volumes"][0]["engine"], "sync",
        "{v}"
    );
    let j = &v["tracker"]["status"]["volumes"][0]["journal"];
    assert_eq!(j["on_full"], "block", "{v}");
    assert!(j["capacity"].as_u64().unwrap() < 2 << 20, "{v}");
    assert!(dir.path().join("journal/cfgvol.journal").exists());
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap()),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let st = wait_timeout(&mut child, std::time::Duration::from_secs(20)).expect("exit");
    assert!(st.success());
    assert!(!admin.exists(), "admin socket left behind");
}

#[test]
fn admin_socket_refuses_other_users() {
    if !nix::unistd::geteuid().is_root() {
        assert!(
            std::env::var_os("REDUN_SKIP_PRIVILEGED").is_some(),
            "needs root to act as another user; set REDUN_SKIP_PRIVILEGED=1 to skip it explicitly"
        );
        eprintln!("SKIPPED: admin socket permissions need root");
        return;
    }
    require("setpriv");
    let t = Tracker::start("sync", 1 << 20);
    let as_nobody = |socket: &std::path::Path| {
        let out = run(Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(bin("redun"))
            .args(["status", "--json", "--tracker-socket"])
            .arg(socket));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    // The socket is mode 0600: another user cannot even connect.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&t.admin).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    std::fs::set_permissions(t.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let v = as_nobody(&t.admin);
    assert!(
        v["tracker"]["error"]
            .as_str()
            .unwrap()
            .contains("permission denied"),
        "{v}"
    );
    // Even with the mode opened up by mistake, the peer credentials check refuses.
    std::fs::set_permissions(&t.admin, std::fs::Permissions::from_mode(0o666)).unwrap();
    let v = as_nobody(&t.admin);
    assert_eq!(v["tracker"]["running"], true, "{v}");
    assert!(
        v["tracker"]["error"]
            .as_str()
            .unwrap()
            .contains("Permission denied"),
        "{v}"
    );
    assert!(v["tracker"].get("status").is_none(), "{v}");
}

#[test]
fn config_check_accepts_the_example_and_names_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    run(Command::new(bin("redun"))
        .args(["pki", "init", "--dir"])
        .arg(d.join("pki"))
        .args(["--name", "web1", "--name", "dr-site.example.com"]));
    let img = d.join("db.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let example = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/redun.example.toml"),
    )
    .unwrap()
    .replace("/dev/sdb", &img.display().to_string())
    .replace("/etc/redun/pki", &d.join("pki").display().to_string())
    .replace("/var/lib/redun", &d.display().to_string())
    .replace("size = \"1G\"", "size = \"64M\"");
    let check = |text: &str| {
        let f = d.join("redun.toml");
        std::fs::write(&f, text).unwrap();
        let out = Command::new(bin("redun"))
            .args(["config", "check"])
            .arg(&f)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, err) = check(&example);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("valid") && out.contains("1 volume"), "{out}");
    for (bad, names) in [
        (
            example.replace(
                "compression_level = 3",
                "compression_level = 3\ntargett = \"x\"",
            ),
            vec!["targett"],
        ),
        (
            example.replace("size = \"64M\"", "size = \"1Q\""),
            vec!["tracker.journal.size", "1Q"],
        ),
        (
            example.replace(
                "bandwidth_limit = \"unlimited\"",
                "bandwidth_limit = \"fast\"",
            ),
            vec!["shipper.bandwidth_limit", "fast"],
        ),
        (
            example.replace(&img.display().to_string(), "/nonexistent/disk"),
            vec!["/nonexistent/disk", "volume.path"],
        ),
        (
            example.replace("size = \"64M\"", "size = \"900T\""),
            vec!["tracker.journal", "free"],
        ),
        (
            example.replace("listen = \"0.0.0.0:9443\"", "listen = \"everywhere\""),
            vec!["target.listen", "everywhere"],
        ),
        (
            example.clone() + "\n[groupp]\nname = \"x\"\n",
            vec!["groupp"],
        ),
        (
            example.replace("keep_all = \"2h\"", "keep_all = \"2 hours\""),
            vec!["retention.keep_all", "2 hours"],
        ),
        (
            example.replace("crash_interval = \"5s\"", "crash_interval = \"5\""),
            vec!["points.crash_interval", "no unit"],
        ),
        (
            example.replace("rpo_warning = \"30s\"", "rpo_warning = \"soon\""),
            vec!["shipper.rpo_warning", "soon"],
        ),
        (
            example.replace("127.0.0.1:9752", "localhost"),
            vec!["target.metrics.listen", "localhost"],
        ),
        (
            example.replace("127.0.0.1:9750", "port 9750"),
            vec!["tracker.metrics.listen", "port 9750"],
        ),
    ] {
        let (code, out, err) = check(&bad);
        assert_eq!(code, Some(1), "{out}{err}");
        for n in names {
            assert!(err.contains(n), "{n:?} not named in: {err}");
        }
    }
}

#[test]
fn the_target_runs_from_its_config_section_and_names_what_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    run(Command::new(bin("redun"))
        .args(["pki", "init", "--dir"])
        .arg(d.join("pki"))
        .args(["--name", "localhost"]));
    let p = |f: &str| d.join(f).display().to_string();
    let cfg = d.join("redun.toml");
    std::fs::write(
        &cfg,
        format!(
            "[tracker]\n[target]\ndata_dir = \"{}\"\nlisten = \"127.0.0.1:0\"\n\
             tls_ca = \"{}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\nadmin_socket = \"{}\"\n\
             nbd_listen = \"127.0.0.1:0\"\n",
            p("data"),
            p("pki/ca.crt"),
            p("pki/localhost.crt"),
            p("pki/localhost.key"),
            p("target.sock")
        ),
    )
    .unwrap();
    let mut child = Command::new(bin("redun-target"))
        .arg("--config")
        .arg(&cfg)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !d.join("target.sock").exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the target did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(d.join("data").is_dir());
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap()),
        nix::sys::signal::Signal::SIGTERM,
    );
    assert!(
        wait_timeout(&mut child, std::time::Duration::from_secs(20)).is_some_and(|s| s.success())
    );
    // Without a data directory anywhere, the target says which flag or key to give.
    std::fs::write(&cfg, "[target]\nlisten = \"127.0.0.1:0\"\n").unwrap();
    let out = Command::new(bin("redun-target"))
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("--tls-ca") && err.contains("target.tls_ca"),
        "{err}"
    );
}
