#!/usr/bin/env bash
# Tracked writes at production scale: redun-tracker on a large volume, against nbdkit's file
# plugin (the reference of every ratio) and qemu-nbd, all measured in the same run.
#
# 1. fio's nbd engine, time-based (SECONDS each), every server on a new sparse backing file of
#    BENCH_VOLUME (default 32G) and, for the journaled tracker, a new journal of
#    BENCH_NOSHIP_JOURNAL (default 24G: nothing releases it in these runs):
#      a. 4 KiB random writes over the whole volume, iodepth 16
#      b. 64 KiB random writes over the whole volume, iodepth 16
#      c. 4 KiB random writes over the first 512 MiB only, iodepth 16 (the "small range")
#      d. 1 MiB sequential writes, iodepth 4, for BENCH_SEQ_SECONDS (default 5)
#    each on redun-tracker with its journal (`redun-journal`), redun-tracker --no-journal
#    (`redun`), qemu-nbd (bench-nbd.sh's form: `qemu-nbd -f raw -b 127.0.0.1 -p PORT -x bench -t
#    FILE`, default cache, buffered like the tracker and nbdkit; BENCH_QEMU_CACHE=none runs it
#    with `--cache=none --aio=threads` instead) and nbdkit (`nbdkit -f file FILE`);
#      e. a and b again on the journaled tracker while redun-shipper and redun-target run on
#         loopback (mutual TLS, certificates from `redun pki init`) and release the journal
#         (`redun+ship`); nbdkit's figure of a and b is the reference. Their journal is of
#         BENCH_SHIP_JOURNAL (default 16G): fio writes faster than a shipper and a target on
#         the same 2 cores and disk can drain (the 64 KiB line: about 290 MB/s, so a 4 GiB
#         journal fills in 15 s), and the journal must hold the run's backlog for the line to
#         measure journaling while the shipper releases, not the dirty-region mode an overflow
#         falls back to.
#    fio writes incompressible data (--refill_buffers). Each line prints IOPS, MiB/s, p99
#    completion latency, the ratio to nbdkit (redun lines: to qemu-nbd and to the untracked
#    tracker too) and each server's peak RSS (VmHWM). The journaled lines also print the
#    journal's peak use (sampled every 250 ms); the shipped ones the largest RPO seen and how
#    long the shipper took to catch up once fio stopped.
# 2. PostgreSQL 15 pgbench on ext4 on a BENCH_PG_VOLUME (default 8G) export: tracker, shipper
#    and target running, the export mounted through nbdfuse + `losetup --direct-io=on` +
#    mkfs.ext4 + mount, `pgbench -i -s BENCH_PG_SCALE` (default 150: about 2.2 GiB), CHECKPOINT,
#    then (with a shipper) a wait until the target acknowledged the bulk load, as a database in
#    service is caught up (BENCH_PG_SETTLE=0 does not wait: the first round then competes with
#    shipping and merging the bulk load); the same on nbdkit. Then BENCH_PG_ROUNDS (default 3) rounds in
#    which the servers take turns: each is started again on its image (and journal and replica),
#    PostgreSQL is started, `pgbench -c 8 -j 2 -T SECONDS` runs, and everything stops again, so
#    that only one server runs at a time and a drift of the machine falls on all alike. Prints
#    the median TPS of the rounds, each round's TPS and ratio, p99 transaction latency over all
#    rounds (from pgbench's per-transaction log) and the ratio of the medians. BENCH_PG_SERVERS
#    chooses the servers (default "redun+ship nbdkit"; also redun-journal, the tracker without
#    a shipper, and redun, --no-journal).
# 3. Restart after kill -9: the journaled tracker alone (no shipper) takes SECONDS of fio 4 KiB
#    random writes over the whole volume, is killed with SIGKILL once fio is done, and is started
#    again on the same journal directory: the time until its NBD port accepts a connection (the
#    journal replay) and until an NBD handshake succeeds (nbdinfo).
#
# The benchmark FAILS (exit 1, after the table, each failure named on stderr as it happens) when
# a journaled volume is not `protected` after its run or its journal overflowed: the tracker's
# `redun status --json` (volumes[0]: `state`, `dirty_bytes`, `journal.used_bytes` and
# `journal.capacity`), the same sampled during the run (a volume that overflowed and was resynced
# by the shipper before the end is `protected` again, but was seen otherwise), the shipper's
# `sync_bytes_sent` (a resync after an overflow) and the tracker's log ("journal is full",
# "tracking dirty regions"). Without a shipper nobody releases the journal: the runs of 1a-1d
# and 3 use a journal of BENCH_NOSHIP_JOURNAL; those with a shipper, the tracker's default.
#
# Usage: scripts/bench-scale.sh [SECONDS, default 20]
#   BENCH_BIN=DIR           redun, redun-tracker, redun-shipper, redun-target from DIR (default:
#                           `cargo build --release --workspace`, then target/release)
#   BENCH_DIR=DIR           where the work directory (backing files, journals, replicas) goes
#                           (default /var/tmp); it is removed at exit
#   BENCH_VOLUME=SIZE       volume of part 1 and 3 (default 32G, sparse)
#   BENCH_JOURNAL_SIZE=SIZE --journal-size of the tracker with a shipper in part 2 (pgbench;
#                           default: the tracker's default, which a database load must fit)
#   BENCH_SHIP_JOURNAL=SIZE --journal-size of the shipped fio lines (1e; default 16G)
#   BENCH_NOSHIP_JOURNAL=SIZE --journal-size of the journaled trackers without a shipper
#                           (lines 1a-1d and part 3; default 24G: nobody releases it, so it
#                           must hold the whole run; read into the page cache before each run,
#                           as a journal in service is, when memory allows)
#   BENCH_SEQ_SECONDS=N     the 1 MiB sequential line runs N seconds (default 5: at 2 GB/s
#                           its records must fit in BENCH_NOSHIP_JOURNAL)
#   BENCH_PG_VOLUME=SIZE    volume of part 2 (default 8G)
#   BENCH_PG_SCALE=N        pgbench scale (default 150)
#   BENCH_PARTS="1 2 3"     the parts to run (default all three)
#   BENCH_SKIP_PG=1         skip part 2 (as BENCH_PARTS without 2)
#   BENCH_PG_SERVERS="..."  the servers of part 2 (default "redun+ship nbdkit")
#   BENCH_PG_SETTLE=0       part 2 does not wait for the shipper after the bulk load
#   BENCH_PG_ROUNDS=N       timed pgbench runs per server in part 2 (default 3)
#   BENCH_SHIPPER_ARGS="..." more arguments of redun-shipper (e.g. "--compression-level 1")
#   BENCH_TRACKER_ARGS="..." more arguments of the journaled redun-trackers (e.g. "--config
#                           FILE" with `[tracker] journal.memory = "1G"`)
#   BENCH_QEMU_CACHE=none   qemu-nbd with --cache=none --aio=threads
#   BENCH_KEEP=DIR          copy the results, fio's JSON and every daemon's log to DIR at exit
# Needs root (loop devices, mount), fio, nbdkit, qemu-nbd, nbdfuse, nbdinfo, python3 and
# PostgreSQL 15 (scripts/install-test-deps.sh installs them).
set -euo pipefail
cd "$(dirname "$0")/.."
runtime="${1:-20}"
[[ "$runtime" =~ ^[1-9][0-9]*$ ]] || { echo "bench: SECONDS=$runtime: expected a whole number of seconds" >&2; exit 1; }
volume="${BENCH_VOLUME:-32G}"
pg_volume="${BENCH_PG_VOLUME:-8G}"
pg_scale="${BENCH_PG_SCALE:-150}"
pg_settle="${BENCH_PG_SETTLE:-1}"
pg_rounds="${BENCH_PG_ROUNDS:-3}"
[[ "$pg_rounds" =~ ^[1-9][0-9]*$ ]] || { echo "bench: BENCH_PG_ROUNDS=$pg_rounds: expected a positive number" >&2; exit 1; }
parts=" ${BENCH_PARTS:-1 2 3} "
skip_pg="${BENCH_SKIP_PG:-0}"
[[ "$parts" = *" 2 "* ]] || skip_pg=1
read -r -a pg_servers <<<"${BENCH_PG_SERVERS:-redun+ship nbdkit}"
read -r -a shipper_args <<<"${BENCH_SHIPPER_ARGS:-}"
read -r -a tracker_args <<<"${BENCH_TRACKER_ARGS:-}"
pgbin=/usr/lib/postgresql/15/bin
volume_bytes=$(numfmt --from=iec "$volume") || { echo "bench: BENCH_VOLUME=$volume: not a size" >&2; exit 1; }
pg_volume_bytes=$(numfmt --from=iec "$pg_volume") || { echo "bench: BENCH_PG_VOLUME=$pg_volume: not a size" >&2; exit 1; }
[ "$volume_bytes" -ge $((1 << 30)) ] || { echo "bench: BENCH_VOLUME=$volume: at least 1G (the small-range job writes 512 MiB)" >&2; exit 1; }
[[ "$pg_scale" =~ ^[1-9][0-9]*$ ]] || { echo "bench: BENCH_PG_SCALE=$pg_scale: expected a positive number" >&2; exit 1; }
journal_size=()
[ -n "${BENCH_JOURNAL_SIZE:-}" ] && journal_size=(--journal-size "$BENCH_JOURNAL_SIZE")
ship_journal=(--journal-size "${BENCH_SHIP_JOURNAL:-16G}")
fio_shipped=0  # 1 while the shipped fio lines run: their tracker takes ship_journal
# Without a shipper nobody releases the journal: those runs get one that holds them.
noship_journal=(--journal-size "${BENCH_NOSHIP_JOURNAL:-24G}")
seq_seconds="${BENCH_SEQ_SECONDS:-5}"
[[ "$seq_seconds" =~ ^[1-9][0-9]*$ ]] || { echo "bench: BENCH_SEQ_SECONDS=$seq_seconds: expected a whole number of seconds" >&2; exit 1; }
qemu_cache=()
[ "${BENCH_QEMU_CACHE:-}" = none ] && qemu_cache=(--cache=none --aio=threads)

