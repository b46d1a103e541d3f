"""Writes a Qwen2 checkpoint of Qwen2.5-0.5B's shape with random weights (transformers' own
initialisation, seed 0), for gpu-check.sh's end-to-end decode benchmark: the real 491 MB file is
too large to travel to the GPU machine, and speed does not depend on what the weights are.

config.json also gets the keys that make sdlm decode it as a block-diffusion model
(mask_token_id, block_size, logits_shift); the tokenizer is the shipped tiny model's, whose 8,192
ids are a subset of this vocabulary (ids beyond it decode to nothing).

usage: random_qwen2.py OUT_DIR TOKENIZER_JSON [--tiny]   (--tiny: a small shape, for a CPU check)
"""
import json
import shutil
import sys

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

out, tokenizer = sys.argv[1], sys.argv[2]
tiny = "--tiny" in sys.argv[3:]
shape = dict(  # Qwen2.5-0.5B / Qwen2.5-Coder-0.5B
    vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
    num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
)
if tiny:
    shape.update(vocab_size=9000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
config = Qwen2Config(**shape, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True,
                     bos_token_id=0, eos_token_id=0)
torch.manual_seed(0)
model = Qwen2ForCausalLM(config)
model.save_pretrained(out)
path = f"{out}/config.json"
with open(path) as f:
    c = json.load(f)
c.update(mask_token_id=1, block_size=32, logits_shift=False)
with open(path, "w") as f:
    json.dump(c, f, indent=1)
shutil.copy(tokenizer, f"{out}/tokenizer.json")
print(f"{out}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters")
