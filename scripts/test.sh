#!/usr/bin/env bash
# The whole test run: installs the test dependencies, builds the workspace once in release
# mode, checks formatting and lints, runs every test against the built binaries, and runs
# the fuzz target briefly when a nightly toolchain is present. `.ci/run` calls this.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${REDUN_SKIP_INSTALL:-0}" != 1 ]; then
    bash scripts/install-test-deps.sh
fi

echo "== build"
cargo build --release --workspace --all-targets

echo "== fmt and clippy"
cargo fmt --all -- --check
cargo clippy --release --workspace --all-targets -- -D warnings

echo "== tests"
# Integration tests start the binaries built above (target/release).
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --release --workspace -- --test-threads=2 2>&1 | tee "$log"

echo "== fuzz"
bash scripts/fuzz.sh "${REDUN_FUZZ_SECONDS:-20}"

# One closing line for the whole run (cargo prints one per test binary).
awk '/^test result:/ { p += $4; f += $6 } END { print "tests: " p " passed, " f " failed" }' "$log"
