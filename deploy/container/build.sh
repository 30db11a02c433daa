#!/usr/bin/env bash
# Builds the lmesh container image without a registry: a Debian root filesystem made by mmdebstrap from this
# machine's own apt mirror, lmesh and its dependencies installed from wheels made here into a venv inside it
# (no index is reached from inside), the embeddings model the Kubernetes manifests expect, then committed as an
# OCI image by buildah: localhost/lmesh:<version in pyproject.toml>, also tagged :latest.
#
# usage: deploy/container/build.sh [PYTHON]
#   PYTHON: the interpreter whose pip resolves and downloads the wheels (default .venv/bin/python); its pip
#           configuration (index, mirror, constraints) is the one used.
#   LMESH_CACHE: where the wheels, the Debian packages and the root filesystem are cached (container/ in it).
#   LMESH_EMBEDDINGS_DIR: the built embeddings model (default $LMESH_CACHE/models/all-minilm-l6-v2), and
#   LMESH_EMBEDDINGS_TOOLS_DIR: the tool-retrieval one built beside it (default $LMESH_CACHE/models/all-minilm-l6-v2-tools).
# The image's contract (tests/test_container.py holds it to deploy/kubernetes/lmesh.yaml): entrypoint `lmesh`,
# user and group 10001, LMESH_HOME=/data and LMESH_CACHE=/cache, ports 7000 (gRPC), 7001 (health), 8080 (the
# gateway's HTTP API) and 9464 (metrics). The language model is not in the image: inference fetches it from the
# registry. Running it again with nothing changed rebuilds nothing.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
python=${1:-$root/.venv/bin/python}
cache=${LMESH_CACHE:-$HOME/.cache/lmesh}
embeddings=${LMESH_EMBEDDINGS_DIR:-$cache/models/all-minilm-l6-v2}
tools_embeddings=${LMESH_EMBEDDINGS_TOOLS_DIR:-$cache/models/all-minilm-l6-v2-tools}
work="$cache/container"
suite=bookworm  # its python3 is 3.11, the version lmesh is developed and tested on
image_python=3.11.2  # bookworm's python3 exactly (the root filesystem's build checks it): the wheels' markers need it
# What the services' wheels load beyond Python and the essential set: libstdc++ (onnxruntime, grpcio; their NEEDED
# entries ask for nothing else, no libgomp); CA certificates for OTLP exporters and Redis over TLS.
packages=python3,libstdc++6,ca-certificates
image=localhost/lmesh
uid=10001
embeddings_in_image=/opt/lmesh/models/all-minilm-l6-v2
tools_embeddings_in_image=/opt/lmesh/models/all-minilm-l6-v2-tools

version=$(sed -n 's/^version *= *"\(.*\)"/\1/p' "$root/pyproject.toml" | head -n 1)
started=$(date +%s)
step() { echo "[image $(($(date +%s) - started))s] $*"; }

for tool in mmdebstrap buildah; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "image: $tool is missing; run deploy/scripts/install_container_tools.sh" >&2
    exit 2
  fi
done
if [ ! -x "$python" ]; then
  echo "image: no Python at $python; run \`make venv\` or pass an interpreter with pip" >&2
  exit 2
fi
for dir in "$embeddings" "$tools_embeddings"; do
  if [ ! -f "$dir/lmesh_embeddings.json" ]; then
    echo "image: no embeddings model at $dir; run \`make embeddings-model\`" >&2
    exit 2
  fi
done
# The Debian mirror this machine already uses (deb822 "URIs:" or one-line "deb URI suite" sources).
mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list 2>/dev/null \
  | awk '/^URIs:/ {print $2} /^deb / {for (i=2;i<=NF;i++) if ($i ~ /^https?:/) {print $i; break}}' \
  | grep -E '/debian/?$' | head -n 1 || true)
if [ -z "$mirror" ]; then
  echo "image: no Debian mirror in /etc/apt/sources.list*; add one (a 'deb URI bookworm main' line) and run again" >&2
  exit 2
fi

mkdir -p "$work/wheels" "$work/debs"
tmp=$(mktemp -d)
container=""
cleanup() {
  if [ -n "$container" ]; then buildah rm "$container" >/dev/null 2>&1 || true; fi
  rm -rf "$tmp"
}
trap cleanup EXIT

# ---- 1. wheels: lmesh from the tracked sources, its dependencies pinned as pip resolves them for the image -------
src="$tmp/src"
mkdir -p "$src"
# A copy of what git tracks (plus new files it does not ignore): a stale build/ or egg-info never reaches the wheel.
if git -C "$root" rev-parse --git-dir >/dev/null 2>&1; then
  (cd "$root" && git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf -) | tar -xf - -C "$src"
