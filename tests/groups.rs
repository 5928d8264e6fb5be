//! Consistency groups end to end: three members in three network namespaces, each with its
//! own tracker and shipper, one target in a fourth, all joined by a bridge in a fifth. The
//! group's points must be causally consistent cuts across the members.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use redun_tracker::admin::request_json;

const VOL: u64 = 16 << 20;

/// Namespaces joined by a bridge: `hosts[i]` has address `ip(i)`.
struct Net {
    hub: String,
    hosts: Vec<String>,
    prefix: String,
}

impl Net {
    fn new(n: usize) -> Net {
        // Tests of one binary run in parallel: each net gets its own names and subnet.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n_net = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let tag = format!("{}x{n_net}", std::process::id() % 10_000);
        let prefix = format!("10.97.{}", (std::process::id() * 3 + n_net) % 200 + 20);
        let net = Net {
            hub: format!("rg{tag}h"),
            hosts: (0..n).map(|i| format!("rg{tag}n{i}")).collect(),
            prefix,
        };
        let mut script = format!(
            "ip netns add {hub} && ip -n {hub} link add br0 type bridge && \
             ip -n {hub} link set br0 up",
            hub = net.hub
        );
        for (i, h) in net.hosts.iter().enumerate() {
            script += &format!(
                " && ip netns add {h} && ip link add v{tag}n{i} type veth peer name p{tag}n{i} && \
                 ip link set v{tag}n{i} netns {h} && ip link set p{tag}n{i} netns {hub} && \
                 ip -n {hub} link set p{tag}n{i} master br0 && ip -n {hub} link set p{tag}n{i} up && \
                 ip -n {h} addr add {ip}/24 dev v{tag}n{i} && ip -n {h} link set v{tag}n{i} up && \
                 ip -n {h} link set lo up",
                hub = net.hub,
                ip = net.ip(i)
            );
        }
        sh(&script);
        net
    }

    fn ip(&self, i: usize) -> String {
        format!("{}.{}", self.prefix, i + 1)
    }

    /// `ip netns exec HOST BIN ARGS...` as arguments of `ip`.
    fn exec(&self, i: usize, bin_name: &str, args: &[String]) -> Vec<String> {
        netns_exec(&self.hosts[i], bin_name, args)
    }

    /// Drops every packet to and from host `i` (a partition), or lets them pass again.
    fn cut(&self, i: usize, on: bool) {
        let h = &self.hosts[i];
        if on {
            sh(&format!(
                "ip netns exec {h} nft add table inet cut && \
                 ip netns exec {h} nft add chain inet cut in '{{ type filter hook input priority 0; }}' && \
                 ip netns exec {h} nft add rule inet cut in iifname != lo drop && \
                 ip netns exec {h} nft add chain inet cut out '{{ type filter hook output priority 0; }}' && \
                 ip netns exec {h} nft add rule inet cut out oifname != lo drop"
            ));
        } else {
            sh(&format!("ip netns exec {h} nft delete table inet cut"));
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for h in self.hosts.iter().chain(std::iter::once(&self.hub)) {
            let _ = Command::new("ip").args(["netns", "del", h]).status();
        }
    }
}

/// One member: a tracker (in its namespace) on a volume, and its shipper.
struct Member {
    tracker: Option<Daemon>,
    shipper: Option<Daemon>,
    config: PathBuf,
    admin: PathBuf,
    nbd: PathBuf,
    shipper_admin: PathBuf,
    journal: PathBuf,
    name: String,
}

/// The group: a target, members, their certificates, in one temporary directory.
struct Group {
    net: Net,
    dir: tempfile::TempDir,
    members: Vec<Member>,
    target: Option<Daemon>,
    /// Index of the target's host in `net`.
    target_host: usize,
    opts: Opts,
}

/// What the members' configs say.
struct Opts {
    /// `group.interval`.
    interval: String,
    /// `group.timeout`.
    timeout: String,
    /// More keys of `[points]`.
    points: String,
    /// More keys of member `i`'s `[[volume]]`, given the group's directory.
    volume: fn(&Path, usize) -> String,
}

impl Group {
    /// `n` members with one volume each, group points every `interval`.
    fn start(n: usize, interval: &str) -> Group {
        let opts = Opts {
            interval: interval.into(),
            timeout: "50ms".into(),
            points: String::new(),
            volume: |_, _| String::new(),
        };
        Group::start_with(n, opts)
    }

