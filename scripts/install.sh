#!/usr/bin/env bash
# Installs redun: the binaries, an example config, the systemd units and the documentation.
# Starts nothing unless asked (--enable). Honours DESTDIR and PREFIX (default /usr/local).
#   bash scripts/install.sh [--enable]      build (unless BIN_DIR is given) and install
#   bash scripts/install.sh --uninstall     remove what an earlier install put there
# The list of installed files is kept in $PREFIX/share/redun/installed-files; --uninstall
# removes exactly those (an edited /etc/redun/redun.toml is never written by either).
set -euo pipefail
cd "$(dirname "$0")/.."
prefix=${PREFIX:-/usr/local}
dest=${DESTDIR:-}
manifest="$dest$prefix/share/redun/installed-files"
unitdir=${UNITDIR:-/etc/systemd/system}

if [ "${1:-}" = --uninstall ]; then
    if [ ! -f "$manifest" ]; then
        echo "install.sh: nothing to uninstall ($manifest is missing)" >&2
        exit 1
    fi
    if [ -z "$dest" ] && command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
        systemctl disable --now redun-shipper.service redun-target.service redun-tracker.service 2>/dev/null || true
    fi
    while IFS= read -r f; do
        rm -f "$dest$f"
    done < "$manifest"
    rm -f "$manifest"
    rmdir "$dest$prefix/share/redun" "$dest$prefix/share/doc/redun" 2>/dev/null || true
    [ -z "$dest" ] && command -v systemctl >/dev/null && [ -d /run/systemd/system ] && systemctl daemon-reload || true
    echo "install.sh: uninstalled (the config in /etc/redun and the data in /var/lib/redun are kept)"
    exit 0
fi

bin_dir=${BIN_DIR:-}
if [ -z "$bin_dir" ]; then
    cargo build --release --workspace
    bin_dir=target/release
fi
installed=()
put() { # mode source destination
    install -D -m "$1" "$2" "$dest$3"
    installed+=("$3")
}
for b in redun redun-tracker redun-shipper redun-target; do
    put 0755 "$bin_dir/$b" "$prefix/bin/$b"
done
for u in scripts/systemd/*.service; do
    name=$(basename "$u")
    install -d "$dest$unitdir"
    sed "s|/usr/local/bin/|$prefix/bin/|; s|/usr/local/share/doc/redun/|$prefix/share/doc/redun/|" "$u" > "$dest$unitdir/$name"
    chmod 0644 "$dest$unitdir/$name"
    installed+=("$unitdir/$name")
done
put 0644 scripts/redun.example.toml /etc/redun/redun.toml.example
for doc in README.md ARCHITECTURE.md docs/*.md; do
    put 0644 "$doc" "$prefix/share/doc/redun/$(basename "$doc")"
done
install -d -m 0700 "$dest/var/lib/redun"
mkdir -p "$(dirname "$manifest")"
printf '%s\n' "${installed[@]}" > "$manifest"
echo "install.sh: installed ${#installed[@]} files under ${dest:-/} (prefix $prefix)"
if [ ! -e "$dest/etc/redun/redun.toml" ]; then
    echo "install.sh: next: cp /etc/redun/redun.toml.example /etc/redun/redun.toml, edit it, redun config check it"
fi
if [ "${1:-}" = --enable ] && [ -z "$dest" ]; then
    systemctl daemon-reload
    systemctl enable --now redun-tracker.service redun-shipper.service
fi
