#!/usr/bin/env bash
# Set up and run the main job on the bundled sample slide with the bundled demo model, headless:
# writes the tile-score CSV, one heatmap PNG per gene/set and the slide-level predictions to results/sample.
#   usage: scripts/run_sample.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-results/sample}"
bash scripts/setup_env.sh viewer
exec .venv/bin/he2rna spatialize sample_data/sample_slide.tiff \
  --model sample_data/demo_model.safetensors \
  --genes "T cells,B cells,epithelium,proliferation,CD3D,MS4A1,MKI67" \
  --out "$OUT" --overwrite
