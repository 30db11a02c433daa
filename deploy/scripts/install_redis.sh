#!/usr/bin/env bash
# Makes a Redis server available as $LMESH_CACHE/bin/redis-server (prints its path), for the tests and for a
# development mesh whose policy replicas share a ledger. Order: a `redis-server` already on PATH; Debian's
# redis-server package and the libraries it loads (redis-tools holds the binary, liblzf1, libjemalloc2), fetched
# with `apt-get download` through this machine's own apt sources and unpacked without root (dpkg-deb -x).
set -euo pipefail
cache=${LMESH_CACHE:-$HOME/.cache/lmesh}
bin_dir="$cache/bin"
target="$bin_dir/redis-server"
unpacked="$cache/redis"
mkdir -p "$bin_dir"

if [ -x "$target" ] && "$target" --version >/dev/null 2>&1; then echo "$target"; exit 0; fi
if existing=$(command -v redis-server 2>/dev/null); then ln -sf "$existing" "$target"; echo "$target"; exit 0; fi
source "$(dirname "${BASH_SOURCE[0]}")/debian_packages.sh"
unpack_debian_packages "$unpacked" redis redis-server redis-tools liblzf1 libjemalloc2 || exit 2
libs=$(find "$unpacked/usr/lib" -maxdepth 1 -type d -name '*-linux-gnu*' | head -n 1)
cat >"$target.new" <<WRAPPER
#!/bin/sh
# Debian's redis-server, unpacked by deploy/scripts/install_redis.sh, with its libraries beside it.
LD_LIBRARY_PATH="$libs\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" exec "$unpacked/usr/bin/redis-server" "\$@"
WRAPPER
chmod 0755 "$target.new"
mv "$target.new" "$target"
if ! "$target" --version >/dev/null 2>&1; then
  echo "redis: the unpacked redis-server does not run here: $("$target" --version 2>&1 | tail -n 1)" >&2
  rm -f "$target"
  exit 2
fi
echo "$target"
