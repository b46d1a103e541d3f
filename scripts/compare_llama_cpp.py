#!/usr/bin/env python3
"""sdlm against llama.cpp on one GGUF file and one text file: the same tokens, the same sliding
windows (context, stride), the same thread count. Prints perplexity of each, their relative
difference, teacher-forced top-1 agreement, tokenizer agreement and the tokens/s ratio. Run
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sdlm", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--file", required=True)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--stride", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    text = open(args.file, encoding="utf-8").read()
    llm = Llama(model_path=args.model, n_ctx=args.context, n_batch=args.context, n_threads=args.threads,
                n_threads_batch=args.threads, logits_all=True, verbose=False)
    tokens = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)

    with tempfile.TemporaryDirectory() as tmp:
        # sdlm's own tokenization, to report whether the GGUF-built tokenizer agrees.
        own = os.path.join(tmp, "own.jsonl")
        subprocess.run([args.sdlm, "perplexity", "--model", args.model, "--file", args.file, "--context",
                        str(args.context), "--stride", str(args.stride), "--predictions", own],
                       check=True, stdout=subprocess.DEVNULL)
        own_tokens = [json.loads(l)["token"] for l in open(own)]
        tok_file = os.path.join(tmp, "tokens.json")
        json.dump(tokens, open(tok_file, "w"))
        preds = os.path.join(tmp, "preds.jsonl")
        env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
        out = subprocess.run([args.sdlm, "perplexity", "--model", args.model, "--file", args.file, "--tokens",
                              tok_file, "--context", str(args.context), "--stride", str(args.stride), "--json",
                              "--predictions", preds], check=True, capture_output=True, text=True, env=env)
        sdlm_summary = json.loads(out.stdout.strip().splitlines()[-1])
        sdlm_rows = [json.loads(l) for l in open(preds)]

    ref_nll, ref_argmax, ref_seconds = llama_cpp_scores(llm, tokens, args.context, args.stride)
    assert len(ref_nll) == len(sdlm_rows) == len(tokens) - 1
    sdlm_ppl = math.exp(sdlm_summary["mean_nll"])
    ref_ppl = math.exp(sum(ref_nll) / len(ref_nll))
    agree = sum(r["argmax"] == a for r, a in zip(sdlm_rows, ref_argmax)) / len(ref_argmax)
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
