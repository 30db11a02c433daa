#!/usr/bin/env bash
# Installs what `make image` and bench/container_mesh.py use: mmdebstrap (the Debian root filesystem), buildah (the
# OCI image), podman (running it) and runc, through this machine's apt sources; anything already on PATH is kept.
# Needs root (or sudo) only when something is missing.
set -euo pipefail
missing=()
for tool in mmdebstrap buildah podman runc; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
# mmdebstrap and Debian's own trust anchors: the root filesystem is fetched and verified with them.
[ -e /usr/share/keyrings/debian-archive-keyring.gpg ] || missing+=(debian-archive-keyring)
if [ ${#missing[@]} -eq 0 ]; then
  echo "container tools present: mmdebstrap, buildah, podman, runc"
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "container tools: missing ${missing[*]}, and no apt-get here; install them with your package manager" >&2
  exit 2
fi
sudo=()
if [ "$(id -u)" -ne 0 ]; then
  if ! command -v sudo >/dev/null 2>&1; then
    echo "container tools: missing ${missing[*]}; run this script as root to install them" >&2
    exit 2
  fi
  sudo=(sudo)
fi
echo "container tools: installing ${missing[*]}"
"${sudo[@]}" apt-get update -q
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" \
  uidmap slirp4netns fuse-overlayfs
