#!/usr/bin/env bash
# CI compile check without a GPU: compiles every kernel for sm_90 with nvcc from PyPI, fails on
# any error or warning, and prints ptxas' register, shared-memory and spill report per kernel.
set -euo pipefail
cd "$(dirname "$0")"
root=$(../scripts/install-cuda-toolchain.sh)
nvcc="$root/bin/nvcc"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
status=0
for src in cuda/*.cu; do
  name=$(basename "$src" .cu)
  if ! "$nvcc" -cubin -arch=sm_90 -O3 --std=c++17 -Werror all-warnings -Xptxas -v \
      -o "$tmp/$name.cubin" "$src" >"$tmp/$name.log" 2>&1; then
    cat "$tmp/$name.log"
    echo "FAILED: $src" >&2
    status=1
    continue
  fi
  # One line per kernel: name, registers, spills, shared memory.
  awk -v file="$name" '
    /Compiling entry function/ { match($0, /'"'"'[^'"'"']+'"'"'/); fn = substr($0, RSTART + 1, RLENGTH - 2) }
    /spill stores/ { spill = $0; sub(/^ptxas info *: */, "", spill); sub(/^ */, "", spill) }
    /Used [0-9]+ registers/ { u = $0; sub(/^ptxas info *: */, "", u); printf "sm_90 %-44s %s | %s\n", fn, u, spill }
  ' "$tmp/$name.log"
done
exit $status
