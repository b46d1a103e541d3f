#!/usr/bin/env bash
# Runs on the GPU machine from the folder build-gpu-bundle.sh made, in under 8 minutes, the
# parts that were never measured on a GPU before the ones that were (a lease can end early):
#  1. the card and driver; copy bandwidth and matrix rates through PyTorch (the ceilings);
#  2. the CUDA parity tests (fresh random inputs, poisoned outputs, each kernel vs its CPU
#     reference), and the engine's CUDA path against its CPU path (device choices, the step
#     batcher over pages on the GPU);
#  3. end-to-end decoding with `sdlm --device cuda` (candle's CUDA backend) on random weights of
#     Qwen2.5-0.5B's shape made here: autoregressive against diffusion, same weights and prompts;
#  4. the shipped model: greedy completions on cuda against the same on the cpu, and its bench;
#  5. the kernel benchmark against its floors;
#  6. compute-sanitizer memcheck and racecheck on a small subset of the parity tests;
#  7. the shipped model loaded by HF transformers (the machine's PyTorch, on its CPU), scored
#     next to `sdlm perplexity` (the same check runs on a development machine with a throwaway
#     PyTorch venv: models/sdlm-tiny-code/MODEL_CARD.md);
#  8. only when asked for ("profile"): Nsight Compute on the AR attention case of Qwen2.5's shape,
#     the tensor-core kernel and the narrow ones, a few launches each;
#  9. only when asked for ("bf16"): step 3's decoding with `--dtype bf16` (cuBLAS in bf16, the
#     tensor-core attention over bf16 pages in the step batcher), and the shipped model's greedy
#     completions in bf16 on the GPU against f32 on the CPU, counted.
# Writes everything under the folder given as $1 (default ./results) and prints the tables last.
# Steps after it (parity engine e2e shipped bench sanitizer hf, and profile bf16) run only those,
# for a second run in a lease that has already measured the rest; the ceilings always run.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/results}
steps=" ${*:2} "
want() { [[ $steps == "  " || $steps == *" $1 "* ]]; }
asked() { [[ $steps == *" $1 "* ]]; }
mkdir -p "$out"
summary=()
e2e="$out/e2e.txt"

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv | tee "$out/gpu.txt"

python3 - >"$out/ceilings.txt" 2>&1 <<'PY'
import torch
def median_ms(fn, n):
    for _ in range(3): fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); b.synchronize(); ts.append(a.elapsed_time(b))
    return sorted(ts)[len(ts) // 2]
torch.backends.cuda.matmul.allow_tf32 = False
n = 8192
x = torch.randn(n, n, device="cuda", dtype=torch.bfloat16); y = torch.randn_like(x)
print(f"bf16_tflops {2 * n**3 / median_ms(lambda: x @ y, 10) / 1e9:.1f}")
x32 = torch.randn(n, n, device="cuda"); y32 = torch.randn_like(x32)
print(f"fp32_tflops {2 * n**3 / median_ms(lambda: x32 @ y32, 5) / 1e9:.1f}")
src = torch.randn(1 << 28, device="cuda"); dst = torch.empty_like(src)
print(f"copy_gbs {2 * src.numel() * 4 / median_ms(lambda: dst.copy_(src), 10) / 1e6:.0f}")
print(f"device {torch.cuda.get_device_name()}")
PY
cat "$out/ceilings.txt"
bf16=$(awk '/^bf16_tflops/ {print $2}' "$out/ceilings.txt")
fp32=$(awk '/^fp32_tflops/ {print $2}' "$out/ceilings.txt")

# The CUDA libraries that sdlm and the engine's test link (libcudart, libnvrtc, libcurand,
# libcublas, libcublasLt) are PyTorch's pip packages here; libcuda is the driver's.
cu13=$(python3 -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "lib"))' 2>/dev/null)
export LD_LIBRARY_PATH="${cu13:+$cu13:}${LD_LIBRARY_PATH:-}"
unpack() {
  python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
    "$here/$1.xz" "$2" && chmod +x "$2"
}
# A test binary's last "test result" line, or, when it never got that far, its last line.
test_result() {
  grep 'test result' "$1" | tail -1 | grep . || echo "no test result; last line: $(tail -1 "$1")"
}
sdlm="${TMPDIR:-/tmp}/sdlm-cuda"
engine_cuda="${TMPDIR:-/tmp}/engine_cuda"
unpack sdlm "$sdlm"
unpack engine_cuda "$engine_cuda"

if want parity; then
  echo "== parity tests"
  if timeout 150 "$here/cuda_parity" 2>&1 | tee "$out/parity.log" | grep -E "^test |test result|panicked|error"; then :; fi
  summary+=("parity: $(test_result "$out/parity.log")")
