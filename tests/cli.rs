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
    .replace("size = \"4G\"", "size = \"64M\"");
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
    // Each mistake, made alone in the example, and the one line that names it: {P} is the
    // file, {L} the number of the line the mistake is on.
    let table: &[(&str, &str, &str)] = &[
        (
            "backend = \"auto\"",
            "backend = \"fast\"",
            "config {P}: line {L}: backend = \"fast\": unknown variant `fast`, expected one of `auto`, `uring`, `sync`",
        ),
        (
            "on_full = \"bitmap\"",
            "on_full = \"drop\"",
            "config {P}: line {L}: on_full = \"drop\": unknown variant `drop`, expected `bitmap` or `block`",
        ),
        (
            "full_percent = 100",
            "full_percent = 0",
            "config {P}: tracker.journal.full_percent = 0: expected a percentage from 1 to 100",
        ),
        (
            "region_size = \"64K\"",
            "region_size = \"3K\"",
            "config {P}: tracker.journal.region_size: region size 3072: expected a power of two from 4K to 4M, e.g. 64K",
        ),
        (
            "size = \"64M\"",
            "size = \"1Q\"",
            "config {P}: tracker.journal.size: size \"1Q\": unknown unit \"q\" (use K, M, G or T)",
        ),
        (
            "listen = [\"127.0.0.1:10809\"]",
            "listen = [\"nowhere\"]",
            "config {P}: tracker.listen (--listen): \"nowhere\" is neither HOST:PORT nor unix:/path (invalid socket address syntax)",
        ),
        (
            "127.0.0.1:9750",
            "port 9750",
            "config {P}: tracker.metrics.listen = \"port 9750\": invalid socket address syntax (expected IP:PORT, e.g. 127.0.0.1:9750)",
        ),
        (
            "name = \"db\"",
            "name = \"d b\"",
            "config {P}: volume name \"d b\" is invalid: use 1 to 64 characters of A-Z a-z 0-9 - _ .",
        ),
        (
            "crash_interval = \"5s\"",
            "crash_interval = \"5\"",
            "config {P}: points.crash_interval = \"5\": \"5\" has no unit: write e.g. 500ms, 5s, 10m, 2h or 7d",
        ),
        (
            "compression_level = 3",
            "compression_level = 30",
            "config {P}: shipper.compression_level = 30: use 1 to 19",
        ),
        (
            "batch_size = \"4M\"",
            "batch_size = \"4X\"",
            "config {P}: shipper.batch_size = \"4X\": size \"4X\": unknown unit \"x\" (use K, M, G or T)",
        ),
        (
            "generation = 1",
            "generation = \"one\"",
            "config {P}: line {L}: generation = \"one\": invalid type: string \"one\", expected u64",
        ),
        (
            "bandwidth_limit = \"unlimited\"",
            "bandwidth_limit = \"fast\"",
            "config {P}: shipper.bandwidth_limit = \"fast\": rate \"fast\": expected e.g. 50MiB/s, 800K/s or unlimited",
        ),
        (
            "window = \"08:00-18:00\"",
            "window = \"8-18\"",
            "config {P}: shipper.bandwidth_schedule[0].window = \"8-18\": window \"8-18\": expected HH:MM-HH:MM, e.g. 08:00-18:00",
        ),
        (
            "rpo_warning = \"30s\"",
            "rpo_warning = \"soon\"",
            "config {P}: shipper.rpo_warning = \"soon\": \"soon\" is not a duration: write e.g. 500ms, 5s, 10m, 2h or 7d",
        ),
        (
            "127.0.0.1:9751",
            "localhost",
            "config {P}: shipper.metrics.listen = \"localhost\": invalid socket address syntax (expected IP:PORT, e.g. 127.0.0.1:9750)",
        ),
        (
            "listen = \"0.0.0.0:9443\"",
            "listen = \"everywhere\"",
            "config {P}: target.listen = \"everywhere\": invalid socket address syntax (expected IP:PORT, e.g. 0.0.0.0:9443)",
        ),
        (
            "nbd_listen = \"127.0.0.1:10810\"",
            "nbd_listen = \"anywhere\"",
            "config {P}: target.nbd_listen = \"anywhere\": \"anywhere\" is neither HOST:PORT nor unix:/path (invalid socket address syntax)",
        ),
        (
            "segment_size = \"64MiB\"",
            "segment_size = \"big\"",
            "config {P}: target.segment_size = \"big\": size \"big\": expected a number with an optional unit, e.g. 1G",
        ),
        (
            "keep_all = \"2h\"",
            "keep_all = \"2 hours\"",
            "config {P}: retention.keep_all = \"2 hours\": \"2 hours\": unknown unit \" hours\" (use ms, s, m, h or d)",
        ),
        (
            "{ every = \"10m\", for = \"24h\" }",
            "{ every = \"0s\", for = \"24h\" }",
            "config {P}: retention.tiers[0].every = \"0s\": must be longer than 0",
        ),
        (
            "[[shipper.bandwidth_schedule]]",
            "[shipper]\n[[shipper.bandwidth_schedule]]",
            "config {P}: line {L}: [shipper]: invalid table header duplicate key `shipper` in document root",
        ),
        (
            "[target]",
            "[targett]",
            "config {P}: line {L}: [targett]: unknown field `targett`, expected one of `tracker`, `volume`, `shipper`, `target`, `points`, `retention`, `resync`, `group`, `bucket`",
        ),
        (
            "allow_http = false",
            "allow_htp = false",
            "config {P}: line {L}: allow_htp = false: unknown field `allow_htp`, expected one of `endpoint`, `region`, `access_key_id`, `secret_access_key`, `account`, `access_key`, `allow_http`",
        ),
        (
            "window = \"22:00-06:00\"",
            "window = \"nights\"",
            "config {P}: resync.window = \"nights\": window \"nights\": expected HH:MM-HH:MM, e.g. 08:00-18:00",
        ),
        (
            "block_size = \"64K\"",
            "block_size = \"60K\"",
            "config {P}: resync.block_size = \"60K\": expected a power of two from 4K to 4M, e.g. 64K",
        ),
    ];
    assert!(table.len() >= 15);
    let file = d.join("redun.toml").display().to_string();
    for (from, to, want) in table {
        assert_eq!(
            example.matches(from).count(),
            1,
            "{from:?} is not once in the example"
        );
        let bad = example.replacen(from, to, 1);
        let line = bad[..bad.find(to).unwrap()].matches('\n').count() + 1;
        let want = want.replace("{P}", &file).replace("{L}", &line.to_string());
        let (code, out, err) = check(&bad);
        assert_eq!(code, Some(1), "{to}: {out}{err}");
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines, vec![format!("error: {want}")], "{to}");
    }
    // What depends on the machine: the free space, files that are not there.
    for (bad, names) in [
        (
            example.replace("size = \"64M\"", "size = \"900T\""),
            vec!["tracker.journal.size", "free"],
        ),
        (
            example.replace(&img.display().to_string(), "/nonexistent/disk"),
            vec!["/nonexistent/disk", "volume.path"],
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
    // A target that refuses to start with config `text`: what it says.
    let refused = |text: String| {
        std::fs::write(&cfg, text).unwrap();
        let out = Command::new(bin("redun-target"))
            .arg("--config")
            .arg(&cfg)
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    // Without a data directory anywhere, the target says which flag or key to give.
    let err = refused("[target]\nlisten = \"127.0.0.1:0\"\n".into());
    assert!(
        err.contains("--data-dir") && err.contains("target.data_dir"),
        "{err}"
    );
    // With one, the TLS files are named next (shippers connect unless --store is given).
    let err = refused(format!("[target]\ndata_dir = {:?}\n", d.join("data")));
    assert!(
        err.contains("--tls-ca") && err.contains("target.tls_ca"),
        "{err}"
    );
}
