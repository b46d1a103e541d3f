#!/usr/bin/env bash
# Compares sdlm with llama.cpp (llama-cpp-python 0.3.16, built from source) on pinned GGUF models
# over one Python source file: perplexity (goal: within 1%), teacher-forced top-1 agreement
# (goal: >= 98%) beside llama.cpp's agreement with itself under flash attention, tokens/s ratio.
# One JSON line per model.
#
#   scripts/compare-llama-cpp.sh [smollm2-135m-instruct] [qwen2.5-coder-0.5b-instruct]
#
# Environment: SDLM_COMPARE_FILE (default: the machine's json/decoder.py), SDLM_COMPARE_CONTEXT
# (512), SDLM_COMPARE_STRIDE (256), SDLM_COMPARE_THREADS (2), SDLM_COMPARE_DEQUANTIZED (1: also
# score an f32 copy of each model with both engines), SDLM_COMPARE_PROFILE (release; `dev`
# reuses the test build: the same numbers, since optimisation does not change float results in
# Rust, but its tokens/s is not a speed measurement).
set -euo pipefail
cd "$(dirname "$0")/.."
models=("$@")
((${#models[@]})) || models=(smollm2-135m-instruct)
python=$(scripts/install-llama-cpp.sh)
profile=${SDLM_COMPARE_PROFILE:-release}
case "$profile" in
  release) cargo build --release -q -p sdlm; out=release ;;
  dev) cargo build -q -p sdlm; out=debug ;;
  *) echo "SDLM_COMPARE_PROFILE is $profile; it must be release or dev" >&2; exit 2 ;;
esac
target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
file=${SDLM_COMPARE_FILE:-$(python3 -c 'import json, os; print(os.path.join(os.path.dirname(json.__file__), "decoder.py"))')}
dequantized=()
[[ "${SDLM_COMPARE_DEQUANTIZED:-0}" == 1 ]] && dequantized=(--dequantized)
for m in "${models[@]}"; do
  gguf=$(scripts/fetch-model.sh "$m")
  "$python" scripts/compare_llama_cpp.py --sdlm "$target_dir/$out/sdlm" --model "$gguf" --file "$file" \
    --context "${SDLM_COMPARE_CONTEXT:-512}" --stride "${SDLM_COMPARE_STRIDE:-256}" \
    --threads "${SDLM_COMPARE_THREADS:-2}" "${dequantized[@]}"
done
