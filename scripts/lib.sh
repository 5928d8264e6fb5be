# Sourced by demo.sh and the bench-*.sh scripts (from the repository root): builds the
# workspace, then `in_workdir TEMPLATE` makes a temporary directory (mktemp template), moves
# into it and removes it at exit, after stopping every process whose PID was added to `pids`.
# Sets `bin` (the release binaries) and `work`.

build_release() {
    cargo build --release --workspace "$@"
    bin=$PWD/target/release
}

pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null && wait "$p" 2>/dev/null || true; done
    rm -rf "$work"
}

# wait_for PATH: waits up to 20 s for PATH (a socket, a file) to appear.
wait_for() {
    for _ in $(seq 400); do [ -e "$1" ] && return 0; sleep 0.05; done
    echo "$(basename "$0"): $1 never appeared" >&2; exit 1
}

in_workdir() {
    work=$(mktemp -d "$1")
    trap cleanup EXIT
    cd "$work"
}
