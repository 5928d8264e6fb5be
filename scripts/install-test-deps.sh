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
# reference and arithmetic.
apt-get install -y -qq libnbd-bin python3-libnbd fuse3 e2fsprogs util-linux mount \
    qemu-utils nbdkit fio procps iproute2 nftables systemd postgresql rsync bc >/dev/null
# promtool (in prometheus, without its web UI's recommends) lints the daemons' metrics.
apt-get install -y -qq --no-install-recommends prometheus >/dev/null
echo "install-test-deps.sh: test dependencies installed"
