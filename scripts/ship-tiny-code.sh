#!/usr/bin/env bash
# Copies finished training runs into models/sdlm-tiny-code/ and prints what MODEL_CARD.md
# reports besides the runs' own summaries: `xz -9` on the same held-out bytes, and the `sdlm
# bench` tables (AR against diffusion on the held-out prompts). Run from the repository root
# after a release build; MODEL_CARD.md itself is written by hand from the output.
#
#   scripts/ship-tiny-code.sh RUN
#       a `sdlm train --preset tiny-code` run: its model, loss.png, summary.json, log.
#   scripts/ship-tiny-code.sh --step-reduction RUN...
#       a chain of `--preset tiny-code-step-reduction` runs, each --init the one before (the
#       first --init the shipped model): the last run's model; the runs' logs in one
#       step-reduction-log.jsonl (steps counted on across runs, each row with its run), their
#       summaries in step-reduction-summary.json and the curve in loss-step-reduction.png. The
#       base run's files stay as they are.
set -euo pipefail
sdlm=${SDLM:-target/release/sdlm}
out=models/sdlm-tiny-code
finished() {
  if [[ ! -f "$1/model/model.safetensors" || ! -f "$1/summary.json" ]]; then
    echo "$1 has no finished model (model/model.safetensors and summary.json)" >&2
    exit 1
  fi
}
if [[ "${1:-}" == --step-reduction ]]; then
  shift
  (($# > 0)) || { echo "--step-reduction needs the runs, first to last" >&2; exit 1; }
  for run in "$@"; do finished "$run"; done
  last=${!#}
  cp "$last"/model/* "$out"/
  curve=$(mktemp -d)
  trap 'rm -rf "$curve"' EXIT
  python3 - "$out" "$curve" "$@" <<'EOF'
import json, os, sys
out, curve, runs = sys.argv[1], sys.argv[2], sys.argv[3:]
offset, rows, summaries = 0, [], []
for run in runs:
    last = 0
    for line in open(os.path.join(run, "log.jsonl")):
        row = json.loads(line)
        last = max(last, row.get("step", 0))
        row["step"] = row.get("step", 0) + offset
        row["run"] = os.path.basename(os.path.normpath(run))
        rows.append(row)
    offset += last
    summary = json.load(open(os.path.join(run, "summary.json")))
    summary.pop("losses", None)
    summary["run"] = os.path.basename(os.path.normpath(run))
    summaries.append(summary)
text = "".join(json.dumps(r) + "\n" for r in rows)
open(os.path.join(out, "step-reduction-log.jsonl"), "w").write(text)
open(os.path.join(curve, "log.jsonl"), "w").write(text)
json.dump(summaries, open(os.path.join(out, "step-reduction-summary.json"), "w"), indent=2)
EOF
  "$sdlm" train --plot-only --preset tiny-code-step-reduction --out "$curve"
  cp "$curve"/loss.png "$out"/loss-step-reduction.png
  run=$last
else
  run=${1:-runs/tiny-code}
  finished "$run"
  cp "$run"/model/* "$out"/
  cp "$run"/loss.png "$run"/summary.json "$out"/
  cp "$run"/log.jsonl "$out"/training-log.jsonl
fi
bytes=$(wc -c < "$run/heldout.txt")
packed=$(xz -9 -c "$run/heldout.txt" | wc -c)
python3 -c "import sys; b, p = int(sys.argv[1]), int(sys.argv[2]); print(f'xz -9: {p} of {b} held-out bytes, {8 * p / b:.4f} bits/byte')" "$bytes" "$packed"
python3 -c "import json, sys; e = json.load(open(sys.argv[1]))['final_eval']; print('model, AR bits/byte:', e['ar_bits_per_byte'], ' diffusion bound (B=32):', e['diffusion_bits_per_byte'])" "$run/summary.json" || true
prompts=benchmarks/stdlib-heldout-prompts.jsonl
"$sdlm" bench --model "$out" --prompts "$prompts" --block-size 4,8,16,32 --threshold 0.9 --max-new-tokens 64
"$sdlm" bench --model "$out" --prompts "$prompts" --mode diffusion --block-size 8,32 --threshold 0.5,0.3 --max-new-tokens 64
