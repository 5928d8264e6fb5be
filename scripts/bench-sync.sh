#!/usr/bin/env bash
# Synchronisation benchmark: a 4 GiB image of random data whose copy is 1% out of date (1% of
# its 4 KiB blocks, scattered, changed) is brought up to date by
# - redun, offline seeding: the old copy is the target's seed (DATA/vol.seed), the tracker
#   protects the new image; the initial replication compares every block;
# - redun, full resync: the replica holds the old image, the volume is changed behind the
#   tracker's back, `redun resync vol --full` compares every block;
# - rsync --inplace --no-whole-file (the reference), between two local files;
# - bdsync, if it installs.
# For each: wall time, bytes on the wire (shipper to target; rsync's "bytes sent"), CPU seconds
# of every process involved, and ratios to rsync's time and to the bytes changed. The redun
# comparison throughput on cached data is the full resync's bytes compared per second.
# Usage: bash scripts/bench-sync.sh   (BENCH_SIZE_MIB=4096, BENCH_DIR=/var/tmp)
set -euo pipefail
cd "$(dirname "$0")/.."
for t in rsync python3 bc; do
    command -v "$t" >/dev/null || { echo "bench: $t is missing: run scripts/install-test-deps.sh" >&2; exit 1; }
done
if ! command -v bdsync >/dev/null && [ "$(id -u)" -eq 0 ]; then
    apt-get install -y -qq bdsync >/dev/null 2>&1 || true
fi
source scripts/lib.sh
build_release >/dev/null
size_mib=${BENCH_SIZE_MIB:-4096}
in_workdir "${BENCH_DIR:-/var/tmp}/redun-sync-bench.XXXXXX"

# CPU seconds (user + system) a process used so far.
cpu() { awk -v hz="$(getconf CLK_TCK)" '{ print ($14 + $15) / hz }' "/proc/$1/stat"; }
now() { date +%s.%N; }

