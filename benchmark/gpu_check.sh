#!/usr/bin/env bash
# The project's one GPU script (run it through the device tool with carry=[".gpu-wheels"], made by
# benchmark/gpu_prepare.sh): installs the carried wheels beside the machine's own torch, then measures
# everything that needs a GPU (benchmark/gpu_check.py) into one JSON summary:
#   $OUT/gpu_check.json (or ./gpu_check.json), printed as it goes.
# Budget: 8 minutes on one H100 (the Python part stops itself at 450 s and keeps what it measured).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT:-.}
PY=${PYTHON:-python3}
if [ ! -d .gpu-wheels ]; then
  echo "gpu_check: no .gpu-wheels folder: run bash benchmark/gpu_prepare.sh here and carry it" >&2
  exit 2
fi
"$PY" -m pip install -q --no-index --no-deps --target .gpu-site .gpu-wheels/*.whl
export PYTHONPATH="$PWD/.gpu-site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset GEOVOTE_DEVICE
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 450 "$PY" -m benchmark.gpu_check --out "$OUT_DIR/gpu_check.json" "$@"
