#!/usr/bin/env bash
# Makes Prometheus available as $LMESH_CACHE/bin/prometheus and $LMESH_CACHE/bin/promtool (prints the server's
# path), for the tests that run deploy/prometheus/prometheus.yml against a real mesh. Order: a `prometheus` already
# on PATH (with its `promtool` beside it); Debian's prometheus package, fetched with `apt-get download` through this
# machine's own apt sources and unpacked without root (dpkg-deb -x: the two binaries are all that is used).
set -euo pipefail
cache=${LMESH_CACHE:-$HOME/.cache/lmesh}
bin_dir="$cache/bin"
target="$bin_dir/prometheus"
unpacked="$cache/prometheus"
mkdir -p "$bin_dir"

runs() { [ -x "$1" ] && "$1" --version >/dev/null 2>&1; }
if runs "$target" && runs "$bin_dir/promtool"; then echo "$target"; exit 0; fi
if existing=$(command -v prometheus 2>/dev/null) && tool=$(command -v promtool 2>/dev/null); then
  ln -sf "$existing" "$target"
  ln -sf "$tool" "$bin_dir/promtool"
  echo "$target"
  exit 0
fi
source "$(dirname "${BASH_SOURCE[0]}")/debian_packages.sh"
unpack_debian_packages "$unpacked" prometheus prometheus || exit 2
for name in prometheus promtool; do
  ln -sf "$unpacked/usr/bin/$name" "$bin_dir/$name.new"
  mv -T "$bin_dir/$name.new" "$bin_dir/$name"
done
if ! runs "$target" || ! runs "$bin_dir/promtool"; then
  echo "prometheus: the unpacked binaries do not run here: $("$target" --version 2>&1 | tail -n 1)" >&2
  rm -f "$target" "$bin_dir/promtool"
  exit 2
fi
echo "$target"