[ "$(id -u)" -eq 0 ] || { echo "bench: run as root (loop devices, mount, PostgreSQL as user postgres)" >&2; exit 1; }
need=(fio nbdkit qemu-nbd nbdinfo python3 numfmt)
[ "$skip_pg" = 1 ] || need+=(nbdfuse fusermount3 losetup mkfs.ext4 runuser "$pgbin/pgbench" "$pgbin/pg_ctl" "$pgbin/initdb" "$pgbin/psql")
for t in "${need[@]}"; do
    command -v "$t" >/dev/null || { echo "bench: $t missing: run scripts/install-test-deps.sh" >&2; exit 1; }
done
[ "$skip_pg" = 1 ] || id postgres >/dev/null 2>&1 || { echo "bench: no user postgres: run scripts/install-test-deps.sh" >&2; exit 1; }

if [ -n "${BENCH_BIN:-}" ]; then
    bin=$(cd "$BENCH_BIN" && pwd)
else
    cargo build --release --workspace >/dev/null 2>&1 || cargo build --release --workspace
    bin=$PWD/target/release
fi
for b in redun redun-tracker redun-shipper redun-target; do
    [ -x "$bin/$b" ] || { echo "bench: $bin/$b missing (BENCH_BIN)" >&2; exit 1; }
done

