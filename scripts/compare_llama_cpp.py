#!/usr/bin/env python3
"""sdlm against llama.cpp on one GGUF file and one text file: the same tokens, the same sliding
windows (context, stride), the same thread count. Prints perplexity of each, their relative
difference, teacher-forced top-1 agreement (and llama.cpp's agreement with itself under its
flash-attention kernel, the noise floor), tokenizer agreement and the tokens/s ratio. Run
through scripts/compare-llama-cpp.sh, which builds llama-cpp-python and sdlm first.
"""
import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np
from llama_cpp import Llama


def windows(n, context, stride):
    """The schedule of sdlm's perplexity.rs: (begin, end, first scored index in the window)."""
    scored_to, begin = 1, 0
    while scored_to < n:
        end = min(begin + context, n)
        yield begin, end, scored_to - begin
        scored_to = end
        if end == n:
            break
        begin = min(begin + stride, scored_to - 1)


def llama_cpp_scores(llm, tokens, context, stride):
    nll, argmax = [], []
    seconds = 0.0  # llama.cpp's forward passes only; the NumPy scoring below is not counted
    for begin, end, first in windows(len(tokens), context, stride):
        llm.reset()
        start = time.perf_counter()
        llm.eval(tokens[begin:end])
        seconds += time.perf_counter() - start
        logits = np.asarray(llm.scores[: end - begin], dtype=np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        for i in range(max(first, 1), end - begin):
            nll.append(-logp[i - 1, tokens[begin + i]])
            argmax.append(int(np.argmax(logits[i - 1])))
    return nll, argmax, seconds


def load(path, args, **options):
    return Llama(model_path=path, n_ctx=args.context, n_batch=args.context, n_threads=args.threads,
                 n_threads_batch=args.threads, logits_all=True, verbose=False, **options)


def sdlm_scores(args, model, tok_file, tmp):
    """sdlm perplexity's summary and per-token rows for the given tokens."""
    preds = os.path.join(tmp, "preds.jsonl")
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
    out = subprocess.run([args.sdlm, "perplexity", "--model", model, "--file", args.file, "--tokens", tok_file,
                          "--context", str(args.context), "--stride", str(args.stride), "--json",
                          "--predictions", preds], check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1]), [json.loads(l) for l in open(preds)]


def agreement(a, b):
    return sum(x == y for x, y in zip(a, b)) / len(a)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sdlm", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--file", required=True)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--stride", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dequantized", action="store_true",
                    help="also score an f32 copy of the model (scripts/dequantize_gguf.py) with both engines")
    args = ap.parse_args()

    text = open(args.file, encoding="utf-8").read()
    llm = load(args.model, args)
    tokens = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
    extra = {}

    with tempfile.TemporaryDirectory() as tmp:
        # sdlm's own tokenization, to report whether the GGUF-built tokenizer agrees.
        own = os.path.join(tmp, "own.jsonl")
        subprocess.run([args.sdlm, "perplexity", "--model", args.model, "--file", args.file, "--context",
                        str(args.context), "--stride", str(args.stride), "--predictions", own],
                       check=True, stdout=subprocess.DEVNULL)
        own_tokens = [json.loads(l)["token"] for l in open(own)]
        tok_file = os.path.join(tmp, "tokens.json")
        json.dump(tokens, open(tok_file, "w"))
        sdlm_summary, sdlm_rows = sdlm_scores(args, args.model, tok_file, tmp)

        ref_nll, ref_argmax, ref_seconds = llama_cpp_scores(llm, tokens, args.context, args.stride)
        del llm
        # The noise floor of top-1 agreement: llama.cpp against itself with its other attention
        # kernel (flash attention, which accumulates in f16). A quantized model whose activations
        # are rounded to 8 bits is a discontinuous function, so implementations that are not bit
        # for bit identical disagree on near-ties; this says how much for this model and text.
        _, fa_argmax, _ = llama_cpp_scores(load(args.model, args, flash_attn=True), tokens, args.context,
                                           args.stride)
        extra["llama_cpp_self_agreement_flash_attn"] = round(agreement(fa_argmax, ref_argmax), 5)

        if args.dequantized:
            copy = os.path.join(tmp, "f32.gguf")
            subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "dequantize_gguf.py"),
                            args.model, copy], check=True)
            f32_nll, f32_argmax, _ = llama_cpp_scores(load(copy, args), tokens, args.context, args.stride)
            f32_summary, f32_rows = sdlm_scores(args, copy, tok_file, tmp)
            f32_ppl, f32_ref_ppl = math.exp(f32_summary["mean_nll"]), math.exp(sum(f32_nll) / len(f32_nll))
            extra["f32_copy_ppl_rel_diff"] = round(abs(f32_ppl - f32_ref_ppl) / f32_ref_ppl, 6)
            extra["f32_copy_top1_agreement"] = round(agreement([r["argmax"] for r in f32_rows], f32_argmax), 5)

    assert len(ref_nll) == len(sdlm_rows) == len(tokens) - 1
    sdlm_ppl = math.exp(sdlm_summary["mean_nll"])
    ref_ppl = math.exp(sum(ref_nll) / len(ref_nll))
    agree = agreement([r["argmax"] for r in sdlm_rows], ref_argmax)
    same_tokens = own_tokens == tokens[1:]
    ref_tps = len(ref_nll) / ref_seconds
    result = {
        "model": os.path.basename(args.model),
        "file": os.path.basename(args.file),
        "tokens": len(tokens),
        "context": args.context,
        "stride": args.stride,
        "threads": args.threads,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "sdlm_ppl": round(sdlm_ppl, 4),
        "llama_cpp_ppl": round(ref_ppl, 4),
        "ppl_rel_diff": round(abs(sdlm_ppl - ref_ppl) / ref_ppl, 5),
        "top1_agreement": round(agree, 5),
        **extra,
        "tokenizer_agrees": same_tokens,
        "sdlm_tokens_per_s": round(sdlm_summary["tokens_per_second"], 1),
        "llama_cpp_tokens_per_s": round(ref_tps, 1),
        # sdlm's time covers its whole scoring (forwards, log-softmax, arg max); llama.cpp's only
        # its forwards, so the ratio leans against sdlm.
        "speed_ratio_sdlm_over_llama_cpp": round(sdlm_summary["tokens_per_second"] / ref_tps, 3),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
