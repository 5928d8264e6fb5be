#!/usr/bin/env bash
# Consistency-group benchmark: what group points cost the application's writes. For 3 and for
# 8 members (trackers on loopback, each with one journaled volume and a group listener), fio
# writes 4 KiB random blocks at iodepth 16 to every member at once (nbd engine), first with no
# group, then with the members in one group placing a point every second. Prints write p50 and
# p99 latency, IOPS, the added latency and the throughput ratio, and the time of one round
# (coordinator's PREPARE to the last COMMIT answer), sampled from the coordinator's status.
# Each repeat runs without points, with points, then without again (the A/A control):
# ratio: mean IOPS with points over mean IOPS without; pairs: the median of each repeat's
# ratio (with points against the mean of the two runs around it, which cancels a steady
# drift of the machine); A/A: the median of the second run without points over the first,
# the noise band the ratios are read against. "p99 pairs" and "p99 A/A" are the same for the
# p99 latency, as differences in µs. Last, what the holds cost directly, counted by the
# members' gates: the share of replies held for a decision, their average and longest wait.
# Targets (issue 7): added p99 <= 1 ms, throughput >= 0.98x. Journals are 4 GiB so that none
# overflows during a run (a volume that needs a resync takes no group points, and dirty
# regions would make the baseline another workload).
# Usage: scripts/bench-groups.sh [SECONDS per run, default 10]   (BENCH_MEMBERS="3 8",
#        BENCH_REPEAT=2, GROUP_INTERVAL=1s: the group's point interval; "1h" measures what
#        membership alone costs, with no round during the runs)
set -euo pipefail
cd "$(dirname "$0")/.."
runtime="${1:-10}"
members_list="${BENCH_MEMBERS:-3 8}"
for t in fio python3; do
    command -v "$t" >/dev/null || { echo "bench: $t missing: run scripts/install-test-deps.sh" >&2; exit 1; }
done
. scripts/lib.sh
build_release >/dev/null 2>&1 || build_release
in_workdir "${BENCH_DIR:-/var/tmp}/redun-bench-groups.XXXXXX"

names=()
for i in $(seq 8); do names+=(--name "m$i"); done
"$bin/redun" pki init --dir pki "${names[@]}" >/dev/null

base=$((21000 + RANDOM % 8000)) # below the ephemeral range (32768 and up)
# config N I GROUP(0|1): member I of N.
config() {
    local n=$1 i=$2 group=$3 d=m$2
    cat <<EOF
[tracker]
listen = ["unix:$work/$d/nbd.sock"]
admin_socket = "$work/$d/admin.sock"
[tracker.journal]
dir = "$work/$d/journal"
size = "4G"
[points]
crash_interval = "0"
[[volume]]
name = "v$i"
path = "$work/$d/disk.img"
EOF
    [ "$group" = 1 ] || return 0
    cat <<EOF
[group]
name = "bench"
id = $i
listen = "127.0.0.1:$((base + i))"
interval = "${GROUP_INTERVAL:-1s}"
timeout = "50ms"
tls_ca = "$work/pki/ca.crt"
tls_cert = "$work/pki/m$i.crt"
tls_key = "$work/pki/m$i.key"
EOF
    for j in $(seq "$n"); do
        printf '[[group.member]]\nid = %d\naddress = "127.0.0.1:%d"\nname = "m%d"\n' "$j" $((base + j)) "$j"
    done
}

# run N GROUP K: starts N members, runs fio on all, stops them; leaves fio's JSON and the
# round samples in $work/result-N-GROUP-K.* (GROUP 1: group points; 0 and 2: none, 2 being
# the control run after them)
run() {
    local n=$1 group=$2 k=$3 fio_args=() i
    for i in $(seq "$n"); do
        rm -rf "m$i"; mkdir -p "m$i"
        truncate -s 1G "m$i/disk.img"
        config "$n" "$i" "$group" >"m$i/redun.toml"
        "$bin/redun-tracker" --config "m$i/redun.toml" 2>>"m$i/tracker.log" &
        pids+=($!)
    done
    for i in $(seq "$n"); do
        wait_for "m$i/admin.sock"
        fio_args+=(--name="m$i" --uri="nbd+unix:///v$i?socket=$work/m$i/nbd.sock")
    done
    # Every run starts with no dirty pages of its own making or of the run before (the
    # journals' creation, the previous run's files), so no run pays for another's writeback.
    sync
    sleep 2  # the members connect to each other
    : >"result-$n-$group-$k.rounds"
    (
        while sleep 0.25; do
            "$bin/redun" status --json --tracker-socket m1/admin.sock 2>/dev/null |
                python3 -c 'import json,sys; g=json.load(sys.stdin)["tracker"]["status"].get("group"); print(g["last_point"], g["last_round_us"], g["rounds_committed"], g["rounds_aborted"], g["last_error"]) if g else None' \
                >>"result-$n-$group-$k.rounds" || true
        done
    ) &
    local sampler=$!
    fio --ioengine=nbd --rw=randwrite --bs=4k --iodepth=16 --size=1g --time_based \
        --runtime="$runtime" --group_reporting --output-format=json \
        --output="result-$n-$group-$k.json" "${fio_args[@]}" >/dev/null
    kill "$sampler"; wait "$sampler" 2>/dev/null || true
    # What the holds cost each member's replies: held, their waits added up, the longest.
    : >"result-$n-$group-$k.held"
    if [ "$group" = 1 ]; then
        for i in $(seq "$n"); do
            "$bin/redun" status --json --tracker-socket "m$i/admin.sock" |
                python3 -c 'import json,sys; g=json.load(sys.stdin)["tracker"]["status"]["group"]; print(g["held_replies"], g["held_wait_us"], g["held_longest_us"])' \
                >>"result-$n-$group-$k.held"
        done
    fi
    for p in "${pids[@]}"; do kill "$p"; wait "$p" 2>/dev/null || true; done
    pids=()  # stopped: cleanup must not signal these PIDs again
    if [ "$group" = 1 ]; then
        for i in $(seq "$n"); do cp "m$i/tracker.log" "log-$n-$k-m$i.log"; done
        # Why rounds aborted, as the members logged it.
        grep -h -o -E "aborted: [^;]*|no decision within [^:]*|is unreachable: .*" m*/tracker.log |
            sed -E 's/point=[0-9]+//; s/[0-9]+\.[0-9.]+:[0-9]+/ADDR/g' | sort | uniq -c |
            sed "s/^/  $n members: /" >>why-aborted.txt || true
    fi
}

