#!/usr/bin/env bash
# Object-storage benchmark: a tracker, and a shipper writing straight into a bucket on a real
# object server on loopback (s3s-fs for S3, Azurite for Azure Blob, as installed by
# scripts/install-test-deps.sh). For each server, in one run:
#   1. initial replication of a SIZE_GIB volume of random data written before protection;
#   2. sustained churn: fio 64 KiB random writes at RATE MB/s for CHURN_SECONDS, while the RPO
#      (age of the oldest write not yet listed by a manifest in the bucket) is sampled every
#      100 ms; PUT requests per GB replicated (the shipper's count: objects and manifest
#      versions);
#   3. a point after the churn, restored with `redun restore` to a file, timed and compared
#      byte for byte with the volume.
# References measured in the same run: a local copy of the volume file (dd, fdatasync) for the
# restore throughput, and the least PUTs per GB the format allows (one per 8 MiB segment, one
# manifest version per upload round). Target: RPO <= 10 s under churn.
# Usage: bash scripts/bench-objstore.sh [CHURN_SECONDS] (default 60);
#        SERVERS="s3 azure", SIZE_GIB=4, RATE=20 (MB/s), BENCH_DIR=/var/tmp.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
secs=${1:-60}
servers=${SERVERS:-"s3 azure"}
gib=${SIZE_GIB:-4}
rate=${RATE:-20}
tools=${REDUN_TEST_TOOLS:-/opt/redun-test-tools}
for t in fio python3 "$tools/bin/s3s-fs" "$tools/azurite/node_modules/.bin/azurite-blob"; do
    command -v "$t" >/dev/null || { echo "bench: $t is missing: run scripts/install-test-deps.sh" >&2; exit 1; }
done
source scripts/lib.sh
build_release >/dev/null
in_workdir "${BENCH_DIR:-/var/tmp}/redun-objstore-bench.XXXXXX"
# Status of a daemon's admin socket, one field by Python expression over `s`.
field() { # socket expr
    python3 - "$1" "$2" <<'PY'
import json, socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.sendall(b'{"cmd":"status"}\n'); d = b''
while not d.endswith(b'\n'): d += s.recv(1 << 20)
s = json.loads(d)['status']
print(eval(sys.argv[2]))
PY
}
caught_up() { # waits until the bucket holds every record and no synchronisation runs
    for _ in $(seq 6000); do
        local head acked
        head=$(field tracker.sock "s['volumes'][0]['journal']['head_seq']")
        acked=$(field shipper.sock "(lambda v: v['acked_seq'] if 'sync' not in v else -1)(s['volumes'][0])")
        [ "$head" = "$acked" ] && return 0
        sleep 0.1
    done
    echo "bench: the shipper did not catch up" >&2; tail -5 shipper.log >&2; exit 1
}
mbps() { python3 -c "print(round($1 / 1e6 / $2, 1))"; }
now() { date +%s.%N; }

echo "bench: writing a ${gib} GiB volume of random data..." >&2
fio --name=fill --filename=vol.img --rw=write --bs=1M --size="${gib}g" --refill_buffers \
    --end_fsync=1 >/dev/null
