#!/usr/bin/env bash
# CI's comparison with llama.cpp on SmolLM2-135M (the small pinned GGUF): runs
# scripts/compare-llama-cpp.sh and fails unless perplexity is within 1% of llama.cpp's, the
# tokenizer built from the GGUF gives llama.cpp's tokens, and sdlm's top-1 agreement with llama.cpp
# is within one point of llama.cpp's agreement with itself under its other attention kernel (the
# noise floor of a model with 8-bit activations: docs/benchmarks.md). The speed ratio is printed,
# not asserted. It scores with the test build (dev profile, the same numbers as release), so CI
# builds sdlm once; the speed ratio it prints is therefore not a measurement (docs/benchmarks.md
# has the release one).
set -euo pipefail
cd "$(dirname "$0")/.."
line=$(SDLM_COMPARE_PROFILE=dev scripts/compare-llama-cpp.sh smollm2-135m-instruct 2>/dev/null | tail -n 1)
echo "$line"
python3 - "$line" <<'PY'
import json, sys
r = json.loads(sys.argv[1])
floor = r["llama_cpp_self_agreement_flash_attn"]
ok = r["ppl_rel_diff"] <= 0.01 and r["tokenizer_agrees"] and r["top1_agreement"] >= floor - 0.01
print(f"llama.cpp check: perplexity {r['sdlm_ppl']} vs {r['llama_cpp_ppl']} ({100 * r['ppl_rel_diff']:.2f}%), "
      f"tokenizer agrees: {r['tokenizer_agrees']}, top-1 {100 * r['top1_agreement']:.2f}% "
      f"(llama.cpp with itself: {100 * floor:.2f}%), "
      f"speed ratio {r['speed_ratio_sdlm_over_llama_cpp']} (dev build: not a speed measurement)")
sys.exit(0 if ok else 1)
PY