fi
if want engine; then
  SDLM_TINY_MODEL="$here/sdlm-tiny-code" timeout 120 "$engine_cuda" --nocapture 2>&1 |
    tee "$out/engine-cuda.log" | grep -E "^seed|^test |test result|panicked"
  summary+=("engine on the GPU against the CPU: $(test_result "$out/engine-cuda.log")")
fi

# Random weights of Qwen2.5-0.5B's shape, made once for the steps that decode with them.
model="${TMPDIR:-/tmp}/sdlm-random-qwen2-0.5b"
random_model() {
  [[ -d $model ]] ||
    timeout 120 python3 "$here/random_qwen2.py" "$model" "$here/tokenizer.json" >"$out/random-model.log" 2>&1
}

if want e2e; then
  echo "== end-to-end decoding"
  if random_model; then
    # With random weights every confidence is about 1/vocab: tau 0.9 unmasks one position per
    # step, so the diffusion rows fix the tokens per forward instead: a tiny tau unmasks a whole
    # block per forward (the engine's parallel ceiling), and a step budget of 12 per 32-token
    # block gives 2.7 tokens per forward, where a trained model of the paper's quality decodes.
    run_bench() { timeout 150 "$sdlm" bench --device cuda --model "$model" --prompts "$here/prompts.jsonl" \
      --limit 16 --max-new-tokens 64 "$@"; }
    {
      run_bench --mode autoregressive,diffusion --block-size 4,8,32 --threshold 0.000001
      echo "exit $?"
      run_bench --mode autoregressive,diffusion --block-size 32 --threshold 0.9 --max-steps-per-block 12
      echo "exit $?"
      # The same first run with whole logits rows read to the host: what the device choice saves.
      echo "SDLM_HOST_CHOICES=1:"
      SDLM_HOST_CHOICES=1 run_bench --mode autoregressive,diffusion --block-size 4,32 --threshold 0.000001
      echo "exit $?"
      # Through the step batcher, its pages on the GPU: many sequences in one forward.
      run_bench --mode autoregressive,diffusion --block-size 4 --threshold 0.000001 --concurrency 1,16,64
      echo "exit $?"
    } >"$e2e" 2>&1
    summary+=("end-to-end: $(grep -c '^exit 0' "$e2e") of 4 bench runs finished")
  else
    summary+=("end-to-end: making the random model failed (random-model.log)")
  fi
fi

if want shipped; then
  echo "== shipped model: cuda against cpu"
  # The trained model has clear margins between its top logits, so greedy decoding on the GPU
  # (cuBLAS sums in another order) must give the CPU's tokens; random weights would not.
  tiny="$here/sdlm-tiny-code"
  timeout 150 python3 "$here/compare_completions.py" "$sdlm" "$tiny" "$here/prompts.jsonl" f32 \
    >"$out/tiny-parity.txt" 2>&1
  cat "$out/tiny-parity.txt"
  summary+=("shipped model, cuda vs cpu: $(grep -E 'identical' "$out/tiny-parity.txt" | tr '\n' ';')")
  {
    timeout 150 "$sdlm" bench --device cuda --model "$tiny" --prompts "$here/prompts.jsonl" \
      --limit 32 --max-new-tokens 64 --block-size 4,8,32
    echo "exit $?"
    timeout 150 "$sdlm" bench --device cuda --model "$tiny" --prompts "$here/prompts.jsonl" \
      --max-new-tokens 64 --block-size 4 --concurrency 1,4,16,64
    echo "exit $?"
    # The first run again with candle's add and norm instead of the fused kernel.
    echo "SDLM_UNFUSED_NORM=1:"
    SDLM_UNFUSED_NORM=1 timeout 150 "$sdlm" bench --device cuda --model "$tiny" \
      --prompts "$here/prompts.jsonl" --limit 32 --max-new-tokens 64 --block-size 4,8,32
    echo "exit $?"
    # The batcher's run again with each greedy decoder making its own choices (a launch chain
    # and two copies per sequence per iteration) instead of one launch for the whole round.
    echo "SDLM_PER_SEQUENCE_CHOICES=1:"
    SDLM_PER_SEQUENCE_CHOICES=1 timeout 150 "$sdlm" bench --device cuda --model "$tiny" \
      --prompts "$here/prompts.jsonl" --max-new-tokens 64 --block-size 4 --concurrency 1,4,16,64
    echo "exit $?"
  } >"$out/tiny-bench.txt" 2>&1
  summary+=("shipped model bench on cuda: $(grep -c '^exit 0' "$out/tiny-bench.txt") of 4 runs finished")
fi

