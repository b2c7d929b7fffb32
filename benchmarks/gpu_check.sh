#!/usr/bin/env bash
# The GPU check of napari-he2rna (issue 26): on a machine with a CUDA GPU, one run of under 6 minutes that
# writes ONE JSON (default benchmarks/results/gpu_check.json): torch/CUDA versions and the device; ResNet50
# and ViT-L/16 extraction tiles/s (pipeline and backbone alone, at the precision "auto" picks) on a synthetic
# 8,000-tile slide; all-tile HE2RNA training batches/s streaming from zarr stores and from memory; and whether
# the GPU's features match the CPU's (cosine >= 0.999 per tile). Random weights only: nothing is downloaded
# but the Python packages, and only when .venv lacks them.
#
#   usage: benchmarks/gpu_check.sh [--out FILE] [--cpu-smoke] [any option of benchmarks/gpu_check.py]
#
# --cpu-smoke runs everything on the CPU at tiny sizes in well under a minute (tests/test_gpu_check.py).
# HE2RNA_PYTHON=/path/to/python uses that interpreter as it is (no set-up); otherwise .venv is made or
# completed with scripts/setup_env.sh viewer,test (system libraries, venv, the package with timm), or with
# pip alone where that script cannot run (no apt-get / sudo).
set -euo pipefail
cd "$(dirname "$0")/.."

t0=$(date +%s)
needs='import torch, torchvision, timm, zarr, openslide, napari_he2rna'
if [ -n "${HE2RNA_PYTHON:-}" ]; then
  PY="$HE2RNA_PYTHON"
else
  PY=.venv/bin/python
  if ! { [ -x "$PY" ] && "$PY" -c "$needs" >/dev/null 2>&1; }; then
    echo "gpu_check: setting up .venv (scripts/setup_env.sh viewer,test)" >&2
    if ! bash scripts/setup_env.sh viewer,test; then
      echo "gpu_check: setup_env.sh failed; installing with pip alone" >&2
      [ -x "$PY" ] || "${PYTHON:-python3}" -m venv .venv
      "$PY" -m pip install -q --upgrade pip
      "$PY" -m pip install -q -e ".[test]"
    fi
  fi
fi
"$PY" -c "$needs" || { echo "gpu_check: $PY cannot import what the check needs ($needs)" >&2; exit 1; }

smoke=0
for arg in "$@"; do [ "$arg" = "--cpu-smoke" ] && smoke=1; done
if [ "$smoke" = 0 ]; then
  if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: torch $("$PY" -c 'import torch; print(torch.__version__)') sees no CUDA GPU here;" \
      "the check runs on the CPU (use --cpu-smoke for the quick CPU run)" >&2
  fi
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >&2
fi
echo "gpu_check: set-up took $(( $(date +%s) - t0 )) s" >&2
exec "$PY" benchmarks/gpu_check.py "$@"
