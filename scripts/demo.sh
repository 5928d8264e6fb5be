#!/usr/bin/env bash
# The demo: builds redun, serves a sparse file through redun-tracker on a Unix socket with
# every change journaled, writes and reads it back with real NBD clients (nbdcopy, nbdinfo,
# qemu-img), prints the tracker's status, stops it, checks the journal and replays it onto a
# zero image, which must equal the volume. Everything lives in a temporary directory.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for t in nbdinfo nbdcopy qemu-img; do command -v "$t" >/dev/null || need+=("$t"); done
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" -eq 0 ]; then
        bash scripts/install-test-deps.sh
    else
        echo "demo: missing ${need[*]}: run scripts/install-test-deps.sh as root" >&2
        exit 1
    fi
fi

cargo build --release --workspace
bin=$PWD/target/release
work=$(mktemp -d /tmp/redun-demo.XXXXXX)
pid=
cleanup() {
    [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

truncate -s 1G "$work/volume.img"
"$bin/redun-tracker" --volume demo="$work/volume.img" \
    --listen "unix:$work/nbd.sock" --admin-socket "$work/tracker.sock" \
    --journal-dir "$work/journal" --journal-size 256M 2>"$work/tracker.log" &
pid=$!
for _ in $(seq 100); do [ -S "$work/tracker.sock" ] && break; sleep 0.05; done
uri="nbd+unix:///demo?socket=$work/nbd.sock"

echo "== the export, as a client sees it"
PATH=/usr/bin:$PATH nbdinfo "$uri"
echo "== write 64 MiB of random data through the tracker, then read it back"
head -c 64M /dev/urandom >"$work/data"
nbdcopy --connections=4 --requests=16 --flush "$work/data" "$uri"
qemu-img convert -f raw -O raw "$uri" "$work/back"
cmp -n $((64 << 20)) "$work/data" "$work/back" && echo "read back: identical"
cmp -n $((64 << 20)) "$work/data" "$work/volume.img" && echo "backing file: identical"
echo "== redun status"
"$bin/redun" status --tracker-socket "$work/tracker.sock"
kill -TERM "$pid"
wait "$pid" && echo "== tracker stopped cleanly"
pid=
echo "== the journal: check, then replay onto a zero image"
"$bin/redun" journal check "$work/journal/demo.journal"
truncate -s 1G "$work/zero.img"
"$bin/redun" journal replay --base "$work/zero.img" --journal "$work/journal/demo.journal" \
    --out "$work/replayed.img"
cmp "$work/replayed.img" "$work/volume.img" && echo "journal replay: identical to the volume"