work=$(mktemp -d "${BENCH_DIR:-/var/tmp}/redun-bench-scale.XXXXXX")
mkdir -p "$work/res" "$work/logs"
: >"$work/res/runs.tsv"
# PostgreSQL (user postgres) reaches its data directory and sockets inside the work directory.
chmod 755 "$work"

live=()          # PIDs of every process this script started that may still run
pg_data='' pg_mnt='' pg_loop='' pg_fuse='' pg_fuse_pid=''
stop_pid() { # PID: SIGTERM, up to 30 s, then SIGKILL
    local p=$1 i
    if kill "$p" 2>/dev/null; then
        for i in $(seq 300); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$p" 2>/dev/null || true
    fi
    wait "$p" 2>/dev/null || true
    local keep=() q
    for q in "${live[@]}"; do [ "$q" = "$p" ] || keep+=("$q"); done
    live=("${keep[@]}")
}
pgu() { (cd / && runuser -u postgres -- "$@"); }  # as user postgres, from a directory it can read
pg_teardown() {
    if [ -n "$pg_data" ] && [ -f "$pg_data/postmaster.pid" ]; then
        pgu "$pgbin/pg_ctl" -D "$pg_data" -m fast -t 60 stop >/dev/null 2>&1 ||
            pgu "$pgbin/pg_ctl" -D "$pg_data" -m immediate -t 30 stop >/dev/null 2>&1 || true
        # Still there (its disk gone): the postmaster we started, by its PID.
        if [ -f "$pg_data/postmaster.pid" ]; then
            local p
            p=$(head -1 "$pg_data/postmaster.pid" 2>/dev/null || true)
            [ -n "$p" ] && { kill -9 "$p" 2>/dev/null || true; }
        fi
    fi
    pg_data=
    if [ -n "$pg_mnt" ] && mountpoint -q "$pg_mnt"; then
        umount "$pg_mnt" 2>/dev/null || { sleep 1; umount "$pg_mnt" 2>/dev/null; } || umount -l "$pg_mnt" || true
    fi
    pg_mnt=
    [ -n "$pg_loop" ] && { losetup -d "$pg_loop" 2>/dev/null || true; }
    pg_loop=
    if [ -n "$pg_fuse" ] && mountpoint -q "$pg_fuse"; then
        # The loop device may let go of the file a moment after `losetup -d`.
        for _ in $(seq 50); do fusermount3 -u "$pg_fuse" 2>/dev/null && break; sleep 0.2; done
        mountpoint -q "$pg_fuse" && { fusermount3 -u -z "$pg_fuse" || true; }
    fi
    pg_fuse=
    # nbdfuse exits by itself once unmounted.
    [ -n "$pg_fuse_pid" ] && stop_pid "$pg_fuse_pid"
    pg_fuse_pid=
}
cleanup() {
    set +e
    pg_teardown
    local i
    for ((i = ${#live[@]} - 1; i >= 0; i--)); do stop_pid "${live[i]}"; done
    if [ -n "${BENCH_KEEP:-}" ]; then
        mkdir -p "$BENCH_KEEP" && cp -r "$work/res" "$work/logs" "$BENCH_KEEP"/ 2>/dev/null
    fi
    if findmnt -rn -o TARGET | grep -q "^$work/"; then
        echo "bench: something is still mounted under $work: left in place" >&2
    else
        rm -rf --one-file-system "$work"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Python helpers: status sampling and checks, shipper catch-up, port timing, the table.
cat >"$work/bench.py" <<'PY'
import glob, json, os, socket, statistics, sys, time

def ask(path, timeout=5):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(timeout)
    s.connect(path)
    s.sendall(b'{"cmd":"status"}\n')
    d = b''
    while not d.endswith(b'\n'):
        c = s.recv(1 << 20)
        if not c:
            break
        d += c
    s.close()
    return json.loads(d)['status']

def vol0(status):
    v = status.get('volumes') or []
    return v[0] if v else {}

def sample(tracker, shipper, stop, out):
    """Every 250 ms until STOP exists: the worst the tracker's volume (and shipper) looked."""
    r = {'samples': 0, 'states': [], 'max_dirty': 0, 'max_used': 0, 'capacity': 0,
         'max_waiting': 0, 'max_rpo': 0.0, 'max_lag': 0, 'shipper_states': [], 'sync_kinds': []}
    while os.path.isdir(os.path.dirname(stop)):
        last = os.path.exists(stop)
        try:
            v = vol0(ask(tracker))
            r['samples'] += 1
            st = v.get('state')
            if st not in r['states']:
                r['states'].append(st)
            r['max_dirty'] = max(r['max_dirty'], v.get('dirty_bytes') or 0)
            j = v.get('journal') or {}
            r['max_used'] = max(r['max_used'], j.get('used_bytes') or 0)
            r['capacity'] = j.get('capacity') or r['capacity']
            r['max_waiting'] = max(r['max_waiting'], j.get('waiting_writes') or 0)
        except (OSError, ValueError, KeyError):
            pass
        if shipper != '-':
            try:
                v = vol0(ask(shipper))
                if v.get('state') not in r['shipper_states']:
                    r['shipper_states'].append(v.get('state'))
                r['max_rpo'] = max(r['max_rpo'], v.get('rpo_seconds') or 0.0)
                r['max_lag'] = max(r['max_lag'], v.get('lag_bytes') or 0)
                k = (v.get('sync') or {}).get('kind')
                if k and k not in r['sync_kinds']:
                    r['sync_kinds'].append(k)
            except (OSError, ValueError, KeyError):
                pass
        if last:
            break
        time.sleep(0.25)
    json.dump(r, open(out, 'w'))

def gib(n):
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"

def check(status_file, sample_file, log, written, out):
    """Verdict of a journaled run: 'ok' or why it fails; with the journal's figures."""
    d = json.load(open(status_file))
    tr = d.get('tracker') or {}
    why = []
    if not tr.get('running'):
        why.append(f"the tracker does not answer on its admin socket ({tr.get('error')})")
    v = vol0(tr.get('status') or {})
    j = v.get('journal') or {}
    s = json.load(open(sample_file)) if os.path.exists(sample_file) else {}
    state = v.get('state')
    if tr.get('running') and state != 'protected':
        why.append(f"the volume is {state}, not protected")
    if (v.get('dirty_bytes') or 0) > 0:
        why.append(f"{gib(v['dirty_bytes'])} dirty (tracked as regions, not journaled)")
    seen = [x for x in s.get('states', []) if x and x != 'protected']
    if seen and state == 'protected':
        why.append(f"the volume was {', '.join(seen)} during the run")
    if s.get('max_dirty', 0) > 0 and not (v.get('dirty_bytes') or 0):
        why.append(f"up to {gib(s['max_dirty'])} were dirty during the run")
    cap = j.get('capacity') or s.get('capacity') or 0
    used = max(j.get('used_bytes') or 0, s.get('max_used', 0))
    sh = ((d.get('shipper') or {}).get('status') or {})
    shv = vol0(sh)
    if (shv.get('sync_bytes_sent') or 0) > 0 or 'resync' in s.get('sync_kinds', []):
        why.append(f"the shipper resynced {gib(shv.get('sync_bytes_sent') or 0)} (after an overflow)")
    try:
        text = open(log, errors='replace').read()
        for needle in ('journal is full', 'tracking dirty regions', 'journal failed'):
            if needle in text:
                why.append(f"the tracker logged '{needle}'")
                break
    except OSError:
        pass
    if written == '-':
        written = v.get('bytes_written') or 0
    if why and cap:
        released = 'released by the shipper' if d.get('shipper', {}).get('running') else 'that nobody released'
        why.append(f"fio wrote {gib(int(written))} through a {gib(cap)} journal {released}"
                   f" (peak use {gib(used)}; BENCH_JOURNAL_SIZE, BENCH_SHIP_JOURNAL and BENCH_NOSHIP_JOURNAL set the journal's size)")
    r = {'ok': not why, 'why': '; '.join(why), 'state': state, 'capacity': cap,
         'peak_used': used, 'head_seq': j.get('head_seq'), 'max_rpo': s.get('max_rpo'),
         'max_lag': s.get('max_lag')}
    json.dump(r, open(out, 'w'))
    print('ok' if r['ok'] else r['why'])

def wait_shipping(tracker, shipper, limit):
    """Until the tracker's volume is protected and the shipper ships it."""
    end = time.time() + float(limit)
    last = None
    while time.time() < end:
        try:
            t, s = vol0(ask(tracker)), vol0(ask(shipper))
            last = (t.get('state'), s.get('state'), s.get('sync'))
            if t.get('state') == 'protected' and s.get('state') == 'shipping' and not s.get('sync'):
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.1)
    sys.exit(f"bench: the volume is not protected and shipping after {limit} s (tracker, shipper, sync: {last})")

def catchup(tracker, shipper, limit):
    """Seconds until the shipper's acked_seq reaches the tracker's head; '>limit' otherwise."""
    t0 = time.time()
    while time.time() - t0 < float(limit):
        try:
            head = (vol0(ask(tracker)).get('journal') or {}).get('head_seq')
            acked = vol0(ask(shipper)).get('acked_seq')
            if head is not None and acked is not None and acked >= head:
                print(f"{time.time() - t0:.1f}")
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.1)
    print(f">{limit}")

def port_time(port, start_ns, limit):
    """Seconds from START_NS until 127.0.0.1:PORT accepts a connection."""
    while (time.time_ns() - int(start_ns)) / 1e9 < float(limit):
        try:
            socket.create_connection(('127.0.0.1', int(port)), timeout=1).close()
            print(f"{(time.time_ns() - int(start_ns)) / 1e9:.3f}")
            return
        except OSError:
            time.sleep(0.002)
    sys.exit(f"bench: nothing listens on port {port} after {limit} s")

def fio_row(path):
    j = json.load(open(path))['jobs'][0]['write']
    return j['iops'], j['bw_bytes'] / 2**20, j['clat_ns']['percentile'].get('99.000000', 0) / 1000

def pg_row(prefix):
    """Median TPS of the rounds PREFIX-rN.out, p99 latency over all their transactions, and
    each round's TPS in order."""
    rounds = []
    for out in sorted(glob.glob(prefix + '-r*.out'), key=lambda f: int(f.rsplit('-r', 1)[1][:-4])):
        for line in open(out):
            if line.startswith('tps = '):
                rounds.append(float(line.split()[2]))
    lat = []
    for f in glob.glob(prefix + '-r*.out.log'):
        for line in open(f):
            p = line.split()
            if len(p) >= 3:
                lat.append(int(p[2]))
    lat.sort()
    p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else 0
    return (statistics.median(rounds) if rounds else None), p99, rounds

def table(work):
    rows = [l.rstrip('\n').split('\t') for l in open(f"{work}/res/runs.tsv")]
    # job, ref job, server, kind, file, rss KiB, check file, note
    fio = {}
    for job, ref, server, kind, f, rss, chk, note in rows:
        if kind == 'fio':
            fio[(job, server)] = fio_row(f)
    head = (f"{'job':<30} {'server':<14} {'IOPS/TPS':>9} {'MiB/s':>8} {'p99 us':>9} {'/nbdkit':>8}"
            f" {'/qemu-nbd':>9} {'/untracked':>10} {'peak RSS':>9}  journal / notes")
    print(head)
    fails = 0
    prev = None
    for job, ref, server, kind, f, rss, chk, note in rows:
        label = job if job != prev else ''
        prev = job
        c = json.load(open(chk)) if chk != '-' and os.path.exists(chk) else None
        extra = []
        if c:
            if c['capacity']:
                extra.append(f"peak {c['peak_used'] / 2**20:.0f}/{c['capacity'] / 2**20:.0f} MiB")
            if c.get('max_rpo'):
                extra.append(f"max RPO {c['max_rpo']:.1f}s")
            extra.append('protected' if c['ok'] else 'FAIL')
            fails += not c['ok']
        if note != '-':
            extra.append(note)
        rss_s = f"{int(rss) / 1024:.0f} MiB" if rss not in ('-', '') else ''
        if kind == 'fio':
            iops, mib, p99 = fio[(job, server)]
            def ratio(s):
                r = fio.get((ref, s))
                return f"{iops / r[0]:.2f}x" if r and r[0] else '-'
            q = ratio('qemu-nbd') if server.startswith('redun') else ''
            u = ratio('redun') if server.startswith('redun-journal') or server == 'redun+ship' else ''
            n = ratio('nbdkit') if server != 'nbdkit' else ''
            print(f"{label:<30} {server:<14} {iops:>9.0f} {mib:>8.1f} {p99:>9.0f} {n:>8} {q:>9} {u:>10} {rss_s:>9}  {', '.join(extra)}")
        else:
            tps, p99, rounds = pg_row(f)
            nk = [r for r in rows if r[0] == job and r[2] == 'nbdkit']
            n = ''
            if server != 'nbdkit' and nk:
                t, _, nk_rounds = pg_row(nk[0][4])
                n = f"{tps / t:.2f}x" if t and tps else '-'
                if len(nk_rounds) == len(rounds) and all(nk_rounds):
                    extra.append('round ratios ' + '/'.join(f"{a / b:.2f}" for a, b in zip(rounds, nk_rounds)))
            extra.insert(0, f"median of {len(rounds)} rounds: " + '/'.join(f"{r:.0f}" for r in rounds) + ' TPS')
            extra += [open(n_).read().strip() for n_ in sorted(glob.glob(f + '-r*.note'))][-1:]
            print(f"{label:<30} {server:<14} {tps or 0:>9.0f} {'':>8} {p99:>9.0f} {n:>8} {'':>9} {'':>10} {rss_s:>9}  {', '.join(extra)}")
    if os.path.exists(f"{work}/res/restart.tsv"):
        for l in open(f"{work}/res/restart.tsv"):
            accept, hand, recs, used, state, replayed = l.rstrip('\n').split('\t')
            print(f"restart after kill -9: NBD port accepting after {accept} s, NBD handshake after {hand} s"
                  f" ({recs} records, {int(used) / 2**20:.0f} MiB in the journal, {replayed} changes replayed"
                  f" onto the volume; state after restart: {state.strip()})")
    return fails

cmd = sys.argv[1]
if cmd == 'sample': sample(*sys.argv[2:])
elif cmd == 'check': check(*sys.argv[2:])
elif cmd == 'wait-shipping': wait_shipping(*sys.argv[2:])
elif cmd == 'catchup': catchup(*sys.argv[2:])
elif cmd == 'port-time': port_time(*sys.argv[2:])
elif cmd == 'table': sys.exit(1 if table(*sys.argv[2:]) else 0)
elif cmd == 'field': # FILE PATH.TO.FIELD (numbers index lists)
    d = json.load(open(sys.argv[2]))
    for k in sys.argv[3].split('.'):
        d = d[int(k)] if isinstance(d, list) else (d or {}).get(k)
    print('' if d is None else d)
PY
py() { python3 "$work/bench.py" "$@"; }
expected=0  # runs started; each appends one row to res/runs.tsv when it completes
: >"$work/res/runs.tsv"
failures=()

"$bin/redun" pki init --dir "$work/pki" --name localhost --name shipper >/dev/null

# Below the kernel's ephemeral range (32768 and up), where an outgoing connection can hold a port;
# each run takes the next port, a target that one plus 1000.
port=$((20000 + RANDOM % 8000))
wait_port() { # PORT PID LOG
    for _ in $(seq 600); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        kill -0 "$2" 2>/dev/null || break
        sleep 0.05
    done
    echo "bench: nothing listens on port $1 (see below, the end of $3)" >&2
    tail -20 "$3" >&2
    exit 1
}
wait_file() { # PATH PID LOG
    for _ in $(seq 600); do
        [ -e "$1" ] && return 0
        kill -0 "$2" 2>/dev/null || break
        sleep 0.05
    done
    echo "bench: $1 never appeared (see below, the end of $3)" >&2
    tail -20 "$3" >&2
    exit 1
}

# start_server NAME IMG TAG [DIR]: starts NAME (redun-journal, redun, qemu-nbd, nbdkit,
# redun+ship) on a new port serving IMG as export `bench`; sets srv_pid (the NBD server's PID),
# srv_pids (every process of this server, in start order), srv_log and, for the journaled
# tracker, adm (its admin socket) and shp (the shipper's, or -). The journal, replica and sockets
# go to DIR: a new $work/srv by default; a DIR given is kept (a restart on the same journal).
start_server() {
    local name=$1 img=$2 tag=$3 d=${4:-$work/srv}
    [ -n "${4:-}" ] || rm -rf "$d"
    mkdir -p "$d"
    port=$((port + 1))
    srv_log=$work/logs/$tag.log
    srv_pids=() adm='' shp=-
    case $name in
    redun-journal | redun+ship)
        adm=$d/tracker.sock
        if [ "$name" = redun+ship ]; then
            local tport=$((port + 1000))
            "$bin/redun-target" --data-dir "$d/replicas" --listen "127.0.0.1:$tport" --tls-ca "$work/pki/ca.crt" \
                --tls-cert "$work/pki/localhost.crt" --tls-key "$work/pki/localhost.key" \
                --admin-socket "$d/target.sock" --nbd-listen off 2>"$work/logs/$tag-target.log" &
            srv_pids+=($!); live+=($!)
            wait_file "$d/target.sock" "$!" "$work/logs/$tag-target.log"
        fi
        local js=("${journal_size[@]}")
        [ "$fio_shipped" = 1 ] && js=("${ship_journal[@]}")
        [ "$name" = redun-journal ] && js=("${noship_journal[@]}")
        "$bin/redun-tracker" --volume bench="$img" --listen "127.0.0.1:$port" --admin-socket "$adm" \
            --journal-dir "$d/journal" "${js[@]}" "${tracker_args[@]}" 2>"$srv_log" &
        srv_pid=$!; srv_pids+=($!); live+=($!)
        wait_port "$port" "$srv_pid" "$srv_log"
        wait_file "$adm" "$srv_pid" "$srv_log"
        # As in bench-nbd.sh: a journal in service is in the page cache; a new one is not, and
        # on a VM that backs guest memory lazily the first touch of each page costs ~3 s/GiB,
        # which the other servers, writing into an already cached file, never pay.
        local journal_kib avail_kib
        journal_kib=$(du -k --apparent-size "$d/journal/bench.journal" 2>/dev/null | cut -f1)
        avail_kib=$(awk '/^MemAvailable/ {print $2}' /proc/meminfo)
        if [ "${journal_kib:-0}" -le $((avail_kib - 6 * 1024 * 1024)) ]; then
            dd if="$d/journal/bench.journal" of=/dev/null bs=1M status=none
        fi
        if [ "$name" = redun+ship ]; then
            shp=$d/shipper.sock
            "$bin/redun-shipper" --journal-dir "$d/journal" --target "localhost:$tport" \
                --tls-ca "$work/pki/ca.crt" --tls-cert "$work/pki/shipper.crt" --tls-key "$work/pki/shipper.key" \
                --admin-socket "$shp" --tracker-socket "$adm" "${shipper_args[@]}" 2>"$work/logs/$tag-shipper.log" &
            srv_pids+=($!); live+=($!)
            wait_file "$shp" "$!" "$work/logs/$tag-shipper.log"
            py wait-shipping "$adm" "$shp" 60
        fi ;;
    redun)
        "$bin/redun-tracker" --volume bench="$img" --listen "127.0.0.1:$port" --admin-socket "$d/tracker.sock" \
            --no-journal 2>"$srv_log" &
        srv_pid=$!; srv_pids+=($!); live+=($!)
        wait_port "$port" "$srv_pid" "$srv_log" ;;
    qemu-nbd)
        qemu-nbd -f raw -b 127.0.0.1 -p "$port" -x bench -t "${qemu_cache[@]}" "$img" 2>"$srv_log" &
        srv_pid=$!; srv_pids+=($!); live+=($!)
        wait_port "$port" "$srv_pid" "$srv_log" ;;
    nbdkit)
        nbdkit -f -i 127.0.0.1 -p "$port" --exportname=bench file "$img" 2>"$srv_log" &
        srv_pid=$!; srv_pids+=($!); live+=($!)
        wait_port "$port" "$srv_pid" "$srv_log" ;;
    esac
}
stop_server() {
    local i
    # The shipper first, then the tracker, then the target.
    for ((i = ${#srv_pids[@]} - 1; i >= 0; i--)); do stop_pid "${srv_pids[i]}"; done
    srv_pids=()
    # Write back what this server dirtied so that it does not slow down the next one.
    sync
}
peak_rss() { awk '/^VmHWM/ {print $2}' "/proc/$1/status" 2>/dev/null || echo -; }

# Sampler of a journaled run: started with the server, stopped (and its verdict written) after.
sampler_start() { # TAG
    smp_stop=$work/$1.stop
    rm -f "$smp_stop"
    python3 "$work/bench.py" sample "$adm" "$shp" "$smp_stop" "$work/res/$1.sample" &
    smp_pid=$!; live+=($!)
}
# verdict TAG WRITTEN_BYTES: final `redun status --json`, the samples, the log -> res/TAG.check
verdict() {
    local tag=$1 written=$2 v
    touch "$smp_stop"; wait "$smp_pid" || true
    stop_pid "$smp_pid"
    "$bin/redun" status --json --tracker-socket "$adm" --shipper-socket "${shp/#-/$work/none.sock}" \
        --target-socket "$work/none.sock" >"$work/res/$tag.status" 2>>"$work/logs/status.log" || true
    v=$(py check "$work/res/$tag.status" "$work/res/$tag.sample" "$srv_log" "$written" "$work/res/$tag.check")
    if [ "$v" != ok ]; then
        echo "bench: FAIL: $tag: $v" >&2
        failures+=("$tag: $v")
    fi
}

# fio_run JOB REF SERVER FIO-ARGS...: one server, one job, on a new sparse volume.
fio_run() {
    local job=$1 ref=$2 server=$3 tag rss chk=- note=- written
    shift 3
    expected=$((expected + 1))
    tag=$(echo "$job-$server" | tr -c 'A-Za-z0-9+\n-' '_')
    rm -f "$work/vol.img"
    truncate -s "$volume_bytes" "$work/vol.img"
    start_server "$server" "$work/vol.img" "$tag"
    [ -n "$adm" ] && sampler_start "$tag"
    echo "bench: $job on $server (${runtime}s)" >&2
    if ! fio --name=w --ioengine=nbd --uri="nbd://127.0.0.1:$port/bench" --time_based --runtime="$runtime" \
        --refill_buffers "$@" --output-format=json --output="$work/res/$tag.fio.json" >/dev/null 2>"$work/logs/$tag-fio.log"; then
        echo "bench: fio failed on $server ($job): $(tail -3 "$work/logs/$tag-fio.log"); the end of $srv_log:" >&2
        tail -20 "$srv_log" >&2
        exit 1
    fi
    rss=$(peak_rss "$srv_pid")
    if [ -n "$adm" ]; then
        written=$(py field "$work/res/$tag.fio.json" jobs.0.write.io_bytes)
        [ "$shp" != - ] && note="caught up $(py catchup "$adm" "$shp" $((runtime * 5 > 60 ? runtime * 5 : 60)))s after fio"
        verdict "$tag" "$written"
        chk=$work/res/$tag.check
    fi
    stop_server
    rm -rf "$work/srv" "$work/vol.img"
    printf '%s\t%s\t%s\tfio\t%s\t%s\t%s\t%s\n' "$job" "$ref" "$server" "$work/res/$tag.fio.json" "$rss" "$chk" "$note" >>"$work/res/runs.tsv"
}

echo "bench: ${runtime}s per run, volume $volume (sparse), journal size ${BENCH_JOURNAL_SIZE:-default} (pgbench), ${BENCH_SHIP_JOURNAL:-16G} (shipped fio), ${BENCH_NOSHIP_JOURNAL:-24G} (no shipper), files on $(df --output=fstype "$work" | tail -1) in $work" >&2
servers=(redun-journal redun qemu-nbd nbdkit)
vol_label=$volume
jobs=(
    "4k randwrite $vol_label qd16|--rw=randwrite --bs=4k --iodepth=16 --size=$volume_bytes"
    "64k randwrite $vol_label qd16|--rw=randwrite --bs=64k --iodepth=16 --size=$volume_bytes"
    "4k randwrite 512M qd16|--rw=randwrite --bs=4k --iodepth=16 --size=512m"
    "1M seqwrite $vol_label qd4 ${seq_seconds}s|--rw=write --bs=1m --iodepth=4 --size=$volume_bytes --runtime=$seq_seconds"
)
[[ "$parts" = *" 1 "* ]] || jobs=()
for j in "${jobs[@]}"; do
    read -r -a args <<<"${j#*|}"
    for s in "${servers[@]}"; do fio_run "${j%%|*}" "${j%%|*}" "$s" "${args[@]}"; done
done
fio_shipped=1
for j in "${jobs[@]:0:2}"; do
    read -r -a args <<<"${j#*|}"
    fio_run "${j%%|*} shipped" "${j%%|*}" redun+ship "${args[@]}"
done
fio_shipped=0

# 2. PostgreSQL on ext4 on the export.
# Part 2 runs in rounds: each server first gets its own database (pg_setup), then the timed run
# is repeated BENCH_PG_ROUNDS times, the servers taking turns (pg_round), each round on its server
# started again on the same image (and journal, and replica) with nothing else running, so that
# a drift of the machine (the disk's write-back, the page cache) falls on every server alike.
# pg_mount TAG [new]: nbdfuse + a loop device on the running server's export, mounted on
# $work/pg/mnt (mkfs.ext4 first with `new`).
pg_mount() {
    mkdir -p "$work/pg/fuse" "$work/pg/mnt" "$work/pg/run"
    nbdfuse "$work/pg/fuse" "nbd://127.0.0.1:$port/bench" 2>"$work/logs/$1-nbdfuse.log" &
    pg_fuse_pid=$!; live+=($!); pg_fuse=$work/pg/fuse
    wait_file "$work/pg/fuse/nbd" "$pg_fuse_pid" "$work/logs/$1-nbdfuse.log"
    pg_loop=$(losetup -f --show --direct-io=on "$work/pg/fuse/nbd")
    if [ "${2:-}" = new ]; then mkfs.ext4 -F -q "$pg_loop"; fi
    mount "$pg_loop" "$work/pg/mnt"; pg_mnt=$work/pg/mnt
    chown postgres: "$work/pg/run"
    pg_data=$work/pg/mnt/data
    pgport=$((port + 2000))
}
pg_start() {
    pgu "$pgbin/pg_ctl" -D "$pg_data" -l "$work/pg/run/postgres.log" -w -t 120 \
        -o "-p $pgport -k $work/pg/run -c listen_addresses=''" start >/dev/null
}
pg_setup() { # SERVER
    local server=$1 tag=pgbench-$1-init t0 t1 note
    expected=$((expected + 1))
    rm -rf "$work/pg-$server.img" "$work/srv-$server"
    truncate -s "$pg_volume_bytes" "$work/pg-$server.img"
    start_server "$server" "$work/pg-$server.img" "$tag" "$work/srv-$server"
    [ -n "$adm" ] && sampler_start "$tag"
    pg_mount "$tag" new
    mkdir -p "$pg_data"
    chown postgres: "$pg_data"
    chmod 700 "$pg_data"
    pgu "$pgbin/initdb" -D "$pg_data" -A trust --no-instructions >"$work/logs/$tag-initdb.log" 2>&1
    pg_start
    echo "bench: pgbench -i -s $pg_scale on $server" >&2
    t0=$(date +%s.%N)
    pgu "$pgbin/pgbench" -h "$work/pg/run" -p "$pgport" -i -s "$pg_scale" -q postgres \
        >"$work/logs/$tag.log" 2>&1 || { echo "bench: pgbench -i failed on $server:" >&2; tail -5 "$work/logs/$tag.log" >&2; exit 1; }
    pgu "$pgbin/psql" -h "$work/pg/run" -p "$pgport" -q -c CHECKPOINT postgres
    t1=$(date +%s.%N)
    note="init+checkpoint $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.0f", b - a }')s"
    pg_teardown
    rm -rf "$work/pg"
    sync
    if [ "$pg_settle" = 1 ] && [ "$shp" != - ]; then
        echo "bench: waiting for the shipper to catch up with the bulk load on $server" >&2
        note="$note, shipped $(py catchup "$adm" "$shp" 900)s after"
    fi
    if [ -n "$adm" ]; then verdict "$tag" -; fi
    stop_server
    echo "$note" >"$work/res/pgbench-$server.init"
}
pg_round() { # SERVER ROUND
    local server=$1 tag=pgbench-$1-r$2 rss
    start_server "$server" "$work/pg-$server.img" "$tag" "$work/srv-$server"
    [ -n "$adm" ] && sampler_start "$tag"
    pg_mount "$tag"
    pg_start
    echo "bench: pgbench -c 8 -j 2 -T $runtime on $server (round $2 of $pg_rounds)" >&2
    pgu "$pgbin/pgbench" -h "$work/pg/run" -p "$pgport" -c 8 -j 2 -T "$runtime" \
        -l --log-prefix="$work/pg/run/tx" postgres >"$work/res/$tag.out" 2>"$work/logs/$tag.log" ||
        { echo "bench: pgbench failed on $server:" >&2; tail -5 "$work/logs/$tag.log" >&2; exit 1; }
    cat "$work"/pg/run/tx* >"$work/res/$tag.out.log"
    rss=$(peak_rss "$srv_pid")
    pg_teardown
    rm -rf "$work/pg"
    if [ -n "$adm" ]; then
        if [ "$shp" != - ]; then echo "caught up $(py catchup "$adm" "$shp" 120)s after" >"$work/res/$tag.note"; fi
        verdict "$tag" -
    fi
    echo "$rss" >"$work/res/$tag.rss"
    stop_server
}
if [ "$skip_pg" != 1 ]; then
    for s in "${pg_servers[@]}"; do pg_setup "$s"; done
    for r in $(seq "$pg_rounds"); do
        for s in "${pg_servers[@]}"; do pg_round "$s" "$r"; done
    done
    for s in "${pg_servers[@]}"; do
        chk=-
        [ -f "$work/res/pgbench-$s-r$pg_rounds.check" ] && chk=$work/res/pgbench-$s-r$pg_rounds.check
        printf '%s\t-\t%s\tpg\t%s\t%s\t%s\t%s\n' "pgbench s$pg_scale c8 ext4" "$s" "$work/res/pgbench-$s" \
            "$(sort -n "$work"/res/pgbench-"$s"-r*.rss | tail -1)" "$chk" "$(cat "$work/res/pgbench-$s.init")" >>"$work/res/runs.tsv"
        rm -f "$work/pg-$s.img"
        rm -rf "$work/srv-$s"
    done
fi

# 3. Restart after kill -9: how long until the tracker serves again on a journal full of records.
if [[ "$parts" = *" 3 "* ]]; then
echo "bench: restart after kill -9 (${runtime}s of 4k random writes first)" >&2
rm -f "$work/vol.img"
truncate -s "$volume_bytes" "$work/vol.img"
start_server redun-journal "$work/vol.img" restart
fio --name=w --ioengine=nbd --uri="nbd://127.0.0.1:$port/bench" --time_based --runtime="$runtime" --refill_buffers \
    --rw=randwrite --bs=4k --iodepth=16 --size="$volume_bytes" --output-format=json \
    --output="$work/res/restart.fio.json" >/dev/null 2>"$work/logs/restart-fio.log" ||
    { echo "bench: fio failed before the restart:" >&2; tail -20 "$srv_log" >&2; exit 1; }
"$bin/redun" status --json --tracker-socket "$adm" --shipper-socket "$work/none.sock" \
    --target-socket "$work/none.sock" >"$work/res/restart-before.status"
records=$(py field "$work/res/restart-before.status" tracker.status.volumes.0.journal.head_seq)
used=$(py field "$work/res/restart-before.status" tracker.status.volumes.0.journal.used_bytes)
kill -9 "$srv_pid"; wait "$srv_pid" 2>/dev/null || true
stop_pid "$srv_pid"
rm -f "$adm"
start_ns=$(date +%s%N)
"$bin/redun-tracker" --volume bench="$work/vol.img" --listen "127.0.0.1:$port" --admin-socket "$adm" \
    --journal-dir "$work/srv/journal" "${noship_journal[@]}" 2>>"$srv_log" &
srv_pid=$!; srv_pids=($!); live+=($!)
accept=$(py port-time "$port" "$start_ns" 600)
handshake=
for _ in $(seq 60000); do
    if nbdinfo --size "nbd://127.0.0.1:$port/bench" >/dev/null 2>&1; then
        handshake=$(python3 -c "import time; print(f'{(time.time_ns() - $start_ns) / 1e9:.3f}')")
        break
    fi
    kill -0 "$srv_pid" 2>/dev/null || break
    sleep 0.005
done
[ -n "$handshake" ] || { echo "bench: the restarted tracker never completed an NBD handshake:" >&2; tail -20 "$srv_log" >&2; exit 1; }
wait_file "$adm" "$srv_pid" "$srv_log"
state_after=$("$bin/redun" status --json --tracker-socket "$adm" --shipper-socket "$work/none.sock" \
    --target-socket "$work/none.sock" | python3 -c 'import json,sys; print(json.load(sys.stdin)["tracker"]["status"]["volumes"][0]["state"])')
replayed=$(grep -o 'replayed [0-9]* changes' "$srv_log" | tail -1 | cut -d' ' -f2)
printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$accept" "$handshake" "$records" "$used" "$state_after" "${replayed:-0}" >"$work/res/restart.tsv"
stop_server
rm -rf "$work/srv" "$work/vol.img"
fi

echo
py table "$work" || true
rows=$(wc -l <"$work/res/runs.tsv")
[[ "$parts" != *" 3 "* || -s "$work/res/restart.tsv" ]] || failures+=("the restart after kill -9 was not measured")
[ "$rows" = "$expected" ] || failures+=("only $rows of $expected runs completed")
if [ ${#failures[@]} -gt 0 ]; then
    echo >&2
    echo "bench: FAILED (${#failures[@]}): a journaled volume that was not protected to the end was not measuring the journal:" >&2
    for f in "${failures[@]}"; do echo "  $f" >&2; done
    exit 1
fi
