#!/usr/bin/env bash
# Copies a finished `sdlm train --preset tiny-code` run into models/sdlm-tiny-code/ and prints
# what MODEL_CARD.md reports besides the run's own summary: `xz -9` on the same held-out bytes,
# and the `sdlm bench` tables (AR against diffusion on the held-out prompts). Run from the
# repository root after a release build; MODEL_CARD.md itself is written by hand from the output.
set -euo pipefail
run=${1:-runs/tiny-code}
sdlm=${SDLM:-target/release/sdlm}
if [[ ! -f "$run/model/model.safetensors" || ! -f "$run/summary.json" ]]; then
  echo "$run has no finished model (model/model.safetensors and summary.json)" >&2
  exit 1
fi
out=models/sdlm-tiny-code
cp "$run"/model/* "$out"/
cp "$run"/loss.png "$run"/summary.json "$out"/
cp "$run"/log.jsonl "$out"/training-log.jsonl
bytes=$(wc -c < "$run/heldout.txt")
packed=$(xz -9 -c "$run/heldout.txt" | wc -c)
python3 -c "import sys; b, p = int(sys.argv[1]), int(sys.argv[2]); print(f'xz -9: {p} of {b} held-out bytes, {8 * p / b:.4f} bits/byte')" "$bytes" "$packed"
python3 -c "import json, sys; e = json.load(open(sys.argv[1]))['final_eval']; print('model, AR bits/byte:', e['ar_bits_per_byte'], ' diffusion bound (B=32):', e['diffusion_bits_per_byte'])" "$run/summary.json" || true
prompts=benchmarks/stdlib-heldout-prompts.jsonl
"$sdlm" bench --model "$out" --prompts "$prompts" --block-size 4,8,32 --threshold 0.9 --max-new-tokens 64
"$sdlm" bench --model "$out" --prompts "$prompts" --mode diffusion --block-size 8,32 --threshold 0.5,0.3 --max-new-tokens 64
