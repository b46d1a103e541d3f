#!/usr/bin/env bash
# The chart's CI checks: Helm's own library (helm-python-sdk bundles Helm 4's Go SDK as a shared
# library; the registries carry no helm binary) and kubernetes-validate, in a virtual environment
# of their own under $SDLM_CACHE, installed once at pinned versions; then scripts/check_chart.py.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${SDLM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sdlm}/helm-venv"
if ! "$venv/bin/python" -c 'import helm_python, kubernetes_validate, yaml' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check \
    helm-python-sdk==0.2.2 kubernetes-validate==1.37.0 PyYAML==6.0.4 >&2
fi
"$venv/bin/python" scripts/check_chart.py