echo "== ${size_mib} MiB of random data, and a copy with 1% of its 4 KiB blocks changed"
head -c "${size_mib}M" /dev/urandom >old.img
cp old.img new.img
changed=$(python3 - <<'EOF'
import os, random
f = os.open("new.img", os.O_WRONLY)
blocks = os.path.getsize("new.img") // 4096
rng = random.Random(7)
picked = rng.sample(range(blocks), blocks // 100)
for b in picked:
    os.pwrite(f, os.urandom(4096), b * 4096)
os.close(f)
print(len(picked) * 4096)
EOF
)
sync
"$bin/redun" pki init --dir pki --name localhost --name shipper >/dev/null

start_target() {
    port=$((20000 + RANDOM % 10000)) # below the ephemeral range (32768 and up)
    "$bin/redun-target" --data-dir data --listen "127.0.0.1:$port" --tls-ca pki/ca.crt \
        --tls-cert pki/localhost.crt --tls-key pki/localhost.key --admin-socket target.sock \
        --nbd-listen off 2>>target.log &
    target_pid=$!
    pids+=($target_pid)
}
start_tracker() {
    "$bin/redun-tracker" --volume vol="$work/$1" --listen unix:"$work/nbd.sock" \
        --admin-socket tracker.sock --journal-dir journal --journal-size 256M \
        --crash-interval 0 2>>tracker.log &
    tracker_pid=$!
    pids+=($tracker_pid)
}
start_shipper() {
    "$bin/redun-shipper" --journal-dir journal --tracker-socket tracker.sock \
        --target "localhost:$port" --tls-ca pki/ca.crt --tls-cert pki/shipper.crt \
        --tls-key pki/shipper.key --admin-socket shipper.sock 2>>shipper.log &
    shipper_pid=$!
    pids+=($shipper_pid)
}
# Waits until the shipper finished its job number $1 (counting "done:" lines of its log).
wait_job() {
    while [ "$(grep -c 'synchronisation .* done: ' shipper.log || true)" -lt "$1" ]; do sleep 0.05; done
}
# Bytes the shipper has put on the wire so far (its admin socket's status).
bytes_sent() {
    python3 -c "
import json, socket
s = socket.socket(socket.AF_UNIX); s.connect('shipper.sock'); s.sendall(b'{\"cmd\":\"status\"}\n')
d = b''
while not d.endswith(b'\n'): d += s.recv(65536)
print(json.loads(d)['status']['volumes'][0]['bytes_sent'])"
}
stop_all() {
    for p in "$shipper_pid" "$tracker_pid" "$target_pid"; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null || true; done
    pids=()
}
declare -A wall bytes cpus

echo "== redun, offline seeding: the target is seeded with the old image"
mkdir -p data
cp old.img data/vol.seed
cp new.img vol.img
sync
start_target
start_tracker vol.img
wait_for tracker.sock
wait_for target.sock
c0=$(echo "$(cpu "$tracker_pid") + $(cpu "$target_pid")" | bc -l)
t0=$(now)
start_shipper
wait_job 1
t1=$(now)
sent=$(bytes_sent)
c1=$(echo "$(cpu "$tracker_pid") + $(cpu "$target_pid") + $(cpu "$shipper_pid")" | bc -l)
wall[seeding]=$(echo "$t1 - $t0" | bc -l)
bytes[seeding]=$sent
cpus[seeding]=$(echo "$c1 - $c0" | bc -l)
seed_line=$(grep 'synchronisation .* done: ' shipper.log | tail -1)

echo "== redun, full resync: the volume changed behind the tracker's back"
# The replica now holds the new image; put the old bytes back into the volume while the
# tracker is stopped (cleanly: no dirty regions), then resync everything by hand.
kill "$tracker_pid"; wait "$tracker_pid" 2>/dev/null || true
cp old.img vol.img
cat vol.img >/dev/null
start_tracker vol.img
wait_for tracker.sock
sleep 1
before=$(bytes_sent)
c0=$(echo "$(cpu "$tracker_pid") + $(cpu "$target_pid") + $(cpu "$shipper_pid")" | bc -l)
t0=$(now)
"$bin/redun" resync vol --full --shipper-socket shipper.sock >/dev/null
wait_job 2
t1=$(now)
after=$(bytes_sent)
c1=$(echo "$(cpu "$tracker_pid") + $(cpu "$target_pid") + $(cpu "$shipper_pid")" | bc -l)
wall[resync]=$(echo "$t1 - $t0" | bc -l)
bytes[resync]=$((after - before))
cpus[resync]=$(echo "$c1 - $c0" | bc -l)
resync_line=$(grep 'synchronisation .* done: ' shipper.log | tail -1)
stop_all

echo "== rsync --inplace --no-whole-file"
cp old.img rsync-dst.img
sync
cat new.img rsync-dst.img >/dev/null
t0=$(now)
/usr/bin/time -f "%U %S" -o rsync.cpu rsync --inplace --no-whole-file --stats new.img rsync-dst.img >rsync.out
t1=$(now)
wall[rsync]=$(echo "$t1 - $t0" | bc -l)
bytes[rsync]=$(sed -n 's/^Total bytes sent: \([0-9,]*\).*/\1/p' rsync.out | tr -d ,)
cpus[rsync]=$(awk '{print $1 + $2}' rsync.cpu)
cmp -s new.img rsync-dst.img || { echo "bench: rsync did not make an identical copy" >&2; exit 1; }

tools=(seeding resync rsync)
if command -v bdsync >/dev/null; then
    echo "== bdsync"
    cp old.img bdsync-dst.img
    cat new.img bdsync-dst.img >/dev/null
    t0=$(now)
    /usr/bin/time -f "%U %S" -o bdsync.cpu sh -c \
        "bdsync 'bdsync --server' new.img bdsync-dst.img --diffsize=resize >bdsync.diff"
    bdsync --patch=bdsync-dst.img <bdsync.diff
    t1=$(now)
    wall[bdsync]=$(echo "$t1 - $t0" | bc -l)
    bytes[bdsync]=$(stat -c %s bdsync.diff)
    cpus[bdsync]=$(awk '{print $1 + $2}' bdsync.cpu)
    tools+=(bdsync)
else
    echo "== bdsync: not installable here, skipped"
fi

compared=$(echo "$resync_line" | sed -n 's/.* done: \([0-9]*\) bytes compared.*/\1/p')
secs=$(echo "$resync_line" | sed -n 's/.* in \([0-9.]*\)s;.*/\1/p')
echo
echo "image ${size_mib} MiB, bytes changed $changed (1% of 4 KiB blocks)"
printf "%-26s %9s %14s %12s %9s %12s\n" "tool" "wall s" "bytes sent" "/changed" "CPU s" "time/rsync"
for t in "${tools[@]}"; do
    printf "%-26s %9.2f %14d %12.3f %9.2f %12.3f\n" "$t" "${wall[$t]}" "${bytes[$t]}" \
        "$(echo "${bytes[$t]} / $changed" | bc -l)" "${cpus[$t]}" \
        "$(echo "${wall[$t]} / ${wall[rsync]}" | bc -l)"
done
echo
echo "redun seeding job:  ${seed_line#*INFO  }"
echo "redun resync job:   ${resync_line#*INFO  }"
printf "redun comparison throughput (full resync, cached data): %.0f MB/s\n" \
    "$(echo "$compared / $secs / 1000000" | bc -l)"
echo "targets: time <= 0.25x rsync, bytes sent <= 1.05x changed, comparison >= 2000 MB/s"
