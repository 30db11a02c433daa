#!/usr/bin/env bash
# Generates Python stubs and .pyi files for every proto under protos/ into OUT (default gen/).
# usage: gen_protos.sh PYTHON OUT
set -euo pipefail
python=${1:-python3}
out=${2:-gen}
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
rm -rf "$out/lmesh"
mkdir -p "$out"
mapfile -t protos < <(find protos -name '*.proto' | sort)
"$python" -m grpc_tools.protoc -Iprotos --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" "${protos[@]}"
# Regular packages (not namespace packages) so setuptools and type checkers find them.
find "$out/lmesh" -type d -exec touch {}/__init__.py \;
