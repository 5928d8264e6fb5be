#!/usr/bin/env bash
# Replication benchmark: tracker (journal on the same disk) + shipper + target on loopback.
# fio writes 64 KiB random blocks (incompressible) through the tracker at increasing rates, over
# 1 GiB of the volume (the activity log keeps 1 GiB of extents hot: a wider random working set
# makes the tracker sync to cool extents, which is the tracker's cost, not replication's);
# for each rate the script measures the RPO from outside (the age of the oldest write the
# target has not made durable: tracker head_seq sampled every 100 ms against the shipper's
# acked_seq), bytes on the wire per byte written and shipper CPU per GB shipped. The reference,
# measured in the same run, is the same fio job through the tracker with nobody shipping.
# Usage: bash scripts/bench-replication.sh [SECONDS_PER_RATE] (default 8); RATES="50 100 ..." (MB/s).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
secs=${1:-8}
rates=${RATES:-"50 100 150 200 250 300 400"}
for t in fio python3; do
    command -v "$t" >/dev/null || { echo "bench: $t is missing: run scripts/install-test-deps.sh" >&2; exit 1; }
done
source scripts/lib.sh
build_release >/dev/null
in_workdir "${BENCH_DIR:-/var/tmp}/redun-repl-bench.XXXXXX"
"$bin/redun" pki init --dir pki --name localhost --name shipper >/dev/null
# A written volume and journal: first writes into sparse or preallocated space cost the
# filesystem extra work (allocation, unwritten-extent conversion) that a volume in service
# does not pay.
dd if=/dev/zero of=vol.img bs=1M count=2048 status=none
cp vol.img data-seed.img 2>/dev/null || true
rm -f data-seed.img
port=$((20000 + RANDOM % 10000)) # below the ephemeral range (32768 and up)
"$bin/redun-target" --data-dir data --listen "127.0.0.1:$port" --tls-ca pki/ca.crt \
    --tls-cert pki/localhost.crt --tls-key pki/localhost.key --admin-socket target.sock \
    --nbd-listen off 2>target.log &
pids+=($!)
"$bin/redun-tracker" --volume vol="$work/vol.img" --listen unix:"$work/nbd.sock" \
    --admin-socket tracker.sock --journal-dir journal --journal-size 8G 2>tracker.log &
pids+=($!)
for _ in $(seq 400); do [ -S nbd.sock ] && [ -S target.sock ] && break; sleep 0.05; done
uri="nbd+unix:///vol?socket=$work/nbd.sock"
job() { # rate_mb -> achieved MB/s
    local rate=()
    [ "$1" != 0 ] && rate=(--rate="${1}m")
    fio --name=churn --ioengine=nbd --uri="$uri" --rw=randwrite --bs=64k --iodepth=8 \
        --size=1g --time_based --runtime="$secs" --refill_buffers "${rate[@]}" \
        --output-format=json 2>/dev/null | sed -n '/^{/,$p' |
        python3 -c 'import json,sys; print(round(json.load(sys.stdin)["jobs"][0]["write"]["bw_bytes"]/1e6, 1))'
}
echo "bench: reference, nobody shipping (${secs}s)..." >&2
ref=$(job 0)
"$bin/redun-shipper" --journal-dir journal --target "localhost:$port" --tls-ca pki/ca.crt \
    --tls-cert pki/shipper.crt --tls-key pki/shipper.key --admin-socket shipper.sock \
    --tracker-socket tracker.sock 2>shipper.log &
spid=$!
pids+=($spid)
python3 - "$work" <<'EOF'
import json, socket, sys, time
def st(p):
    s = socket.socket(socket.AF_UNIX); s.connect(p); s.sendall(b'{"cmd":"status"}\n'); d = b''
    while not d.endswith(b'\n'): d += s.recv(1 << 20)
    return json.loads(d)['status']
deadline = time.time() + 600
while time.time() < deadline:
    head = st(sys.argv[1] + '/tracker.sock')['volumes'][0]['journal']['head_seq']
    v = st(sys.argv[1] + '/shipper.sock')['volumes']
    if v and v[0]['acked_seq'] == head: sys.exit(0)
    time.sleep(0.2)
sys.exit("bench: the shipper did not catch up with the reference job's writes")
EOF
printf '%-10s %10s %12s %12s %10s %14s %9s\n' "asked MB/s" "achieved" "max RPO s" "wire/byte" "CPU s/GB" "vs reference" "RPO<=2s"
best=0
for r in $rates; do
    python3 "$repo/scripts/rpo-sample.py" "$work" "$spid" > sample.json &
    sampler=$!
    got=$(job "$r")
    touch done
    wait "$sampler"
    rm -f done
    read -r rpo wire cpu <<<"$(python3 -c 'import json; d=json.load(open("sample.json")); print(round(d["rpo"],2), round(d["wire"],3), round(d["cpu_per_gb"],2))')"
    # Churn held: what the writer achieved while the RPO stayed within 2 s.
    held=$(python3 -c "print('yes' if $rpo <= 2 else 'no')")
    [ "$held" = yes ] && best=$(python3 -c "print(max($best, $got))")
    printf '%-10s %10s %12s %12s %10s %14s %9s\n' "$r" "$got" "$rpo" "$wire" "$cpu" \
        "$(python3 -c "print(f'{$got / $ref:.2f}x')")" "$held"
done
echo "reference (tracker with journal, nobody shipping): $ref MB/s of 64 KiB random writes"
echo "highest churn achieved with RPO <= 2 s: $best MB/s ($(python3 -c "print(f'{$best / $ref:.2f}')")x the reference; target >= 200 MB/s)"