if want bench; then
  echo "== kernel benchmark"
  timeout 150 "$here/sdlm-kernel-bench" ${bf16:+--matmul-tflops "$bf16"} ${fp32:+--fp32-tflops "$fp32"} \
    >"$out/bench.txt" 2>&1
  summary+=("bench: exit $?")
fi

if want sanitizer; then
  echo "== compute-sanitizer"
  if command -v compute-sanitizer >/dev/null; then
    # The narrow tensor-core kernels (both forms, Qwen's even kv-head counts) apart, with their
    # own time limit, so that a slow run of them cannot cost the first set its result.
    for set in "attention_smollm2_shape::bf16 select_unmask_parity residual_rmsnorm::bf16" \
      "attention_decode_shapes::bf16"; do
      for tool in memcheck racecheck; do
        log="$out/sanitizer-$tool-${set%%::*}.log"
        # shellcheck disable=SC2086 # the set is a list of test names
        timeout 60 compute-sanitizer --tool "$tool" --error-exitcode 9 "$here/cuda_parity" $set \
          >"$log" 2>&1
        rc=$?
        summary+=("compute-sanitizer $tool on ${set%%::*}...: exit $rc; $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$log" | tail -1)")
      done
    done
  else
    summary+=("compute-sanitizer: not on PATH")
  fi
fi

if want hf; then
  echo "== the shipped model through HF transformers"
  sample="${TMPDIR:-/tmp}/heldout-sample.py"
  python3 -c 'import json, sys; open(sys.argv[2], "w").write("".join(json.loads(l)["prompt"] for l in open(sys.argv[1])))' \
    "$here/prompts.jsonl" "$sample"
  timeout 120 python3 "$here/check-hf-load.py" "$here/sdlm-tiny-code" "$sample" 64 "$sdlm" \
    >"$out/hf-check.txt" 2>&1
  summary+=("HF transformers against sdlm perplexity, shipped model: exit $?; $(tail -1 "$out/hf-check.txt")")
fi

if asked bf16; then
  echo "== bf16 on the GPU"
  bf16_out="$out/bf16.txt"
  if random_model; then
    {
      for dtype in f32 bf16; do
        echo "--dtype $dtype:"
        timeout 120 "$sdlm" bench --device cuda --dtype "$dtype" --model "$model" \
          --prompts "$here/prompts.jsonl" --limit 16 --max-new-tokens 64 \
          --mode autoregressive,diffusion --block-size 4,32 --threshold 0.000001
        echo "exit $?"
      done
      echo "--dtype bf16, the step batcher:"
      timeout 120 "$sdlm" bench --device cuda --dtype bf16 --model "$model" \
        --prompts "$here/prompts.jsonl" --limit 16 --max-new-tokens 64 \
        --mode autoregressive,diffusion --block-size 4 --threshold 0.000001 --concurrency 1,16,64
      echo "exit $?"
    } >"$bf16_out" 2>&1
    summary+=("bf16: $(grep -c '^exit 0' "$bf16_out") of 3 bench runs finished")
  else
    summary+=("bf16: making the random model failed (random-model.log)")
  fi
  # A trained model's completions in bf16 may part from f32's where two tokens are close:
  # counted, not required to match.
  timeout 150 python3 "$here/compare_completions.py" "$sdlm" "$here/sdlm-tiny-code" \
    "$here/prompts.jsonl" bf16 >>"$bf16_out" 2>&1
  summary+=("shipped model, cuda bf16 vs cpu f32: $(grep -E 'identical' "$bf16_out" | tr '\n' ';')")
fi

if asked profile; then
  echo "== ncu: AR attention, b16 ctx16384 14/2 d64"
  if command -v ncu >/dev/null; then
    for kernel in tc tcn tcn2; do
      # Clocks as the card has them (METHOD.md); the bench's three warm-up launches skipped.
      timeout 120 ncu --clock-control none --kernel-name regex:paged_attention_tc --launch-skip 3 \
        --launch-count 2 --section SpeedOfLight --section Occupancy --section WarpStateStats \
        --section SchedulerStats --section MemoryWorkloadAnalysis \
        "$here/sdlm-kernel-bench" --profile-case 0 --profile-kernel "$kernel" --iters 3 \
        >"$out/ncu-$kernel.txt" 2>&1
      summary+=("ncu $kernel: exit $?")
    done
  else
    summary+=("ncu: not on PATH")
  fi
fi

rm -rf "$model"
printf '%s\n' "${summary[@]}" | tee "$out/summary.txt"
[[ -f $out/bench.txt ]] && cat "$out/bench.txt"
[[ -f $e2e ]] && cat "$e2e"
[[ -f $out/tiny-bench.txt ]] && cat "$out/tiny-bench.txt"
[[ -f $out/bf16.txt ]] && cat "$out/bf16.txt"
