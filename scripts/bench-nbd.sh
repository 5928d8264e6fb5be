#!/usr/bin/env bash
# NBD server benchmark: fio's nbd engine against redun-tracker with its journal (on the same
# disk as the backing file) and without (--no-journal), qemu-nbd (default cache) and nbdkit's
# file plugin, one after the other, in one run:
#   4 KiB random write, iodepth 16 | 4 KiB random read, iodepth 16 | 1 MiB sequential write, iodepth 4
# Reads run SECONDS; writes write BENCH_WRITE_SIZE (default 3g) so that the journal, which
# nobody releases yet, never fills up during a job. Every server of a write job starts on a
# new, empty backing file: the journaled tracker then creates its journal with nothing to
# replicate first, so the volume is `protected` and every write goes through the journal (on
# a file that holds data, a new journal starts `resync-required`: the initial replication
# tracks dirty regions only, and the bench would measure that instead). Prints IOPS, MiB/s, p99 completion latency,
# redun's ratios to each reference, and the tracker's resident memory with a 2 TiB volume.
# Each job runs BENCH_REPEAT times (default 2), the servers in one order and then in the
# reverse order (a drift of the machine during a job then weighs on every server alike); the
# table shows the mean of the repeats, and the spread (lowest and highest run over the mean)
# of each server's IOPS.
# Usage: scripts/bench-nbd.sh [SECONDS, default 20]   (BENCH_BACKEND=uring|sync, BENCH_REPEAT)
set -euo pipefail
cd "$(dirname "$0")/.."
runtime="${1:-20}"
write_size="${BENCH_WRITE_SIZE:-3g}"
repeat="${BENCH_REPEAT:-2}"
[[ "$repeat" =~ ^[1-9][0-9]*$ ]] || { echo "bench: BENCH_REPEAT=$repeat: expected a count of 1 or more" >&2; exit 1; }
backend="${BENCH_BACKEND:-uring}"
for t in fio qemu-nbd nbdkit python3; do
    command -v "$t" >/dev/null || { echo "bench: $t missing: run scripts/install-test-deps.sh" >&2; exit 1; }
done
cargo build --release --workspace >/dev/null 2>&1 || cargo build --release --workspace
bin=$PWD/target/release

work=$(mktemp -d "${BENCH_DIR:-/var/tmp}/redun-bench.XXXXXX")
pid=
cleanup() {
    [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
data=$work/data.img
# For the reads: a fully allocated 1 GiB file whose first 256 MiB hold data.
fallocate -l 1G "$data"
dd if=/dev/urandom of="$data" bs=1M count=256 conv=notrunc,fsync status=none

port=$((20000 + RANDOM % 8000)) # below the ephemeral range (32768 and up)
wait_port() {
    for _ in $(seq 200); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.05
    done
    echo "bench: nothing listens on port $1" >&2; return 1
}

jobs=("randwrite 4k 16" "randread 4k 16" "write 1m 4")
servers=(redun-journal redun qemu-nbd nbdkit)
start_server() { # name port
    case $1 in
    redun-journal)
        rm -rf "$work/journal"
        "$bin/redun-tracker" --volume bench="$img" --listen "127.0.0.1:$2" \
            --admin-socket "$work/admin.sock" --backend "$backend" \
            --journal-dir "$work/journal" --journal-size 4G 2>>"$work/redun.log" & ;;
    redun) "$bin/redun-tracker" --volume bench="$img" --listen "127.0.0.1:$2" \
        --admin-socket "$work/admin.sock" --backend "$backend" --no-journal 2>>"$work/redun.log" & ;;
    qemu-nbd) qemu-nbd -f raw -b 127.0.0.1 -p "$2" -x bench -t "$img" 2>>"$work/qemu-nbd.log" & ;;
    nbdkit) nbdkit -f -i 127.0.0.1 -p "$2" --exportname=bench file "$img" 2>>"$work/nbdkit.log" & ;;
    esac
    pid=$!
    wait_port "$2"
    if [ "$1" = redun-journal ]; then
        # A journal in service is a ring that wraps: its pages are in the page cache. A fresh
        # one is not, and on a VM that backs guest memory lazily (firecracker here) the first
        # touch of each never-used page costs ~3 s/GiB, which the untracked servers, writing
        # into a backing file that is already cached, never pay. Read it once so that all
        # servers start from the same page-cache state.
        dd if="$work/journal/bench.journal" of=/dev/null bs=1M status=none
    fi
}
stop_server() {
    kill "$pid"; wait "$pid" || true; pid=
    # Write back what this server dirtied so that it does not slow down the next one.
    sync
}

