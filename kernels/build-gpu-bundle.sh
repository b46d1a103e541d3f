#!/usr/bin/env bash
# Builds, on a machine without a GPU, everything kernels/gpu-check.sh runs on a GPU machine (which
# has the CUDA 13.0 driver but no Rust toolchain and no network) into one folder (default
# gpu-bundle/, at most 60 MB): the CUDA parity test executable, the kernel benchmark, and
# gpu-check.sh itself. The binaries dlopen libcuda at run time, so nothing CUDA is linked here.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
bundle=${1:-$repo/gpu-bundle}
root=$("$repo/scripts/install-cuda-toolchain.sh")
export PATH="$root/bin:$PATH" CUDA_HOME="$root"

cd "$repo"
cargo build --release -p sdlm-kernels --features cuda --bins
# The test executable's path has a hash in it: ask cargo for it.
test_exe=$(cargo test --release -p sdlm-kernels --features cuda --test cuda_parity --no-run \
  --message-format=json 2>/dev/null |
  python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "cuda_parity":
        print(m["executable"])')
[[ -n $test_exe ]] || { echo "cuda_parity test executable not found" >&2; exit 1; }

rm -rf "$bundle"
mkdir -p "$bundle"
target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
cp "$target_dir/release/sdlm-kernel-bench" "$bundle/"
cp "$test_exe" "$bundle/cuda_parity"
cp "$here/gpu-check.sh" "$bundle/"
strip "$bundle/sdlm-kernel-bench" "$bundle/cuda_parity" 2>/dev/null || true
size=$(du -sb "$bundle" | cut -f1)
echo "bundle: $bundle ($((size / 1024 / 1024)) MB)"
((size <= 60 * 1024 * 1024)) || { echo "bundle is over 60 MB" >&2; exit 1; }
