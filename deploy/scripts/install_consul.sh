#!/usr/bin/env bash
# Makes a Consul agent available as $LMESH_CACHE/bin/consul (prints its path).
# Order: a `consul` already on PATH; Debian bullseye's consul 1.8.7 package through the mirror configured in
# this machine's apt sources; the copy of that package in ../shared/consul/. The package is checked against
# its sha256 either way.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cache=${LMESH_CACHE:-$HOME/.cache/lmesh}
bin_dir="$cache/bin"
target="$bin_dir/consul"
pkg="consul_1.8.7+dfsg1-2+b3_amd64.deb"
sha256="e4e888bba104daba1d9161f49bfc52649a7e4efd45b1a7ead5bc54f2cb9c89d9"
mkdir -p "$bin_dir"

if [ -x "$target" ]; then echo "$target"; exit 0; fi
if existing=$(command -v consul 2>/dev/null); then ln -sf "$existing" "$target"; echo "$target"; exit 0; fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# The Debian mirror this machine already uses (deb822 "URIs:" or one-line "deb URI suite" sources).
mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list 2>/dev/null \
  | awk '/^URIs:/ {print $2} /^deb / {for (i=2;i<=NF;i++) if ($i ~ /^https?:/) {print $i; break}}' \
  | grep -E '/debian/?$' | head -n 1 || true)
got=""
if [ -n "$mirror" ]; then
  url="${mirror%/}/pool/main/c/consul/$pkg"
  if curl -fsSL --retry 2 --max-time 120 -o "$tmp/$pkg" "$url" 2>/dev/null \
     && echo "$sha256  $tmp/$pkg" | sha256sum -c --quiet - 2>/dev/null; then
    got="$tmp/$pkg"
  else
    echo "consul: could not fetch $pkg from the apt mirror; trying ../shared" >&2
  fi
fi
if [ -z "$got" ]; then
  for candidate in "$root/../shared/consul/$pkg" "$root/shared/consul/$pkg"; do
    if [ -f "$candidate" ] && echo "$sha256  $candidate" | sha256sum -c --quiet - 2>/dev/null; then
      got="$candidate"; break
    fi
  done
fi
if [ -z "$got" ]; then
  echo "consul: no agent found. Install one (e.g. put 'consul' on PATH) and run again." >&2
  exit 2
fi
dpkg-deb -x "$got" "$tmp/x"
install -m 0755 "$tmp/x/usr/bin/consul" "$target"
echo "$target"
