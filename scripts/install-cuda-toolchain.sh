#!/usr/bin/env bash
# Installs a CUDA 13.0 compiler (nvcc, ptxas, CCCL headers) from PyPI into a venv, so the
# kernels compile on a machine with no GPU and no system CUDA. Idempotent.
#
# Pinned to 13.0: the GPU machines run driver 580 (CUDA 13.0), which refuses PTX from a newer
# toolkit. Prints the toolkit root (the folder holding bin/nvcc and include/).
set -euo pipefail

venv="${SDLM_CUDA_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/sdlm/cuda-13.0-venv}"
packages=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-cuda-cccl==13.0.85
  nvidia-nvvm==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-cuda-runtime==13.0.96
)

stamp="$venv/.sdlm-installed"
want="${packages[*]}"
if [[ ! -f $stamp || "$(cat "$stamp")" != "$want" ]]; then
  python3 -m venv "$venv" >&2
  "$venv/bin/pip" install --quiet --disable-pip-version-check "${packages[@]}" >&2
  echo "$want" >"$stamp"
fi

root=$("$venv/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')
[[ -x $root/bin/nvcc ]] || { echo "nvcc not found under $root" >&2; exit 1; }
echo "$root"