bytes=$((gib << 30))
t0=$(now)
dd if=vol.img of=copy.img bs=4M conv=fdatasync status=none
t1=$(now)
local_copy=$(mbps "$bytes" "$(python3 -c "print($t1 - $t0)")")
rm -f copy.img
mkdir keys && "$bin/redun" key new keys/vol.key >/dev/null
rows=()
for server in $servers; do
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    rm -rf objdata && mkdir -p objdata
    case $server in
    s3)
        mkdir objdata/redun
        "$tools/bin/s3s-fs" --host 127.0.0.1 --port "$port" --access-key bench \
            --secret-key bench-secret objdata 2>s3s-fs.log &
        url=s3://redun/site
        printf '[bucket]\nendpoint = "http://127.0.0.1:%s"\nregion = "us-east-1"\naccess_key_id = "bench"\nsecret_access_key = "bench-secret"\nallow_http = true\n' "$port" >redun.toml
        ;;
    azure)
        "$tools/azurite/node_modules/.bin/azurite-blob" --blobHost 127.0.0.1 --blobPort "$port" \
            --location objdata --disableTelemetry --skipApiVersionCheck --loose --silent \
            2>azurite.log &
        url=az://redun/site
        printf '[bucket]\nendpoint = "http://127.0.0.1:%s/devstoreaccount1"\naccount = "devstoreaccount1"\naccess_key = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="\nallow_http = true\n' "$port" >redun.toml
        ;;
    *) echo "bench: unknown server $server (s3, azure)" >&2; exit 1 ;;
    esac
    server_pid=$!
    pids+=("$server_pid")
    for _ in $(seq 1200); do python3 -c "import socket; socket.create_connection(('127.0.0.1', $port))" 2>/dev/null && break; sleep 0.05; done
    [ "$server" = azure ] && python3 "$repo/tests/scripts/az_container.py" "$port" redun
    rm -rf journal && cp --sparse=always vol.img work.img
    "$bin/redun-tracker" --volume vol="$work/work.img" --listen unix:"$work/nbd.sock" \
        --admin-socket tracker.sock --journal-dir journal --journal-size 2G 2>tracker.log &
    tracker_pid=$!
    pids+=("$tracker_pid")
    wait_for tracker.sock
    echo "bench: $server: initial replication of ${gib} GiB..." >&2
    t0=$(now)
    "$bin/redun-shipper" --journal-dir journal --tracker-socket tracker.sock \
        --target-store "$url" --key-dir keys --config redun.toml --admin-socket shipper.sock \
        2>shipper.log &
    shipper_pid=$!
    pids+=("$shipper_pid")
    wait_for shipper.sock
    sleep 1
    caught_up
    t1=$(now)
    initial=$(mbps "$bytes" "$(python3 -c "print($t1 - $t0)")")
    echo "bench: $server: churn at $rate MB/s for ${secs}s..." >&2
    rm -f done
    python3 "$repo/scripts/rpo-sample.py" "$work" "$shipper_pid" >sample.json &
    sampler=$!
    fio --name=churn --ioengine=nbd --uri="nbd+unix:///vol?socket=$work/nbd.sock" \
        --rw=randwrite --bs=64k --iodepth=8 --rate="${rate}m" --time_based --runtime="$secs" \
        --refill_buffers --output-format=json 2>/dev/null | sed -n '/^{/,$p' >fio.json
    touch done
    wait "$sampler"
    churn=$(python3 -c 'import json; print(round(json.load(open("fio.json"))["jobs"][0]["write"]["bw_bytes"]/1e6, 1))')
    read -r rpo puts_gb <<<"$(python3 -c 'import json; d=json.load(open("sample.json")); print(round(d["rpo"],2), round(d["puts"]/max(d["shipped"]/1e9,1e-9)))')"
    point=$("$bin/redun" point create vol --tracker-socket tracker.sock --shipper-socket shipper.sock)
    caught_up
    echo "bench: $server: restoring point $point..." >&2
    t0=$(now)
    "$bin/redun" restore vol --store "$url" --key keys/vol.key --config redun.toml \
        --point "$point" --to restored.img --quiet
    t1=$(now)
    restore=$(mbps "$bytes" "$(python3 -c "print($t1 - $t0)")")
    same=no
    cmp -s restored.img work.img && same=yes
    rows+=("$(printf '%-7s %11s %11s %10s %9s %12s %10s %8s' "$server" "$initial" "$churn" "$rpo" "$puts_gb" "$restore" \
        "$(python3 -c "print(f'{$restore / $local_copy:.2f}x')")" "$same")")
    for p in "$shipper_pid" "$tracker_pid" "$server_pid"; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null || true; done
    rm -rf restored.img work.img journal objdata tracker.sock shipper.sock nbd.sock
done
printf '%-7s %11s %11s %10s %9s %12s %10s %8s\n' server "initial MB/s" "churn MB/s" "max RPO s" "PUTs/GB" "restore MB/s" "vs local" "equal"
printf '%s\n' "${rows[@]}"
echo "reference: local copy of the volume file (dd, fdatasync): $local_copy MB/s; least PUTs/GB: $(python3 -c "print(round(1e9 / (8 << 20)))") (8 MiB segments) plus one manifest per upload round"
echo "target: max RPO <= 10 s at $rate MB/s of churn (segments flushed every 2 s)"
