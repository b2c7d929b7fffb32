#!/usr/bin/env bash
# Install everything (system packages, .venv, the package with its test extra) and run the test suite.
# The napari tests draw on a virtual X display (Xvfb + Mesa), started by pytest-xvfb.
#   usage: scripts/test.sh [PYTEST ARGS...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh viewer,test
unset QT_QPA_PLATFORM   # offscreen cannot draw napari's canvas; pytest-xvfb provides the display
exec .venv/bin/python -m pytest "$@"
