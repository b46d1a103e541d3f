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

# sdlm against llama.cpp on SmolLM2 (downloads 92 MB once; builds llama-cpp-python once, ~6 min).
scripts/check-llama-cpp.sh

# The cluster tests start a real etcd (Debian's etcd-server).
scripts/install-etcd.sh >/dev/null

# The Helm chart: rendered, linted and validated offline (Helm 4's library from PyPI); the alert
# rules checked by Prometheus's promtool (Debian's prometheus, also used by the local cluster).
scripts/check-helm.sh
"$(dirname "$(scripts/install-prometheus.sh)")/promtool" check rules deploy/prometheus/alerts.yml

# The evaluation tests run HumanEval's canonical solutions in the sandbox (45 KB, PyPI wheel).
scripts/fetch-humaneval.sh >/dev/null

# Every test of the workspace; the last line totals them (cargo's own last line is often a
# doc-test run with nothing in it).
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace 2>&1 | tee "$log"
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i) ~ /^passed;?$/) p += $(i - 1); if ($(i) ~ /^failed;?$/) f += $(i - 1) } }
     END { printf "%d passed, %d failed\n", p, f }' "$log"