    fn start_with(n: usize, opts: Opts) -> Group {
        require("ip");
        require("nft");
        let net = Net::new(n + 1);
        let dir = tempfile::Builder::new()
            .prefix("redun-group-")
            .tempdir_in(std::env::var_os("REDUN_TEST_TMP").unwrap_or_else(|| "/tmp".into()))
            .unwrap();
        let d = dir.path().to_path_buf();
        let names: Vec<String> = (1..=n).map(|i| format!("m{i}")).collect();
        let mut certs: Vec<&str> = names.iter().map(String::as_str).collect();
        certs.push("target");
        pki(&d.join("pki"), &certs);
        let target_host = n;
        let mut g = Group {
            net,
            dir,
            members: Vec::new(),
            target: None,
            target_host,
            opts,
        };
        g.start_target();
        for i in 0..n {
            let m = g.member_files(i, n);
            g.members.push(m);
            g.start_tracker(i);
            g.start_shipper(i);
        }
        g
    }

    fn dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    fn start_target(&mut self) {
        let d = self.dir();
        let args = self.net.exec(
            self.target_host,
            "redun-target",
            &[
                "--data-dir".into(),
                s(&d.join("data")),
                "--listen".into(),
                format!("{}:9443", self.net.ip(self.target_host)),
                "--tls-ca".into(),
                s(&d.join("pki/ca.crt")),
                "--tls-cert".into(),
                s(&d.join("pki/target.crt")),
                "--tls-key".into(),
                s(&d.join("pki/target.key")),
                "--admin-socket".into(),
                s(&d.join("target.sock")),
                "--nbd-listen".into(),
                format!("unix:{}", s(&d.join("target-nbd.sock"))),
            ],
        );
        self.target = Some(Daemon::start_program(
            Path::new("ip"),
            &args,
            &d.join("target.log"),
        ));
        wait_for(&d.join("target.sock"), "the target's admin socket");
    }

    /// Member `i`'s files and config: volume `vI`, group member id `I`.
    fn member_files(&self, i: usize, n: usize) -> Member {
        let d = self.dir().join(format!("m{}", i + 1));
        std::fs::create_dir_all(&d).unwrap();
        let image = d.join("disk.img");
        std::fs::File::create(&image).unwrap().set_len(VOL).unwrap();
        let pki = self.dir().join("pki");
        let name = format!("m{}", i + 1);
        let mut toml = format!(
            "[tracker]\nlisten = [\"unix:{nbd}\"]\nadmin_socket = \"{admin}\"\n\
             metrics.listen = \"127.0.0.1:9752\"\n\
             [tracker.journal]\ndir = \"{journal}\"\nsize = \"64M\"\n\
             [points]\ncrash_interval = \"0\"\n{points}\
             [[volume]]\nname = \"v{id}\"\npath = \"{image}\"\n{volume}\
             [group]\nname = \"g\"\nid = {id}\nlisten = \"{ip}:20004\"\ninterval = \"{interval}\"\n\
             timeout = \"{timeout}\"\ntls_ca = \"{ca}\"\ntls_cert = \"{cert}\"\ntls_key = \"{key}\"\n",
            nbd = s(&d.join("nbd.sock")),
            admin = s(&d.join("tracker.sock")),
            journal = s(&d.join("journal")),
            id = i + 1,
            image = s(&image),
            points = self.opts.points,
            volume = (self.opts.volume)(&self.dir(), i),
            interval = self.opts.interval,
            timeout = self.opts.timeout,
            ip = self.net.ip(i),
            ca = s(&pki.join("ca.crt")),
            cert = s(&pki.join(format!("{name}.crt"))),
            key = s(&pki.join(format!("{name}.key"))),
        );
        for j in 0..n {
            toml += &format!(
                "[[group.member]]\nid = {}\naddress = \"{}:20004\"\nname = \"m{}\"\n",
                j + 1,
                self.net.ip(j),
                j + 1
            );
        }
        let config = d.join("redun.toml");
        std::fs::write(&config, toml).unwrap();
        Member {
            tracker: None,
            shipper: None,
            config,
            admin: d.join("tracker.sock"),
            nbd: d.join("nbd.sock"),
            shipper_admin: d.join("shipper.sock"),
            journal: d.join("journal"),
            name,
        }
    }

    fn start_tracker(&mut self, i: usize) {
        let m = &self.members[i];
        let args = self
            .net
            .exec(i, "redun-tracker", &["--config".into(), s(&m.config)]);
        let log = m.config.with_file_name("tracker.log");
        // A killed tracker leaves its socket: wait for the new one.
        let _ = std::fs::remove_file(&m.admin);
        let t = Daemon::start_program(Path::new("ip"), &args, &log);
        wait_for(&m.admin, "a member's admin socket");
        self.members[i].tracker = Some(t);
    }

