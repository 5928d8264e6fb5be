#!/usr/bin/env bash
# The demo, on local files and loopback: a volume that already holds data, protected by
# redun-tracker and shipped by redun-shipper over mutual TLS to redun-target (its initial
# replication first); recovery points; an online verify; a point read back over NBD; a test
# failover; a planned failover that loses nothing, and the failback home. Real NBD clients (nbdcopy, nbdinfo,
# qemu-io) do the I/O. Everything lives in a temporary directory and stops at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for t in nbdinfo nbdcopy qemu-io; do command -v "$t" >/dev/null || need+=("$t"); done
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" -eq 0 ]; then
        bash scripts/install-test-deps.sh
    else
        echo "demo: missing ${need[*]}: run scripts/install-test-deps.sh as root" >&2
        exit 1
    fi
fi
export PATH=/usr/bin:$PATH

source scripts/lib.sh
build_release
in_workdir /tmp/redun-demo.XXXXXX
redun() { "$bin/redun" "$@"; }
sockets=(--tracker-socket tracker.sock --shipper-socket shipper.sock --target-socket target.sock)

echo "== certificates for mutual TLS: a CA, the target (localhost) and the shipper"
redun pki init --dir pki --name localhost --name shipper
echo "== the master target, the tracker in front of a 256 MiB volume holding 32 MiB of data, the shipper"
"$bin/redun-target" --data-dir data --listen 127.0.0.1:0 --tls-ca pki/ca.crt \
    --tls-cert pki/localhost.crt --tls-key pki/localhost.key --admin-socket target.sock \
    --nbd-listen "unix:$work/target-nbd.sock" 2>target.log &
pids+=($!)
truncate -s 256M volume.img
head -c 32M /dev/urandom | dd of=volume.img bs=1M seek=200 conv=notrunc status=none
"$bin/redun-tracker" --volume demo="$work/volume.img" --listen "unix:$work/nbd.sock" \
    --admin-socket tracker.sock --journal-dir journal --journal-size 128M 2>tracker.log &
pids+=($!)
wait_for target.sock
wait_for tracker.sock
port=$(sed -n 's/.*shippers on 127.0.0.1:\([0-9]*\).*/\1/p' target.log | head -1)
"$bin/redun-shipper" --journal-dir journal --tracker-socket tracker.sock --target "localhost:$port" \
    --tls-ca pki/ca.crt --tls-cert pki/shipper.crt --tls-key pki/shipper.key \
    --admin-socket shipper.sock 2>shipper.log &
pids+=($!)
wait_for shipper.sock
src="nbd+unix:///demo?socket=$work/nbd.sock"
at() { echo "nbd+unix:///demo@$1?socket=$work/target-nbd.sock"; }

echo "== initial replication: the data the volume held is compared and copied while it stays in use"
for _ in $(seq 600); do
    redun status --json "${sockets[@]}" | grep -q '"state": "protected"' && break
    sleep 0.1
done
grep 'synchronisation .* done' shipper.log | sed 's/.*INFO  redun_shipper::sync\] //'

echo "== write 64 MiB through the tracker, place a recovery point, write 16 MiB more"
head -c 64M /dev/urandom >data1
nbdcopy --flush data1 "$src"
p1=$(redun point create demo "${sockets[@]:0:4}")
cp --sparse=always volume.img at-p1.img
qemu-io -f raw -c "write -P 0x5a 128M 16M" -c flush "$src" >/dev/null
p2=$(redun point create demo "${sockets[@]:0:4}")
echo "points $p1 and $p2 are on the target"
redun status "${sockets[@]}"
redun points demo --target-socket target.sock

echo "== online verify: source and replica compared block by block while replication runs"
redun verify demo --shipper-socket shipper.sock

echo "== point $p1 read back from the target over NBD"
nbdcopy "$(at "$p1")" p1.img
cmp p1.img at-p1.img && echo "point $p1: identical to the volume at that moment"

echo "== test failover of point $p1: writable, replication goes on, the replica untouched"
redun test-failover start demo --point "$p1" --target-socket target.sock
qemu-io -f raw -c "write -P 0x77 0 1M" "$(at test)" >/dev/null
qemu-io -f raw -r -c "read -P 0x77 0 1M" "$(at test)" | grep -q "read 1048576" && echo "demo@test took a write"
redun test-failover cleanup demo --target-socket target.sock
nbdcopy "$(at "$p1")" p1-again.img
cmp p1-again.img at-p1.img && echo "point $p1: still identical after the test"

echo "== planned failover: the source refuses writes, everything ships, the final point is promoted"
redun failover demo --planned "${sockets[@]}"
if qemu-io -f raw -c "write 0 4k" "$src" >/dev/null 2>&1; then
    echo "demo: the source still took a write after the failover" >&2; exit 1
fi
echo "the source refuses writes"
nbdcopy "nbd+unix:///demo?socket=$work/target-nbd.sock" promoted.img
cmp promoted.img volume.img && echo "the promoted volume on the target: identical to the source, nothing lost"
redun failover commit demo --target-socket target.sock

echo "== failback: the DR site writes, the changed blocks come back, the workload goes home"
qemu-io -f raw -c "write -P 0x3c 8M 4M" -c flush "nbd+unix:///demo?socket=$work/target-nbd.sock" >/dev/null
redun reverse demo --shipper-socket shipper.sock
nbdcopy "nbd+unix:///demo?socket=$work/target-nbd.sock" promoted.img
redun failover demo --planned "${sockets[@]}"
cmp promoted.img volume.img && echo "the original site holds the DR site's latest data again"
qemu-io -f raw -c "write -P 0x11 0 1M" -c flush "$src" >/dev/null && echo "the source takes writes again"
for _ in $(seq 600); do
    redun status --json "${sockets[@]}" | grep -q '"lag_bytes": 0' && break
    sleep 0.1
done
redun status "${sockets[@]}"
echo "== done; the logs were in $work (removed now)"
