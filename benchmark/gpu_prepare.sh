#!/usr/bin/env bash
# On the development machine (it reaches PyPI): fetch the cp312 wheels the GPU machine lacks into
# .gpu-wheels (git-ignored, ~27 MB; the device tool carries it: carry=[".gpu-wheels"]).
# The GPU machine's python3 (3.12) has torch, torchvision, numpy, pyarrow, pillow, huggingface_hub, tqdm.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-.venv/bin/pip}
rm -rf .gpu-wheels && mkdir -p .gpu-wheels
"$PIP" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  -d .gpu-wheels "open_clip_torch==3.3.0" timm ftfy wcwidth regex safetensors pyyaml faiss-cpu h3
du -sh .gpu-wheels