else
  (cd "$root" && tar --exclude=./.venv --exclude=./build --exclude='*.egg-info' --exclude=./.lmesh -cf - .) \
    | tar -xf - -C "$src"
fi
# pip's output only when it fails (a mirror's index may warn about every package it lacks).
pip_quietly() {
  "$python" -m pip "$@" >"$tmp/pip.log" 2>&1 || { cat "$tmp/pip.log" >&2; echo "image: pip $1 failed (above)" >&2; exit 2; }
}
step "wheels: lmesh $version built from the sources"
mkdir -p "$tmp/wheels"
# Its files dated 1980-01-01 (zip's earliest), not now: the same sources give the same wheel whatever the commit,
# and the cached build stands.
SOURCE_DATE_EPOCH=315532800 pip_quietly wheel --no-deps --wheel-dir "$tmp/wheels" "$src"
# Resolved for the image's interpreter, not this one: markers such as redis' python_full_version < "3.11.3" differ.
step "wheels: lmesh's dependencies resolved for Python $image_python with $python"
extra=()
for _ in 1 2 3; do
  pip_quietly install --dry-run --ignore-installed --only-binary=:all: --python-version "$image_python" \
    --report "$tmp/report.json" "$(echo "$tmp"/wheels/lmesh-*.whl)" pip "${extra[@]}"
  mapfile -t more < <("$python" "$root/deploy/container/pins.py" "$tmp/report.json" "$image_python" "$tmp/pins.txt")
  [ ${#more[@]} -eq 0 ] && break
  extra+=("${more[@]}")
done
if [ ${#more[@]} -ne 0 ]; then
  echo "image: the resolution for Python $image_python still lacks ${more[*]}" >&2
  exit 2
fi
# The wheels this build installs: the pinned ones (the cache may hold older versions too) and lmesh's.
pick_wheels() {
  "$python" - "$tmp/pins.txt" "$work/wheels" "$tmp/wheels" <<'PY'
import re
import shutil
import sys
from pathlib import Path


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


pins = dict(line.split("==") for line in Path(sys.argv[1]).read_text().split())
wanted = {(canonical(name), version) for name, version in pins.items()}
found = set()
for wheel in Path(sys.argv[2]).glob("*.whl"):
    name, version = wheel.name.split("-")[:2]
    if (canonical(name), version) in wanted:
        shutil.copy2(wheel, sys.argv[3])
        found.add((canonical(name), version))
if missing := wanted - found:
    print(f"image: no wheel for {', '.join(f'{n}=={v}' for n, v in sorted(missing))} in {sys.argv[2]}")
    sys.exit(3)
PY
}
if pick_wheels >/dev/null; then
  step "wheels: $(wc -l <"$tmp/pins.txt") pinned wheels, all in $work/wheels already"
else
  step "wheels: downloading the missing of $(wc -l <"$tmp/pins.txt") pinned wheels into $work/wheels"
  pip_quietly download --no-deps --only-binary=:all: --python-version "$image_python" --dest "$work/wheels" \
    --find-links "$work/wheels" -r "$tmp/pins.txt"
  pick_wheels || exit 2
fi
cp "$tmp/pins.txt" "$tmp/wheels/constraints.txt"

# ---- 2. the root filesystem, cached by everything that goes into it --------------------------------------------
copy_model() {  # the files a build's manifest lists, and the manifest
  local files
  files=$("$python" -c 'import json, sys; m = json.load(open(sys.argv[1])); print(" ".join(sorted(m["files"])))' \
    "$1/lmesh_embeddings.json")
  mkdir -p "$2"
  cp "$1/lmesh_embeddings.json" "$2/"
  for file in $files; do cp "$1/$file" "$2/"; done
}
copy_model "$embeddings" "$tmp/model"
copy_model "$tools_embeddings" "$tmp/tools-model"
key=$( { echo "$suite $packages $mirror $uid"; sha256sum "$0"; (cd "$tmp/wheels" && sha256sum ./*);
         (cd "$tmp/model" && sha256sum ./*); (cd "$tmp/tools-model" && sha256sum ./*); } | sha256sum | cut -c1-16)
rootfs="$work/rootfs-$key.tar"
if [ -f "$rootfs" ]; then
  step "root filesystem cached: $rootfs"
else
  step "root filesystem: Debian $suite ($packages) from $mirror, lmesh installed into /opt/lmesh/venv"
  # Without man pages, documentation (except copyright notices) and translations: a server image reads none.
  mmdebstrap --variant=essential --include="$packages" --quiet \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --skip=essential/unlink \
    --setup-hook='mkdir -p "$1"/var/cache/apt/archives/' \
    --setup-hook="sync-in $work/debs /var/cache/apt/archives/" \
    --customize-hook="sync-out /var/cache/apt/archives $work/debs" \
    --customize-hook='mkdir -p "$1"/tmp/wheels' \
    --customize-hook="sync-in $tmp/wheels /tmp/wheels" \
    --customize-hook="chroot \"\$1\" python3 -c 'import platform, sys; v = platform.python_version(); \
        sys.exit(0 if v == \"$image_python\" else f\"image: {v} in $suite, not $image_python: set image_python\")'" \
    --customize-hook='chroot "$1" python3 -m venv --without-pip /opt/lmesh/venv' \
    --customize-hook='chroot "$1" env -i PATH=/usr/bin:/bin HOME=/root sh -c "/opt/lmesh/venv/bin/python \$(echo /tmp/wheels/pip-*.whl)/pip install --quiet \
        --no-index --no-cache-dir --find-links /tmp/wheels -c /tmp/wheels/constraints.txt \
        /tmp/wheels/lmesh-*.whl"' \
    --customize-hook='rm -rf "$1"/tmp/wheels' \
    --customize-hook="mkdir -p \"\$1\"$embeddings_in_image" \
    --customize-hook="sync-in $tmp/model $embeddings_in_image" \
    --customize-hook="mkdir -p \"\$1\"$tools_embeddings_in_image" \
    --customize-hook="sync-in $tmp/tools-model $tools_embeddings_in_image" \
    --customize-hook="echo 'lmesh:x:$uid:$uid:lmesh:/home/lmesh:/usr/sbin/nologin' >>\"\$1\"/etc/passwd" \
    --customize-hook="echo 'lmesh:x:$uid:' >>\"\$1\"/etc/group" \
    --customize-hook="chroot \"\$1\" sh -c 'mkdir -p /data /cache /home/lmesh && chown $uid:$uid /data /cache /home/lmesh'" \
    --customize-hook='chroot "$1" /opt/lmesh/venv/bin/lmesh --help >/dev/null' \
    "$suite" "$tmp/rootfs.tar" "$mirror"
  rm -f "$work"/rootfs-*.tar  # one cached root filesystem: the last one built
  mv "$tmp/rootfs.tar" "$rootfs"
fi

# ---- 3. the image: the root filesystem as one layer, with the contract above -----------------------------------
if [ "$(buildah inspect --type image --format '{{index .OCIv1.Config.Labels "io.lmesh.rootfs"}}' \
        "$image:$version" 2>/dev/null || true)" = "$key" ]; then
  step "image $image:$version is already this build (rootfs $key)"
else
  step "image: committing $image:$version with buildah"
  previous=$(buildah inspect --type image --format '{{.FromImageID}}' "$image:$version" 2>/dev/null || true)
  container=$(buildah from --quiet scratch)
  buildah add --quiet "$container" "$rootfs" / >/dev/null
  revision=$(git -C "$root" rev-parse HEAD 2>/dev/null || echo unknown)
  buildah config \
    --entrypoint '["lmesh"]' --cmd '["--help"]' \
    --user "$uid:$uid" --workingdir /home/lmesh \
    --env PATH=/opt/lmesh/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env LMESH_HOME=/data --env LMESH_CACHE=/cache --env PYTHONUNBUFFERED=1 \
    --env LMESH_EMBEDDINGS_MODEL_DIR="$embeddings_in_image" \
    --env LMESH_EMBEDDINGS_TOOLS_MODEL_DIR="$tools_embeddings_in_image" \
    --port 7000/tcp --port 7001/tcp --port 8080/tcp --port 9464/tcp \
    --volume /data --volume /cache \
    --label org.opencontainers.image.title=lmesh \
    --label "org.opencontainers.image.description=lmesh services (lmesh serve SERVICE): registry, policy, tokenizer, inference, gateway, tools, embeddings" \
    --label "org.opencontainers.image.version=$version" \
    --label "org.opencontainers.image.revision=$revision" \
    --label "org.opencontainers.image.created=$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
    --label "org.opencontainers.image.base.name=debian:$suite" \
    --label "io.lmesh.rootfs=$key" \
    "$container"
  buildah commit --quiet --rm --format oci "$container" "$image:$version" >/dev/null
  container=""
  buildah tag "$image:$version" "$image:latest"
  # The build it replaces, untagged now: removed unless a container still uses it.
  if [ -n "$previous" ]; then buildah rmi "$previous" >/dev/null 2>&1 || true; fi
fi
step "done: $image:$version (and :latest), $(buildah images --noheading --format '{{.Size}}' "$image:$version" | head -n 1)"
