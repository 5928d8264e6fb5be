#!/usr/bin/env bash
# Runs each fuzz target (NBD session, journal records, replication frames) for N seconds (default 30). Needs the nightly toolchain
# that this machine kind ships; without it, says so and skips (the stable-toolchain
# mutation test in tracker/src/nbd/server.rs still runs with the unit tests).
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-30}"
if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "SKIPPED fuzz: no nightly toolchain on this machine (rustup toolchain list)"
    exit 0
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi
for crate_target in tracker:nbd_session tracker:journal_records shipper:replication_frames; do
    crate=${crate_target%%:*} target=${crate_target#*:}
    (cd "$crate" && cargo +nightly fuzz run "$target" -- -max_total_time="$secs" -rss_limit_mb=2048 2>&1 | tail -n 3)
    echo "fuzz: $target ran ${secs}s without a crash"
done
