#!/usr/bin/env bash
# Kill -9 soak for change tracking (the test suite runs 20 such trials; this runs many more).
# Each trial: a zero image behind a journaled redun-tracker, alternately the uring and the sync
# engine; fio writes (random 4 KiB to 256 KiB, with flushes) while a second client writes
# blocks and flushes them; SIGKILL at a random moment; then
#   - `redun journal replay` of the journal onto a zero image equals the backing file outside
#     the dirty ranges the restarted tracker reports (invariant J), and
#   - every block whose flush completed before the kill is in the replayed journal.
# Usage: scripts/soak-kill9.sh [TRIALS, default 200]
set -euo pipefail
cd "$(dirname "$0")/.."
trials="${1:-200}"
for t in fio nbdsh python3; do
    command -v "$t" >/dev/null || { echo "soak: $t missing: run scripts/install-test-deps.sh" >&2; exit 1; }
done
cargo build --release --workspace >/dev/null 2>&1 || cargo build --release --workspace
bin=$PWD/target/release
export PATH=/usr/bin:$PATH

work=$(mktemp -d "${SOAK_DIR:-/var/tmp}/redun-soak.XXXXXX")
pid=
fio_pid=
cleanup() {
    [ -n "$fio_pid" ] && kill "$fio_pid" 2>/dev/null && wait "$fio_pid" 2>/dev/null || true
    [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

start_tracker() { # backend
    rm -f "$work/nbd.sock" "$work/admin.sock"
    "$bin/redun-tracker" --volume soak="$work/disk.img" --listen "unix:$work/nbd.sock" \
        --admin-socket "$work/admin.sock" --backend "$1" \
        --journal-dir "$work/journal" --journal-size 512M 2>>"$work/tracker.log" &
    pid=$!
    for _ in $(seq 200); do [ -S "$work/admin.sock" ] && [ -S "$work/nbd.sock" ] && return 0; sleep 0.05; done
    echo "soak: the tracker did not start:" >&2; tail "$work/tracker.log" >&2; exit 1
}

uri="nbd+unix:///soak?socket=$work/nbd.sock"
failed=0
for trial in $(seq "$trials"); do
    backend=uring; [ $((trial % 2)) -eq 0 ] && backend=sync
    rm -rf "$work/journal" "$work/disk.img"
    truncate -s 128M "$work/disk.img"
    start_tracker "$backend"
    fio --name=w --thread --ioengine=nbd --uri="$uri" --rw=randwrite --bsrange=4k-256k --iodepth=8 \
        --offset=64m --size=64m --time_based --runtime=30 --fsync=16 --rate=100m \
        >/dev/null 2>&1 &
    fio_pid=$!
    # Let fio get going (it takes a moment to start), for a random while.
    sleep "0.$((5 + RANDOM % 5))"
    # Blocks of the first 64 MiB, flushed in batches; the script kills the tracker itself
    # after a random number of them.
    kill_after=$((64 + RANDOM % 2000))
    nbdsh -n -c "import sys; sys.argv = ['x', '$uri', '$pid', '$kill_after']
exec(open('tests/scripts/flushed_then_kill.py').read())" >"$work/flushed" 2>/dev/null || true
    { wait "$pid"; } 2>/dev/null || true
    pid=
    kill -9 "$fio_pid" 2>/dev/null || true; { wait "$fio_pid"; } 2>/dev/null || true; fio_pid=
    truncate -s 128M "$work/zero.img"
    "$bin/redun" journal replay --base "$work/zero.img" --journal "$work/journal/soak.journal" \
        --out "$work/replayed.img" >/dev/null
    rm -f "$work/zero.img"
    start_tracker "$backend"
    "$bin/redun" status --json --tracker-socket "$work/admin.sock" >"$work/status.json"
    kill "$pid"; wait "$pid" || true; pid=
    if ! python3 - "$work" "$trial" "$backend" <<'EOF'
import json, sys
work, trial, backend = sys.argv[1], sys.argv[2], sys.argv[3]
v = json.load(open(f"{work}/status.json"))["tracker"]["status"]["volumes"][0]
dirty = v["dirty_ranges"]
replayed = open(f"{work}/replayed.img", "rb").read()
image = open(f"{work}/disk.img", "rb").read()
bad = []
for at in range(0, len(image), 4096):
    if replayed[at:at + 4096] != image[at:at + 4096]:
        if not any(o <= at and at + 4096 <= o + l for o, l in dirty):
            bad.append(at)
flushed = [int(l.split()[1]) for l in open(f"{work}/flushed") if l.startswith("flushed ")]
lost = [i for i in flushed if replayed[i * 4096:(i + 1) * 4096] != bytes([i % 250 + 1]) * 4096]
mib = lambda r: f"{r[0] >> 20}-{(r[0] + r[1]) >> 20}M"
print(f"trial {trial} {backend}: {len(flushed)} flushed blocks, dirty {' '.join(map(mib, dirty))}, "
      f"{len(bad)} undirty differences, {len(lost)} flushed blocks missing")
sys.exit(1 if bad or lost else 0)
EOF
    then
        failed=$((failed + 1))
    fi
done
echo "soak: $trials trials, $failed failed"
[ "$failed" -eq 0 ]
