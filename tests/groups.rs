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
        let tag = std::process::id() % 100_000;
        let prefix = format!("10.97.{}", std::process::id() % 200 + 20);
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
        let mut v = vec![
            "netns".to_string(),
            "exec".into(),
            self.hosts[i].clone(),
            s(&bin(bin_name)),
        ];
        v.extend_from_slice(args);
        v
    }

    /// Drops every packet to and from host `i` (a partition), or lets them pass again.
    #[allow(dead_code)]
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
}

fn ip_bin() -> PathBuf {
    PathBuf::from("/usr/sbin/ip")
}

impl Group {
    /// `n` members with one volume each, group points every `interval`.
    fn start(n: usize, interval: &str) -> Group {
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
        };
        g.start_target();
        for i in 0..n {
            let m = g.member_files(i, n, interval);
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
            &ip_bin(),
            &args,
            &d.join("target.log"),
        ));
        wait_for(&d.join("target.sock"), "the target's admin socket");
    }

    /// Member `i`'s files and config: volume `vI`, group member id `I`.
    fn member_files(&self, i: usize, n: usize, interval: &str) -> Member {
        let d = self.dir().join(format!("m{}", i + 1));
        std::fs::create_dir_all(&d).unwrap();
        let image = d.join("disk.img");
        std::fs::File::create(&image).unwrap().set_len(VOL).unwrap();
        let pki = self.dir().join("pki");
        let name = format!("m{}", i + 1);
        let mut toml = format!(
            "[tracker]\nlisten = [\"unix:{nbd}\"]\nadmin_socket = \"{admin}\"\n\
             [tracker.journal]\ndir = \"{journal}\"\nsize = \"64M\"\n\
             [points]\ncrash_interval = \"0\"\n\
             [[volume]]\nname = \"v{id}\"\npath = \"{image}\"\n\
             [group]\nname = \"g\"\nid = {id}\nlisten = \"{ip}:20004\"\ninterval = \"{interval}\"\n\
             timeout = \"50ms\"\ntls_ca = \"{ca}\"\ntls_cert = \"{cert}\"\ntls_key = \"{key}\"\n",
            nbd = s(&d.join("nbd.sock")),
            admin = s(&d.join("tracker.sock")),
            journal = s(&d.join("journal")),
            id = i + 1,
            image = s(&image),
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
        let t = Daemon::start_program(&ip_bin(), &args, &log);
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
        let sh = Daemon::start_program(&ip_bin(), &args, &log);
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

    /// Waits until every member's shipper has the target acknowledge its whole journal.
    fn wait_caught_up(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        for m in &self.members {
            loop {
                let head = request_json(&m.admin, &serde_json::json!({"cmd": "status"}))
                    .ok()
                    .and_then(|v| v["status"]["volumes"][0]["journal"]["head_seq"].as_u64());
                let acked = request_json(&m.shipper_admin, &serde_json::json!({"cmd": "status"}))
                    .ok()
                    .and_then(|v| v["status"]["volumes"][0]["acked_seq"].as_u64());
                if let (Some(h), Some(a)) = (head, acked) {
                    if a >= h {
                        break;
                    }
                }
                assert!(
                    Instant::now() < deadline,
                    "member {} did not catch up: head {head:?} acked {acked:?}\n{}",
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

fn wait_for(path: &Path, what: &str) {
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

/// Reads each member volume's counter at every listed group point through the target's
/// exports `vI@POINT`: returns per group point the counters in member order.
fn counters_at(g: &Group, points: &[serde_json::Value]) -> Vec<(u64, Vec<u64>)> {
    let mut names = Vec::new();
    for p in points {
        for m in p["volumes"].as_array().unwrap() {
            names.push(format!("{}@{}", m["volume"].as_str().unwrap(), m["point"]));
        }
    }
    let sock = s(&g.dir().join("target-nbd.sock"));
    let mut args: Vec<&str> = vec![&sock];
    args.extend(names.iter().map(String::as_str));
    let out = python("read_counters.py", &args);
    let values: std::collections::HashMap<String, u64> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let (n, v) = l.split_once(' ').unwrap();
            (n.to_string(), v.parse().unwrap())
        })
        .collect();
    points
        .iter()
        .map(|p| {
            let vols = p["volumes"].as_array().unwrap();
            let c = vols
                .iter()
                .map(|m| values[&format!("{}@{}", m["volume"].as_str().unwrap(), m["point"])])
                .collect();
            (p["id"].as_u64().unwrap(), c)
        })
        .collect()
}

#[test]
fn group_points_are_causally_consistent_cuts_across_three_hosts() {
    let g = Group::start(3, "50ms");
    // Let the members find each other.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !g.tracker_status(0)["group"]["members"]
        .as_array()
        .is_some_and(|m| m.iter().all(|m| m["reachable"] == true))
    {
        assert!(
            Instant::now() < deadline,
            "members never all reachable\n{}",
            g.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let uris = g.uris();
    let mut args = vec!["20"];
    args.extend(uris.iter().map(String::as_str));
    let out = python("causal_counter.py", &args);
    let last: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
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
}
