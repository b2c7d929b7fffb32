#!/usr/bin/env bash
# Set up and run the main job on the bundled sample slide with the bundled demo model, headless:
# writes the tile-score CSV, one heatmap PNG per gene/set and the slide-level predictions to results/sample.
# Each name gives a different map: no "proliferation" (the built-in set is MKI67 alone), and the feature
# distance to the model's training data, with its threshold marked.
#   usage: scripts/run_sample.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-results/sample}"
bash scripts/setup_env.sh viewer
exec .venv/bin/he2rna spatialize sample_data/sample_slide.tiff \
  --model sample_data/demo_model.safetensors \
  --genes "T cells,B cells,epithelium,MKI67,CD3D,MS4A1,feature distance" \
  --out "$OUT" --overwrite
