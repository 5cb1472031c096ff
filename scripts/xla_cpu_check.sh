#!/usr/bin/env bash
# The TPU backend's shape bucketing on torch_xla's CPU device. NOT run in CI: the venv it builds
# holds PyPI's torch 2.9.0 (a CUDA build, with its nvidia-* wheels: torch_xla 2.9.0 imports
# nothing less) and torch-xla 2.9.0, about 7 GB, 3-4 minutes to install.
# Usage: scripts/xla_cpu_check.sh [VENV_DIR]   (default: .xla-venv next to this checkout)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${1:-$root/../.xla-venv}"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import torch_xla" 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q torch==2.9.0 torch-xla==2.9.0
  "$venv/bin/pip" install -q -e "$root" torch==2.9.0
fi
cd "$root"
PJRT_DEVICE=CPU "$venv/bin/python" scripts/xla_ragged_contract.py
PJRT_DEVICE=CPU exec "$venv/bin/python" scripts/xla_cpu_check.py
