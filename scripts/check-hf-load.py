#!/usr/bin/env python3
"""Loads an sdlm-trained model directory with HF transformers and scores the first tokens of a
file autoregressively, next to `sdlm perplexity` on the same tokens: the exported directory must
be a valid Qwen3 checkpoint that both engines read to the same numbers.

Our models predict in place (logits_shift = false): token i is predicted at position i from a
mask there. HF scores it the plain way, one causal forward of tokens[:i] + [MASK] per token;
sdlm scores all tokens in one forward of its corrupted ‖ clean form. Usage, in a venv with torch
and transformers (e.g. the one tests/fixtures/ uses):
    check-hf-load.py MODEL_DIR FILE [N_TOKENS] [SDLM_BINARY]
Prints one JSON line: both mean NLLs and the largest per-token difference.
"""
import json
import subprocess
import sys
import tempfile

import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast


def main():
    model_dir, path = sys.argv[1], sys.argv[2]
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 64
    sdlm = sys.argv[4] if len(sys.argv) > 4 else "target/release/sdlm"
    config = json.load(open(f"{model_dir}/config.json"))
    mask = config["mask_token_id"]
    text = open(path, encoding="utf-8").read()
    tok = PreTrainedTokenizerFast(tokenizer_file=f"{model_dir}/tokenizer.json")
    ids = tok(text, add_special_tokens=False)["input_ids"][:n]
    if len(ids) < 2:
        sys.exit(f"{path}: {len(ids)} tokens; scoring needs at least 2")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    hf = []
    with torch.no_grad():
        for i in range(1, len(ids)):
            logits = model(torch.tensor([ids[:i] + [mask]])).logits[0, -1].double()
            hf.append(-torch.log_softmax(logits, dim=-1)[ids[i]].item())
    with tempfile.TemporaryDirectory() as tmp:
        json.dump(ids, open(f"{tmp}/tokens.json", "w"))
        subprocess.run(
            [sdlm, "perplexity", "--model", model_dir, "--file", path, "--tokens",
             f"{tmp}/tokens.json", "--context", str(len(ids)), "--predictions",
             f"{tmp}/pred.jsonl", "--json"],
            check=True, capture_output=True, text=True,
        )
        ours = [json.loads(line)["nll"] for line in open(f"{tmp}/pred.jsonl")]
    assert len(ours) == len(hf), (len(ours), len(hf))
    print(json.dumps({
        "tokens_scored": len(hf),
        "hf_mean_nll": sum(hf) / len(hf),
        "sdlm_mean_nll": sum(ours) / len(ours),
        "max_abs_difference": max(abs(a - b) for a, b in zip(hf, ours)),
    }))


if __name__ == "__main__":
    main()
