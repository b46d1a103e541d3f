#!/usr/bin/env bash
# The project's test command (README, .ci/run): installs what the tests need, then runs them.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo fmt --all -- --check

# CUDA without a GPU: compile every kernel for sm_90 (ptxas report printed), then build the CUDA
# feature and its parity tests; running them needs a GPU (kernels/gpu-check.sh).
kernels/check-cuda-compile.sh
root=$(scripts/install-cuda-toolchain.sh)
PATH="$root/bin:$PATH" CUDA_HOME="$root" cargo test -p sdlm-kernels --features cuda --no-run

cargo test --workspace
