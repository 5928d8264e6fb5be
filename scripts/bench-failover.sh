#!/usr/bin/env bash
# Failover benchmark: tracker + shipper + target on loopback, two volumes (1 GiB and 64 GiB,
# sparse) whose first GiB got 256 MiB of random 64 KiB writes between two points, stored by the
# target in 4 MiB segments (many of them). It prints:
# - the time from `redun test-failover start` to the first successful 4 KiB read of VOL@test
#   (median of 5), for each volume size: the target should answer in well under a second,
#   whatever the size;
# - the read throughput (nbdcopy of the whole 1 GiB volume to null:, page cache warm) of
#   VOL@POINT (base + many segments), VOL@latest, the plain image served over NBD by the
#   tracker (the reference) and the plain image file read directly, with ratios.
# Usage: bash scripts/bench-failover.sh
set -euo pipefail
cd "$(dirname "$0")/.."
for t in fio qemu-io nbdcopy python3; do
    command -v "$t" >/dev/null || { echo "bench: $t is missing: run scripts/install-test-deps.sh" >&2; exit 1; }
done
source scripts/lib.sh
build_release >/dev/null
in_workdir "${BENCH_DIR:-/var/tmp}/redun-failover-bench.XXXXXX"
"$bin/redun" pki init --dir pki --name localhost --name shipper >/dev/null
truncate -s 1G small.img
truncate -s 64G big.img
port=$((20000 + RANDOM % 10000)) # below the ephemeral range (32768 and up)
"$bin/redun-target" --data-dir data --listen "127.0.0.1:$port" --tls-ca pki/ca.crt \
    --tls-cert pki/localhost.crt --tls-key pki/localhost.key --admin-socket target.sock \
    --nbd-listen "unix:$work/target-nbd.sock" --segment-size 4M 2>target.log &
pids+=($!)
"$bin/redun-tracker" --volume small="$work/small.img" --volume big="$work/big.img" \
    --listen unix:"$work/nbd.sock" --admin-socket tracker.sock --journal-dir journal \
    --journal-size 1G --crash-interval 0 2>tracker.log &
pids+=($!)
for _ in $(seq 400); do [ -S nbd.sock ] && [ -S target.sock ] && break; sleep 0.05; done
"$bin/redun-shipper" --journal-dir journal --target "localhost:$port" --tls-ca pki/ca.crt \
    --tls-cert pki/shipper.crt --tls-key pki/shipper.key --admin-socket shipper.sock \
    --tracker-socket tracker.sock 2>shipper.log &
pids+=($!)
for _ in $(seq 400); do [ -S shipper.sock ] && break; sleep 0.05; done
tnbd="$work/target-nbd.sock"
declare -A point
for v in small big; do
    # A first point keeps every later segment from merging into the base.
    "$bin/redun" point create "$v" --tracker-socket tracker.sock --shipper-socket shipper.sock \
        --timeout 600 >/dev/null
    echo "bench: writing 256 MiB into $v..." >&2
    fio --name=w --ioengine=nbd --uri="nbd+unix:///$v?socket=$work/nbd.sock" --rw=randwrite \
        --bs=64k --iodepth=8 --size=1g --io_size=256m --rate=64m --refill_buffers >/dev/null 2>&1
    point[$v]=$("$bin/redun" point create "$v" --tracker-socket tracker.sock \
        --shipper-socket shipper.sock --timeout 600)
done
segments=$(ls data/small.store/*.seg | wc -l)
first_read() { # volume -> milliseconds from test-failover start to the first 4 KiB read
    python3 - "$bin" "$work" "$1" <<'EOF'
import subprocess, sys, time
bin, work, vol = sys.argv[1:]
t = time.monotonic()
subprocess.run([bin + "/redun", "test-failover", "start", vol, "--target-socket",
                work + "/target.sock"], check=True, stdout=subprocess.DEVNULL)
try:
    subprocess.run(["qemu-io", "-f", "raw", "-r", "-c", "read 0 4k",
                    f"nbd+unix:///{vol}@test?socket={work}/target-nbd.sock"],
                   check=True, stdout=subprocess.DEVNULL)
    print(round((time.monotonic() - t) * 1000))
finally:
    subprocess.run([bin + "/redun", "test-failover", "cleanup", vol, "--target-socket",
                    work + "/target.sock"], check=True, stdout=subprocess.DEVNULL)
EOF
}
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
rate() { # URI -> MB/s of a whole read to null: (second run: page cache warm)
    nbdcopy "$1" null: >/dev/null
    local t0 t1
    t0=$(date +%s.%N)
    nbdcopy "$1" null:
    t1=$(date +%s.%N)
    python3 -c "print(round(1024 / ($t1 - $t0), 1))"
}
printf '\n%-40s %12s\n' "test failover: start to first read" "median ms"
for v in small big; do
    size=$([ "$v" = small ] && echo "1 GiB" || echo "64 GiB (sparse)")
    ms=$(for _ in 1 2 3 4 5; do first_read "$v"; done | median)
    printf '%-40s %12s\n' "$size" "$ms"
done
file=$(rate "$work/small.img")
plain=$(rate "nbd+unix:///small?socket=$work/nbd.sock")
atpoint=$(rate "nbd+unix:///small@${point[small]}?socket=$tnbd")
latest=$(rate "nbd+unix:///small@latest?socket=$tnbd")
printf '\n%-48s %10s %14s\n' "read 1 GiB volume (warm cache)" "MB/s" "vs plain image"
printf '%-48s %10s %14s\n' "plain image over NBD (tracker, reference)" "$plain" "1.00"
printf '%-48s %10s %14s\n' "plain image file, no NBD" "$file" "$(python3 -c "print(f'{$file / $plain:.2f}')")"
for row in "small@${point[small]} ($segments segments)|$atpoint" "small@latest|$latest"; do
    name=${row%|*}
    val=${row#*|}
    printf '%-48s %10s %14s\n' "$name" "$val" "$(python3 -c "print(f'{$val / $plain:.2f}')")"
done