echo "bench: reads ${runtime}s, writes $write_size per job, redun backend=$backend, backing file on $(df --output=fstype "$work" | tail -1)" >&2
# Job by job, the servers back to back, so that they see the same machine state.
for j in "${jobs[@]}"; do
    read -r rw bs qd <<<"$j"
    if [ "$rw" = randread ]; then amount=(--time_based --runtime="$runtime"); else amount=(--io_size="$write_size"); fi
    for k in $(seq "$repeat"); do
        order=("${servers[@]}")
        if [ $((k % 2)) = 0 ]; then
            order=()
            for ((i = ${#servers[@]} - 1; i >= 0; i--)); do order+=("${servers[i]}"); done
        fi
        for name in "${order[@]}"; do
            port=$((port + 1))
            if [ "$rw" = randread ]; then
                img=$data
            else
                # Every writer starts from the same state: a new, empty, fully allocated file, so
                # none of it is in the page cache either (pages left cached by an earlier job can
                # be large folios, and ext4 then walks every block of a 2 MiB folio on each 4 KiB
                # write: measured here, 43k IOPS instead of 105k, whatever the server).
                img=$work/write.img
                rm -f "$img"
                fallocate -l 1G "$img"
            fi
            start_server "$name" "$port"
            fio --name="$rw" --ioengine=nbd --uri="nbd://127.0.0.1:$port/bench" --rw="$rw" --bs="$bs" \
                --iodepth="$qd" --size=256m "${amount[@]}" --output-format=json \
                --output="$work/$name-$rw-$k.json" >/dev/null
            if [ "$name" = redun-journal ] && [ "$rw" != randread ]; then
                state=$("$bin/redun" status --json --tracker-socket "$work/admin.sock" |
                    python3 -c 'import json,sys; print(json.load(sys.stdin)["tracker"]["status"]["volumes"][0]["state"])')
                if [ "$state" != protected ]; then
                    echo "bench: the journaled volume is $state after $rw: its writes were not all journaled, so its figures do not measure the journal; see $work/redun.log" >&2
                    exit 1
                fi
            fi
            stop_server
        done
    done
done

# Resident memory of a tracker serving a 2 TiB sparse volume with its journal.
truncate -s 2T "$work/big.img"
port=$((port + 1))
"$bin/redun-tracker" --volume big="$work/big.img" --listen "127.0.0.1:$port" \
    --admin-socket "$work/admin.sock" --journal-dir "$work/journal-big" --journal-size 64M 2>>"$work/redun.log" &
pid=$!; wait_port "$port"
rss_kib=$(awk '/^VmRSS/ {print $2}' "/proc/$pid/status")
kill "$pid"; wait "$pid" || true; pid=
echo "$rss_kib" >"$work/rss"

python3 - "$work" "$repeat" <<'PY'
import json, statistics, sys
work = sys.argv[1]
repeats = range(1, int(sys.argv[2]) + 1)
jobs = [("randwrite", "write", "4k randwrite qd16"), ("randread", "read", "4k randread qd16"),
        ("write", "write", "1M seqwrite qd4")]
servers = ["redun-journal", "redun", "qemu-nbd", "nbdkit"]
def run(server, job, side, k):
    j = json.load(open(f"{work}/{server}-{job}-{k}.json"))["jobs"][0][side]
    p99 = j["clat_ns"]["percentile"].get("99.000000", 0) / 1000
    return j["iops"], j["bw_bytes"] / 2**20, p99
def stats(server, job, side):
    runs = [run(server, job, side, k) for k in repeats]
    return tuple(statistics.mean(r[i] for r in runs) for i in range(3))
def spread(server, job, side):
    iops = [run(server, job, side, k)[0] for k in repeats]
    m = statistics.mean(iops)
    return f"{min(iops) / m:.2f}-{max(iops) / m:.2f}"
print(f"{'job':<18} {'server':<14} {'IOPS':>10} {'MiB/s':>9} {'p99 us':>9} {'spread':>10}  {'/qemu-nbd':>9} {'/nbdkit':>8} {'/untracked':>10}")
for job, side, label in jobs:
    ref = {s: stats(s, job, side)[0] for s in servers}
    for s in servers:
        iops, mib, p99 = stats(s, job, side)
        ratio = ""
        if s.startswith("redun"):
            ratio = f"  {iops / ref['qemu-nbd']:>8.2f}x {iops / ref['nbdkit']:>7.2f}x"
            if s == "redun-journal":
                ratio += f" {iops / ref['redun']:>9.2f}x"
        print(f"{label:<18} {s:<14} {iops:>10.0f} {mib:>9.1f} {p99:>9.0f} {spread(s, job, side):>10}{ratio}")
rss = int(open(f"{work}/rss").read())
print(f"redun-tracker resident memory, 2 TiB volume with a journal: {rss / 1024:.1f} MiB")
PY