    fn start_shipper(&mut self, i: usize) {
        let d = self.dir();
        let m = &self.members[i];
        let args = self.net.exec(
            i,
            "redun-shipper",
            &[
                "--journal-dir".into(),
                s(&m.journal),
                "--tracker-socket".into(),
                s(&m.admin),
                "--target".into(),
                format!("{}:9443", self.net.ip(self.target_host)),
                "--target-name".into(),
                "target".into(),
                "--tls-ca".into(),
                s(&d.join("pki/ca.crt")),
                "--tls-cert".into(),
                s(&d.join(format!("pki/{}.crt", m.name))),
                "--tls-key".into(),
                s(&d.join(format!("pki/{}.key", m.name))),
                "--admin-socket".into(),
                s(&m.shipper_admin),
                "--retry-unit-ms".into(),
                "100".into(),
            ],
        );
        let log = m.config.with_file_name("shipper.log");
        let sh = Daemon::start_program(Path::new("ip"), &args, &log);
        self.members[i].shipper = Some(sh);
    }

    fn tracker_status(&self, i: usize) -> serde_json::Value {
        request_json(
            &self.members[i].admin,
            &serde_json::json!({"cmd": "status"}),
        )
        .expect("tracker status")["status"]
            .clone()
    }

    /// Waits until every member's shipper has the target acknowledge every record its journal
    /// held when the wait began (group points go on adding records meanwhile, and the target
    /// commits a trickle of small batches a few times a second, so the head itself is a
    /// moving mark).
    fn wait_caught_up(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        for m in &self.members {
            let head = request_json(&m.admin, &serde_json::json!({"cmd": "status"}))
                .ok()
                .and_then(|v| v["status"]["volumes"][0]["journal"]["head_seq"].as_u64())
                .expect("the tracker's status has a journal head");
            loop {
                let acked = request_json(&m.shipper_admin, &serde_json::json!({"cmd": "status"}))
                    .ok()
                    .and_then(|v| v["status"]["volumes"][0]["acked_seq"].as_u64());
                if acked.is_some_and(|a| a >= head) {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "member {} did not catch up: head {head} acked {acked:?}\n{}",
                    m.name,
                    m.shipper.as_ref().map(Daemon::log_text).unwrap_or_default()
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    /// The group's points as `redun points --group g --json` lists them.
    fn group_points(&self) -> Vec<serde_json::Value> {
        let out = run(Command::new(bin("redun"))
            .args(["points", "--group", "g", "--json", "--target-socket"])
            .arg(self.dir().join("target.sock")));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn uris(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("nbd+unix:///v{}?socket={}", &m.name[1..], s(&m.nbd)))
            .collect()
    }

    fn logs(&self) -> String {
        let mut out = String::new();
        for m in &self.members {
            for d in [&m.tracker, &m.shipper].into_iter().flatten() {
                out += &format!("--- {}\n{}\n", d.log.display(), d.log_text());
            }
        }
        out
    }
}

/// (name, nice value) of each thread of process `pid`, the main thread first.
fn thread_nice(pid: nix::unistd::Pid) -> Vec<(String, i32)> {
    let mut out = Vec::new();
    let mut tids: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| t.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    tids.sort_unstable();
    for tid in tids {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        // After "(comm) ": the state is field 3 of stat(5), the nice value field 19.
        let nice = stat[close + 2..].split_whitespace().nth(16).unwrap();
        out.push((stat[open + 1..close].to_string(), nice.parse().unwrap()));
    }
    out
}

/// The counters of the target's exports `names`, in order (read_counters.py).
fn read_counters(g: &Group, names: &[String]) -> Vec<u64> {
    let sock = s(&g.dir().join("target-nbd.sock"));
    let mut args: Vec<&str> = vec![&sock];
    args.extend(names.iter().map(String::as_str));
    let out = python("read_counters.py", &args);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.split_once(' ').unwrap().1.parse().unwrap())
        .collect()
}

/// Reads each member volume's counter at every listed group point through the target's
/// exports `vI@POINT`: returns per group point the counters in member order.
fn counters_at(g: &Group, points: &[serde_json::Value]) -> Vec<(u64, Vec<u64>)> {
    let mut names = Vec::new();
    for p in points {
        for m in p["volumes"].as_array().unwrap() {
            names.push(format!("{}@{}", m["volume"].as_str().unwrap(), m["point"]));
        }
    }
    let mut values = read_counters(g, &names).into_iter();
    points
        .iter()
        .map(|p| {
            let n = p["volumes"].as_array().unwrap().len();
            (p["id"].as_u64().unwrap(), values.by_ref().take(n).collect())
        })
        .collect()
}

#[test]
fn group_points_are_causally_consistent_cuts_across_three_hosts() {
    let mut g = Group::start(3, "50ms");
    // Let the members find each other.
    g.wait_rounds(0, 0);
    // The threads a round waits for run at group.nice (-10 by default: the tests run as
    // root), the tracker's other threads as before.
    let threads = thread_nice(g.members[0].tracker.as_ref().unwrap().pid());
    let group: Vec<_> = threads
        .iter()
        .filter(|(n, _)| n.starts_with("group-"))
        .collect();
    assert!(
        group.iter().any(|(n, _)| n == "group-rounds")
            && group.iter().any(|(n, _)| n == "group-conn")
            && group
                .iter()
                .filter(|(n, _)| n != "group-accept")
                .all(|(_, v)| *v == -10),
        "{threads:?}"
    );
    let ours = thread_nice(nix::unistd::getpid())[0].1;
    assert_eq!(
        threads[0].1, ours,
        "the main thread keeps the test's: {threads:?}"
    );
    let uris = g.uris();
    let mut args = vec!["20"];
    args.extend(uris.iter().map(String::as_str));
    let (last, _) = workload(&args);
    assert!(last > 100, "the workload wrote only {last} rounds");
    // Points placed after the workload hold the last value everywhere.
    std::thread::sleep(Duration::from_millis(500));
    g.wait_caught_up();
    let points = g.group_points();
    let coordinator = g.tracker_status(0)["group"].clone();
    assert_eq!(coordinator["coordinating"], true, "{coordinator}");
    assert!(
        points.len() >= 200,
        "only {} group points listed; coordinator: {coordinator}\n{}",
        points.len(),
        g.logs()
    );
    let cuts = counters_at(&g, &points);
    let mut mid_sequence = 0;
    for (id, c) in &cuts {
        assert_eq!(c.len(), 3, "point {id}: {c:?}");
        let (a, b, cc) = (c[0], c[1], c[2]);
        assert!(
            a >= b && b >= cc && a - cc <= 1,
            "group point {id} is no causally consistent cut: counters {c:?}"
        );
        if a != cc {
            mid_sequence += 1;
        }
    }
    let (_, last_cut) = cuts.last().unwrap();
    assert_eq!(
        last_cut,
        &vec![last; 3],
        "the last point holds the last round"
    );
    // The workload and the points overlapped: some cuts fall inside a round.
    assert!(mid_sequence > 0, "no cut fell inside a round: {cuts:?}");
    eprintln!(
        "{} group points checked ({} inside a round), {last} rounds written; coordinator {}",
        cuts.len(),
        mid_sequence,
        coordinator
    );

    // Group test failover at a point inside a round: every member volume comes up at that
    // point, writable, as vI@test.
    let (i, (id, want)) = cuts
        .iter()
        .enumerate()
        .find(|(_, (_, c))| c[0] != c[2])
        .unwrap();
    let target = g.dir().join("target.sock");
    let redun = |args: &[&str]| {
        run(Command::new(bin("redun"))
            .args(args)
            .arg("--target-socket")
            .arg(&target))
    };
    let out = redun(&[
        "test-failover",
        "start",
        "--group",
        "g",
        "--point",
        &id.to_string(),
    ]);
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(said.contains(&format!("serves group point {id}")), "{said}");
    let names =
        |suffix: &str| -> Vec<String> { (1..=3).map(|i| format!("v{i}{suffix}")).collect() };
    let at_test = read_counters(&g, &names("@test"));
    assert_eq!(&at_test, want, "test failover of group point {id} (#{i})");
    redun(&["test-failover", "cleanup", "--group", "g"]);
    let st = request_json(&target, &serde_json::json!({"cmd": "status"})).unwrap();
    for v in st["status"]["volumes"].as_array().unwrap() {
        assert!(v["test_failover"].is_null(), "{v}");
    }

    // The members are gone: an unplanned failover of the whole group at that point.
    for m in &mut g.members {
        m.shipper.as_mut().unwrap().kill9();
        m.tracker.as_mut().unwrap().kill9();
    }
    let out = redun(&[
        "failover",
        "--unplanned",
        "--group",
        "g",
        "--point",
        &id.to_string(),
    ]);
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        said.contains(&format!("failed over at group point {id}")),
        "{said}"
    );
    assert_eq!(
        &read_counters(&g, &names("")),
        want,
        "failover of group point {id}"
    );
}

/// Runs causal_counter.py with `args`: the rounds written and the longest reply wait (ms).
fn workload(args: &[&str]) -> (u64, f64) {
    let out = python("causal_counter.py", args);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let mut it = text.split_whitespace();
    let k = it.next().and_then(|v| v.parse().ok()).expect("rounds");
    let ms = it
        .next()
        .and_then(|v| v.parse().ok())
        .expect("longest wait");
    (k, ms)
}

impl Group {
    /// Waits until member 1 (the coordinator here) reports every member reachable and
    /// `more` rounds committed beyond `since`.
    fn wait_rounds(&self, since: u64, more: u64) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let st = self.tracker_status(0)["group"].clone();
            let done = st["rounds_committed"].as_u64().unwrap_or(0);
            let all = st["members"]
                .as_array()
                .is_some_and(|m| m.iter().all(|m| m["reachable"] == true));
            if all && done >= since + more {
                return done;
            }
            assert!(
                Instant::now() < deadline,
                "rounds did not resume: {st}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs group_peer.py in member `from`'s namespace against member `to`.
    fn peer_script(
        &self,
        from: usize,
        to: usize,
        mode: &str,
        cert: &str,
        extra: &[String],
    ) -> String {
        let d = self.dir();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scripts/group_peer.py");
        let (crt, key) = match cert {
            "-" => ("-".to_string(), "-".to_string()),
            c => (
                s(&d.join(format!("{c}.crt"))),
                s(&d.join(format!("{c}.key"))),
            ),
        };
        let out = run(Command::new(Path::new("ip"))
            .args(["netns", "exec", &self.net.hosts[from], "/usr/bin/python3"])
            .arg(script)
            .args([mode, &self.net.ip(to), "20004", &format!("m{}", to + 1)])
            .arg(d.join("pki/ca.crt"))
            .args([crt, key])
            .args(extra));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

fn unix_ms() -> u64 {
    u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

#[test]
fn a_cut_off_member_aborts_points_the_others_keep_writing_and_points_resume() {
    let mut g = Group::start(3, "100ms");
    let before = g.wait_rounds(0, 3);
    let uris = g.uris();

    // Member 3 cut off: the rounds abort, members 1 and 2 keep acknowledging writes.
    let cut_at = unix_ms();
    g.net.cut(2, true);
    let (rounds, longest) = workload(&["3", &uris[0], &uris[1]]);
    let st = g.tracker_status(0)["group"].clone();
    g.net.cut(2, false);
    let back_at = unix_ms();
    assert!(
        rounds > 100,
        "only {rounds} writes while member 3 was cut off"
    );
    assert!(
        longest < 1000.0,
        "a write waited {longest} ms while member 3 was cut off (the timeout is 50 ms)"
    );
    assert_eq!(st["state"], "degraded", "{st}");
    assert!(st["rounds_aborted"].as_u64().unwrap() >= 5, "{st}");
    let m3 = &st["members"].as_array().unwrap()[2];
    assert_eq!(m3["reachable"], false, "{st}");
    assert!(!m3["error"].as_str().unwrap().is_empty(), "{st}");

    // Back: the rounds commit again.
    let now = g.tracker_status(0)["group"]["rounds_committed"]
        .as_u64()
        .unwrap();
    assert!(now >= before);
    g.wait_rounds(now, 3);
    assert_eq!(g.tracker_status(0)["group"]["state"], "ok");
    g.wait_caught_up();
    let points = g.group_points();
    assert!(!points.is_empty());
    let inside = |ms: u64| ms > cut_at + 500 && ms + 500 < back_at;
    for p in &points {
        assert_eq!(p["volumes"].as_array().unwrap().len(), 3, "{p}");
        assert!(
            !inside(p["unix_ms"].as_u64().unwrap()),
            "group point {p} was placed while member 3 was cut off"
        );
    }
    assert!(
        points
            .iter()
            .any(|p| p["unix_ms"].as_u64().unwrap() > back_at),
        "no group point after member 3 came back: {points:?}"
    );
    // Member 1's aborted markers are no points of its volume either.
    let out = run(Command::new(bin("redun"))
        .args(["points", "v1", "--json", "--target-socket"])
        .arg(g.dir().join("target.sock")));
    let v1: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        v1.iter().all(|p| !inside(p["unix_ms"].as_u64().unwrap())),
        "an aborted group marker is listed as a point of v1: {v1:?}"
    );
    eprintln!(
        "cut off for {} ms: {rounds} write rounds on two members, longest reply {longest} ms, \
         coordinator {st}",
        back_at - cut_at
    );

    // A coordinator that falls silent after PREPARE: member 2 aborts by itself within the
    // timeout and lets the held reply go.
    let nbd = format!("nbd+unix:///v2?socket={}", s(&g.members[1].nbd));
    let out = g.peer_script(0, 1, "silent", "pki/m1", &[nbd]);
    let held: f64 = out
        .strip_prefix("held_ms ")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("group_peer.py said {out:?}"));
    assert!(
        (20.0..1000.0).contains(&held),
        "the write after PREPARE waited {held} ms (held until the member's 50 ms timeout)"
    );
    eprintln!("a write after a silent coordinator's PREPARE was held {held} ms");
    // The member counts what the hold cost: that reply waited at its gate until the timeout.
    let st = g.tracker_status(1)["group"].clone();
    assert!(st["held_replies"].as_u64().unwrap() >= 1, "{st}");
    let longest = st["held_longest_us"].as_u64().unwrap();
    assert!(
        (20_000..1_000_000).contains(&longest),
        "member 2's longest held reply: {longest} us (its timeout is 50 ms): {st}"
    );
    assert!(st["held_wait_us"].as_u64().unwrap() >= longest, "{st}");
    let log = g.members[1].tracker.as_ref().unwrap().log_text();
    assert!(log.contains("point=8193: no decision within"), "{log}");

    // Strangers: a certificate of another CA, or none, cannot join or trigger points.
    pki(&g.dir().join("other"), &["m1"]);
    for cert in ["other/m1", "-"] {
        let out = g.peer_script(0, 1, "stranger", cert, &[]);
        assert!(out.starts_with("refused:"), "{cert}: {out}");
    }
    let aborted = g.tracker_status(1)["group"]["aborted"].as_u64().unwrap();
    let log = g.members[1].tracker.as_ref().unwrap().log_text();
    assert!(
        !log.contains("point=4097"),
        "a stranger prepared a point:\n{log}"
    );
    assert!(aborted >= 1);
    for m in &mut g.members {
        m.shipper.as_mut().unwrap().stop();
        m.tracker.as_mut().unwrap().stop();
    }
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// The lines of the hooks' shared log.
fn hook_lines(g: &Group) -> Vec<String> {
    std::fs::read_to_string(g.dir().join("hooks.log"))
        .unwrap_or_default()
        .lines()
        .map(String::from)
        .collect()
}

/// Waits up to `within` for every one of `want` to be a line of the hooks' log; the time
/// it took.
fn wait_hooks(g: &Group, want: &[&str], within: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let lines = hook_lines(g);
        if want.iter().all(|w| lines.iter().any(|l| l == w)) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "hooks {want:?} did not all run within {within:?}: {lines:?}\n{}",
            g.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn app_points_a_killed_coordinator_and_a_planned_failover_of_the_group() {
    // Every member's hooks log to one file; `mI/pre-sleep` makes member I's pre-hook slow,
    // `mI/pre-fail` makes it fail.
    let opts = Opts {
        interval: "0".into(),
        timeout: "2s".into(),
        points: "hook_timeout = \"3s\"\n".into(),
        volume: |d, i| {
            let (log, m) = (s(&d.join("hooks.log")), s(&d.join(format!("m{}", i + 1))));
            format!(
                "pre_hook = 'echo pre $REDUN_VOLUME >> {log}; \
                 sleep $(cat {m}/pre-sleep 2>/dev/null || echo 0); test ! -e {m}/pre-fail'\n\
                 post_hook = 'echo post $REDUN_VOLUME >> {log}'\n"
            )
        },
    };
    let mut g = Group::start_with(3, opts);
    g.wait_rounds(0, 0);
    let uris = g.uris();
    // Member 1 coordinates (the lowest id).
    let admin1 = g.members[0].admin.clone();
    let redun_point = |app: bool| {
        let mut c = Command::new(bin("redun"));
        c.args(["point", "group", "--tracker-socket"]).arg(&admin1);
        if app {
            c.arg("--app");
        }
        c
    };
    let all = |phase: &str| -> Vec<String> { (1..=3).map(|i| format!("{phase} v{i}")).collect() };
    let hooks_log = g.dir().join("hooks.log");
    let clear_log = || std::fs::write(&hooks_log, "").unwrap();

    // An app-consistent group point: every pre-hook runs before any marker is placed, every
    // post-hook after the decision; the target lists it as an app point of every member.
    let out = run(&mut redun_point(true));
    let id: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    let want: Vec<String> = [all("pre"), all("post")].concat();
    wait_hooks(&g, &strs(&want), Duration::from_secs(10));
    let lines = hook_lines(&g);
    assert_eq!(lines.len(), 6, "{lines:?}");
    let mut first: Vec<String> = lines[..3].to_vec();
    first.sort();
    assert_eq!(
        first,
        all("pre"),
        "a post-hook ran before every pre-hook had: {lines:?}"
    );
    g.wait_caught_up();
    let points = g.group_points();
    let p = points
        .iter()
        .find(|p| p["id"] == id)
        .unwrap_or_else(|| panic!("app group point {id} is not listed: {points:?}"));
    assert_eq!(p["kind"], "app", "{p}");
    assert_eq!(p["usable"], true, "{p}");
    assert_eq!(p["volumes"].as_array().unwrap().len(), 3, "{p}");

    // A member whose pre-hook fails: the point aborts, names the volume, and every member's
    // post-hook runs all the same.
    clear_log();
    let m2 = g.dir().join("m2");
    std::fs::write(m2.join("pre-fail"), "").unwrap();
    let out = redun_point(true).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("member 2") && err.contains("volume v2") && err.contains("pre-hook"),
        "{err}"
    );
    let failed: u64 = err
        .split("group point ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no point id in {err:?}"));
    let post = all("post");
    wait_hooks(&g, &strs(&post), Duration::from_secs(10));
    std::fs::remove_file(m2.join("pre-fail")).unwrap();

    // The coordinator killed while every member is frozen (its own pre-hook is slow): the
    // others thaw by themselves once the coordinator's patience is over.
    clear_log();
    std::fs::write(g.dir().join("m1/pre-sleep"), "2").unwrap();
    let mut pending = redun_point(true)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_hooks(&g, &["pre v1", "pre v2", "pre v3"], Duration::from_secs(10));
    g.members[0].tracker.as_mut().unwrap().kill9();
    let _ = pending.wait();
    // Patience: hook_timeout 3 s + timeout 2 s, + 3 timeouts.
    let thawed = wait_hooks(&g, &["post v2", "post v3"], Duration::from_secs(20));
    assert!(
        !hook_lines(&g).contains(&"post v1".to_string()),
        "the killed coordinator thawed"
    );
    let log2 = g.members[1].tracker.as_ref().unwrap().log_text();
    assert!(
        log2.contains("no PREPARE or decision came in time: thawing"),
        "{log2}"
    );
    eprintln!("members thawed {thawed:?} after the frozen coordinator was killed");
    std::fs::remove_file(g.dir().join("m1/pre-sleep")).unwrap();

    // Restarted, the coordinator is killed while member 2 holds replies: member 3 is stopped
    // so that the round waits for its READY; member 2 lets the held reply go within its
    // timeout.
    g.start_tracker(0);
    g.wait_rounds(0, 0);
    let m3 = g.members[2].tracker.as_ref().unwrap().pid();
    nix::sys::signal::kill(m3, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let mut round = redun_point(false)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let nbd2 = format!("nbd+unix:///v2?socket={}", s(&g.members[1].nbd));
    let write = python_spawn("causal_counter.py", &["0.001", &nbd2]);
    std::thread::sleep(Duration::from_millis(400));
    g.members[0].tracker.as_mut().unwrap().kill9();
    let _ = round.wait();
    let out = write.wait_with_output().unwrap();
    nix::sys::signal::kill(m3, nix::sys::signal::Signal::SIGCONT).unwrap();
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    let held: f64 = said
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("causal_counter.py said {said:?} {:?}", out.stderr));
    assert!(
        (200.0..3500.0).contains(&held),
        "a write on member 2 after PREPARE waited {held} ms with the coordinator killed (timeout 2 s)"
    );
    let log2 = g.members[1].tracker.as_ref().unwrap().log_text();
    let killed: u64 = log2
        .lines()
        .rfind(|l| l.contains("no decision within 2s"))
        .and_then(|l| l.split("point=").nth(1))
        .and_then(|r| r.split(':').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("member 2 did not abort the killed round by itself:\n{log2}"));
    eprintln!("a write held by point {killed} left after {held} ms, its coordinator killed");

    // Back: points commit again, and neither the failed nor the killed point is listed.
    g.start_tracker(0);
    g.wait_rounds(0, 0);
    let out = run(&mut redun_point(false));
    let resumed: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    g.wait_caught_up();
    let ids: Vec<u64> = g
        .group_points()
        .iter()
        .map(|p| p["id"].as_u64().unwrap())
        .collect();
    assert!(ids.contains(&resumed), "{ids:?}");
    assert!(!ids.contains(&failed) && !ids.contains(&killed), "{ids:?}");

    // A planned failover of the group whose fencing round aborts (member 3 does not answer):
    // every member volume takes writes again.
    let target_sock = g.dir().join("target.sock");
    let planned = || {
        let mut c = Command::new(bin("redun"));
        c.args(["failover", "--planned", "--group", "g", "--timeout", "60"])
            .arg("--tracker-socket")
            .arg(&admin1)
            .arg("--target-socket")
            .arg(&target_sock);
        c
    };
    let fenced = |g: &Group| -> Vec<bool> {
        (0..3)
            .map(|i| g.tracker_status(i)["volumes"][0]["fenced"] == true)
            .collect()
    };
    let m3 = g.members[2].tracker.as_ref().unwrap().pid();
    nix::sys::signal::kill(m3, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let out = planned().output().unwrap();
    nix::sys::signal::kill(m3, nix::sys::signal::Signal::SIGCONT).unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("aborted") && err.contains("member 3"), "{err}");
    // Member 3 handles the stale PREPARE once it runs again, then gives it up.
    let deadline = Instant::now() + Duration::from_secs(20);
    while fenced(&g) != [false; 3] {
        assert!(
            Instant::now() < deadline,
            "still fenced: {:?}\n{}",
            fenced(&g),
            g.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let log2 = g.members[1].tracker.as_ref().unwrap().log_text();
    assert!(
        log2.contains("the fencing point aborted: writes are taken again"),
        "{log2}"
    );

    // The planned failover of the group: every member volume fenced at one group point,
    // promoted on the target once every member shipped it, nothing acknowledged lost.
    g.wait_rounds(0, 0);
    let (k, _) = workload(&["1", &uris[0], &uris[1], &uris[2]]);
    let out = run(&mut planned());
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        said.contains("every member volume failed over at group point")
            && said.contains("nothing lost"),
        "{said}"
    );
    assert_eq!(fenced(&g), [true; 3]);
    let want = vec![k; 3];
    let names: Vec<String> = (1..=3).map(|i| format!("v{i}")).collect();
    assert_eq!(
        read_counters(&g, &names),
        want,
        "the failed-over volumes lost writes"
    );
    let refused = python_spawn("causal_counter.py", &["0.001", &uris[1]])
        .wait_with_output()
        .unwrap();
    assert!(!refused.status.success(), "a fenced member took a write");

    // The coordinator's metrics (restarted before the last three rounds).
    require("promtool");
    let out = run(Command::new("ip").args([
        "netns",
        "exec",
        &g.net.hosts[0],
        "/usr/bin/python3",
        "-c",
        "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:9752/metrics').read().decode(), end='')",
    ]));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let mut lint = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    lint.stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let linted = lint.wait_with_output().unwrap();
    assert!(linted.status.success(), "promtool: {linted:?}\n{text}");
    let series = |name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
    };
    assert_eq!(
        series("redun_group_rounds_total{group=\"g\",outcome=\"committed\"}"),
        2.0
    );
    assert_eq!(
        series("redun_group_rounds_total{group=\"g\",outcome=\"aborted\"}"),
        1.0
    );
    assert_eq!(
        series("redun_group_points_total{group=\"g\",outcome=\"committed\"}"),
        2.0
    );
    assert_eq!(series("redun_group_coordinating{group=\"g\"}"), 1.0);
    assert_eq!(
        series("redun_group_member_reachable{group=\"g\",member=\"3\"}"),
        1.0
    );
    assert!(series("redun_group_last_round_seconds{group=\"g\"}") > 0.0);
    // Counted whether or not a reply waited in these rounds.
    assert!(series("redun_group_held_replies_total{group=\"g\"}") >= 0.0);
    assert!(series("redun_group_held_wait_seconds_total{group=\"g\"}") >= 0.0);
    assert!(series("redun_group_held_longest_seconds{group=\"g\"}") >= 0.0);
    for m in &mut g.members {
        m.shipper.as_mut().unwrap().stop();
        m.tracker.as_mut().unwrap().stop();
    }
}
