"""Greedy completions of the shipped model on the GPU against the CPU's, counted per mode.

Usage: compare_completions.py SDLM MODEL PROMPTS DTYPE
The CPU computes in f32; the GPU in DTYPE (f32 or bf16). Prints, per mode, a line
"MODE: N of M completions identical on cuda (DTYPE) and cpu (f32)" (with "; K failed to run"
when a run failed, which never counts as identical), and each difference.
"""
import json
import subprocess
import sys

sdlm, model, prompts, dtype = sys.argv[1:5]
rows = [json.loads(line)["prompt"] for line in open(prompts)][:6]


def complete(device, dtype, mode, prompt):
    r = subprocess.run(
        [sdlm, "generate", "--device", device, "--dtype", dtype, "--model", model, "--mode", mode,
         "--max-new-tokens", "64", "--json", prompt],
        capture_output=True, text=True)
    if r.returncode != 0:
        # The error's own line, not a backtrace's tail when RUST_BACKTRACE is set.
        errors = [line for line in r.stderr.splitlines() if line.startswith("Error:")]
        return "ERROR " + (errors[0] if errors else r.stderr[-300:])
    return json.loads(r.stdout.strip().splitlines()[-1])["text"]


for mode in ("autoregressive", "diffusion"):
    same = failed = 0
    for p in rows:
        cpu, cuda = complete("cpu", "f32", mode, p), complete("cuda", dtype, mode, p)
        # Two failures are not two equal completions.
        broken = cpu.startswith("ERROR ") or cuda.startswith("ERROR ")
        failed += broken
        same += not broken and cpu == cuda
        if broken or cpu != cuda:
            print(f"{mode} differs on {p[:40]!r}:\n cpu  {cpu[:200]!r}\n cuda {cuda[:200]!r}")
    print(f"{mode}: {same} of {len(rows)} completions identical on cuda ({dtype}) and cpu (f32)"
          f"{f'; {failed} failed to run' if failed else ''}")