# Without, with, and without group points again, `repeat` times: this machine's noise is
# larger than what is measured, so the table shows the mean of the repeats.
repeat="${BENCH_REPEAT:-2}"
for n in $members_list; do
    for k in $(seq "$repeat"); do
        run "$n" 0 "$k"
        run "$n" 1 "$k"
        run "$n" 2 "$k"
    done
done

python3 - "$members_list" "$repeat" <<'PY'
import json, statistics, sys
print(f"{'members':>7} {'group points':<13} {'IOPS':>9} {'p50 us':>8} {'p99 us':>8} {'+p50 us':>8} {'+p99 us':>8} {'p99 pairs':>9} {'p99 A/A':>8} {'ratio':>6} {'pairs':>6} {'A/A':>6} {'round us (median/max)':>22} {'committed/aborted':>18}")
held_lines = []
for n in sys.argv[1].split():
    rows = {}
    every = {}
    repeats = range(1, int(sys.argv[2]) + 1)
    for g in (0, 1, 2):
        runs = []
        for k in repeats:
            j = json.load(open(f"result-{n}-{g}-{k}.json"))["jobs"][0]["write"]
            pct = j["clat_ns"]["percentile"]
            runs.append((j["iops"], pct["50.000000"] / 1000, pct["99.000000"] / 1000,
                         j["total_ios"]))
        every[g] = runs
    # Without points: both runs of each repeat.
    for g, runs in ((0, every[0] + every[2]), (1, every[1])):
        rows[g] = tuple(statistics.mean(r[i] for r in runs) for i in range(3))
    # Each run with group points against the mean of the runs without around it: the median
    # of these ratios is less sensitive to the machine's drift than the ratio of the means.
    pairs = statistics.median(
        b[0] / ((a[0] + c[0]) / 2) for a, b, c in zip(every[0], every[1], every[2]))
    control = statistics.median(c[0] / a[0] for a, c in zip(every[0], every[2]))
    # The same for p99: added against the runs around it, and the A/A difference.
    p99_pairs = statistics.median(
        b[2] - (a[2] + c[2]) / 2 for a, b, c in zip(every[0], every[1], every[2]))
    p99_control = statistics.median(c[2] - a[2] for a, c in zip(every[0], every[2]))
    # Replies the gates held, over every write of the runs with points.
    held = [0, 0, 0]
    for k in repeats:
        for line in open(f"result-{n}-1-{k}.held"):
            r, w, m = map(int, line.split())
            held = [held[0] + r, held[1] + w, max(held[2], m)]
    writes = sum(r[3] for r in every[1])
    held_lines.append(
        f"{n:>7} members: {held[0]} of {writes} replies held ({100 * held[0] / max(writes, 1):.2f}%),"
        f" {held[1] / max(held[0], 1):.0f} us each on average, longest {held[2]} us")
    rounds = {}
    errors = set()
    last = [0, 0]
    for k in repeats:
        # Rounds while fio ran (the first sample's counts include the start-up, when the
        # members were not all up yet).
        first = None
        for line in open(f"result-{n}-1-{k}.rounds"):
            f = line.split(maxsplit=4)
            p, us, c, a = map(int, f[:4])
            first = first or (c, a)
            if len(f) > 4:
                errors.add(f[4].strip())
            if p:
                rounds[p] = us
        if first:
            last[0] += c - first[0]
            last[1] += a - first[1]
    for g in (0, 1):
        iops, p50, p99 = rows[g]
        extra = ""
        if g:
            b = rows[0]
            us = sorted(rounds.values()) or [0]
            extra = (f" {p50 - b[1]:>8.0f} {p99 - b[2]:>8.0f} {p99_pairs:>9.0f} {p99_control:>8.0f}"
                     f" {iops / b[0]:>5.2f}x {pairs:>5.2f}x {control:>5.2f}x"
                     f" {statistics.median(us):>12.0f}/{max(us):<9.0f} {last[0]:>10}/{last[1]}")
        print(f"{n:>7} {'every 1s' if g else 'none':<13} {iops:>9.0f} {p50:>8.0f} {p99:>8.0f}{extra}")
    for e in sorted(errors):
        print(f"{'':>7} aborted round: {e}")
print("replies held at the members' gates while a point was decided (the runs with points):")
print("\n".join(held_lines))
PY
[ -s why-aborted.txt ] && { echo "aborts and lost peers as the members logged them (start-up and stop included):"; cat why-aborted.txt; }
true
# BENCH_KEEP=DIR keeps fio's JSON, the round samples and the members' logs of the runs with
# group points (log-MEMBERS-REPEAT-mI.log).
if [ -n "${BENCH_KEEP:-}" ]; then
    mkdir -p "$BENCH_KEEP" && cp result-* log-* why-aborted.txt "$BENCH_KEEP"/ 2>/dev/null || true
fi
