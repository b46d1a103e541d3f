#!/usr/bin/env bash
# Builds llama-cpp-python from source into a venv (about 6 minutes on 2 cores) for
# scripts/compare-llama-cpp.sh, and prints the venv's python. Idempotent.
#
# Pinned to 0.3.16: 0.3.36 builds on this machine but crashes inside llama_decode.
# Built for AVX2 + FMA, not for the build machine's own CPU: on a machine with AVX-512 and AMX
# the native build scored SmolLM2-135M Q4_1 at perplexity 87.8 where sdlm and the AVX2 build
# agree on 6.82 (2026-11-28), and the reference must be the same on every CI machine.
set -euo pipefail
venv="${SDLM_LLAMA_CPP_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/sdlm/llama-cpp-0.3.16-avx2-venv}"
if ! "$venv/bin/python" -c 'import llama_cpp' 2>/dev/null; then
  python3 -m venv "$venv" >&2
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
-DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF \
-DGGML_AVX_VNNI=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" \
    "$venv/bin/pip" install -q --disable-pip-version-check --no-cache-dir --no-binary llama-cpp-python \
    llama-cpp-python==0.3.16 numpy >&2
fi
# gguf-py writes the f32 copy that compare-llama-cpp.sh scores with SDLM_COMPARE_DEQUANTIZED=1.
if ! "$venv/bin/python" -c 'import gguf' 2>/dev/null; then
  "$venv/bin/pip" install -q --disable-pip-version-check gguf==0.19.0 >&2
fi
echo "$venv/bin/python"
