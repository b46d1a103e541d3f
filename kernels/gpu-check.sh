#!/usr/bin/env bash
# Runs on the GPU machine from the folder build-gpu-bundle.sh made, in under 8 minutes:
#  1. the card and driver; copy bandwidth and matrix rates through PyTorch (the ceilings);
#  2. the CUDA parity tests (fresh random inputs, poisoned outputs, each kernel vs its CPU
#     reference), then compute-sanitizer memcheck and racecheck on a small subset where it works;
#  3. the kernel benchmark against its floors;
#  4. end-to-end decoding with `sdlm --device cuda` (candle's CUDA backend) on random weights of
#     Qwen2.5-0.5B's shape made here: autoregressive against diffusion, same weights and prompts.
# Writes everything under the folder given as $1 (default ./results) and prints the table last.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/results}
mkdir -p "$out"
summary=()

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

echo "== parity tests"
if timeout 150 "$here/cuda_parity" 2>&1 | tee "$out/parity.log" | grep -E "^test |test result|panicked|error"; then :; fi
summary+=("parity: $(grep 'test result' "$out/parity.log" | tail -1)")

echo "== compute-sanitizer"
if command -v compute-sanitizer >/dev/null; then
  for tool in memcheck racecheck; do
    timeout 60 compute-sanitizer --tool "$tool" --error-exitcode 9 "$here/cuda_parity" \
      attention_smollm2_shape::bf16 select_unmask_parity residual_rmsnorm::bf16 \
      >"$out/sanitizer-$tool.log" 2>&1
    rc=$?
    summary+=("compute-sanitizer $tool: exit $rc; $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$out/sanitizer-$tool.log" | tail -1)")
  done
else
  summary+=("compute-sanitizer: not on PATH")
fi

echo "== kernel benchmark"
timeout 150 "$here/sdlm-kernel-bench" ${bf16:+--matmul-tflops "$bf16"} ${fp32:+--fp32-tflops "$fp32"} \
  >"$out/bench.txt" 2>&1
summary+=("bench: exit $?")

echo "== end-to-end decoding"
# The CUDA libraries sdlm links (libcudart, libnvrtc, libcurand, libcublas, libcublasLt) are PyTorch's
# pip packages here; libcuda is the driver's.
cu13=$(python3 -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "lib"))' 2>/dev/null)
export LD_LIBRARY_PATH="${cu13:+$cu13:}${LD_LIBRARY_PATH:-}"
model="${TMPDIR:-/tmp}/sdlm-random-qwen2-0.5b"
sdlm="${TMPDIR:-/tmp}/sdlm-cuda"
python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
  "$here/sdlm.xz" "$sdlm" && chmod +x "$sdlm"
e2e="$out/e2e.txt"
if timeout 120 python3 "$here/random_qwen2.py" "$model" "$here/tokenizer.json" >"$out/random-model.log" 2>&1; then
  # With random weights every confidence is about 1/vocab: tau 0.9 unmasks one position per
  # step, so the diffusion rows fix the tokens per forward instead: a tiny tau unmasks a whole
  # block per forward (the engine's parallel ceiling), and a step budget of 12 per 32-token
  # block gives 2.7 tokens per forward, where a trained model of the paper's quality decodes.
  run_bench() { timeout 150 "$sdlm" bench --device cuda --model "$model" --prompts "$here/prompts.jsonl" \
    --limit 16 --max-new-tokens 64 "$@"; }
  {
    run_bench --mode autoregressive,diffusion --block-size 4,8,32 --threshold 0.000001
    echo "exit $?"
    run_bench --mode diffusion --block-size 32 --threshold 0.9 --max-steps-per-block 12
    echo "exit $?"
  } >"$e2e" 2>&1
  summary+=("end-to-end: $(grep -c '^exit 0' "$e2e") of 2 bench runs finished")
else
  summary+=("end-to-end: making the random model failed (random-model.log)")
fi
rm -rf "$model"

printf '%s\n' "${summary[@]}" | tee "$out/summary.txt"
cat "$out/bench.txt"
[[ -f $e2e ]] && cat "$e2e"
