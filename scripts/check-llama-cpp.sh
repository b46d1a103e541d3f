#!/usr/bin/env bash
# CI's comparison with llama.cpp on SmolLM2-135M (the small pinned GGUF): runs
# scripts/compare-llama-cpp.sh and fails unless perplexity is within 1% of llama.cpp's and the
# tokenizer built from the GGUF gives llama.cpp's tokens. Top-1 agreement and the speed ratio are
# printed, not asserted (the 98% top-1 goal is not met yet: see docs/benchmarks.md). It scores
# with the test build (dev profile, the same numbers as release), so CI builds sdlm once; the speed
# ratio it prints is therefore not a measurement (docs/benchmarks.md has the release one).
set -euo pipefail
cd "$(dirname "$0")/.."
line=$(SDLM_COMPARE_PROFILE=dev scripts/compare-llama-cpp.sh smollm2-135m-instruct 2>/dev/null | tail -n 1)
echo "$line"
python3 - "$line" <<'PY'
import json, sys
r = json.loads(sys.argv[1])
ok = r["ppl_rel_diff"] <= 0.01 and r["tokenizer_agrees"]
print(f"llama.cpp check: perplexity {r['sdlm_ppl']} vs {r['llama_cpp_ppl']} ({100 * r['ppl_rel_diff']:.2f}%), "
      f"tokenizer agrees: {r['tokenizer_agrees']}, top-1 {100 * r['top1_agreement']:.2f}%, "
      f"speed ratio {r['speed_ratio_sdlm_over_llama_cpp']} (dev build: not a speed measurement)")
sys.exit(0 if ok else 1)
PY
