#!/usr/bin/env bash
# Builds llama-cpp-python from source into a venv (about 6 minutes on 2 cores) for
# scripts/compare-llama-cpp.sh, and prints the venv's python. Idempotent.
#
# Pinned to 0.3.16: 0.3.36 builds on this machine but crashes inside llama_decode.
set -euo pipefail
venv="${SDLM_LLAMA_CPP_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/sdlm/llama-cpp-0.3.16-venv}"
if ! "$venv/bin/python" -c 'import llama_cpp' 2>/dev/null; then
  python3 -m venv "$venv" >&2
  "$venv/bin/pip" install -q --disable-pip-version-check --no-binary llama-cpp-python \
    llama-cpp-python==0.3.16 numpy >&2
fi
# gguf-py writes the f32 copy that compare-llama-cpp.sh scores with SDLM_COMPARE_DEQUANTIZED=1.
if ! "$venv/bin/python" -c 'import gguf' 2>/dev/null; then
  "$venv/bin/pip" install -q --disable-pip-version-check gguf==0.19.0 >&2
fi
echo "$venv/bin/python"
