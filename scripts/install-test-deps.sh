#!/usr/bin/env bash
# Installs everything the tests and benchmarks use, on Debian 12 as root.
set -euo pipefail
if [ "$(id -u)" -ne 0 ]; then
    echo "install-test-deps.sh: run as root (it uses apt-get)" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# libnbd-bin: nbdinfo, nbdsh, nbdcopy; python3-libnbd: the nbd module for the Python checks;
# nbdfuse (in libnbd-bin) + fuse3 + e2fsprogs + util-linux (losetup, mount): ext4 on an export;
# qemu-utils: qemu-io, qemu-img, qemu-nbd; nbdkit and fio: load and benchmark references;
# iproute2 and nftables: network namespaces and packet loss for the replication fault tests;
# systemd: systemd-analyze verify for the unit files; postgresql: a real database (pgbench,
# pg_amcheck) through an unplanned failover; rsync and bc: the synchronisation benchmark's
# reference and arithmetic. python3 (the machine's) creates Azurite's container.
apt-get install -y -qq libnbd-bin python3-libnbd fuse3 e2fsprogs util-linux mount \
    qemu-utils nbdkit fio procps iproute2 nftables systemd postgresql rsync bc >/dev/null
# promtool (in prometheus, without its web UI's recommends) lints the daemons' metrics.
apt-get install -y -qq --no-install-recommends prometheus >/dev/null
# Object storage servers on loopback for the bucket tests (tests/common/objstore.rs), pinned, in
# REDUN_TEST_TOOLS (default /opt/redun-test-tools): s3s-fs (S3; 0.14.1 is the newest that builds
# with this machine's rustc) and Azurite (the Azure Blob emulator, on the machine's Node.js).
tools=${REDUN_TEST_TOOLS:-/opt/redun-test-tools}
mkdir -p "$tools"
if ! "$tools/bin/s3s-fs" --version 2>/dev/null | grep -q "0.14.1"; then
    echo "install-test-deps.sh: building s3s-fs 0.14.1 (about 2 minutes)"
    cargo install --quiet --locked s3s-fs@0.14.1 --features binary --root "$tools"
fi
if [ ! -x "$tools/azurite/node_modules/.bin/azurite-blob" ]; then
    # The machine's Node.js (with npm) serves; Debian's otherwise.
    command -v npm >/dev/null || apt-get install -y -qq nodejs npm >/dev/null
    mkdir -p "$tools/azurite"
    (cd "$tools/azurite" && npm install --silent --no-audit --no-fund azurite@3.35.0 >/dev/null)
fi
echo "install-test-deps.sh: test dependencies installed"
