#!/usr/bin/env bash
# Set up a fresh Debian/Ubuntu machine for napari-he2rna: the system libraries napari needs to draw
# (Qt's xcb platform, Mesa OpenGL, Xvfb for headless runs), a virtual environment in .venv, and the package.
#   usage: scripts/setup_env.sh [EXTRAS]     (EXTRAS default: viewer; the tests use viewer,test)
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-viewer}"

APT_PACKAGES=(xvfb xauth libgl1 libegl1 libgl1-mesa-dri libglx-mesa0 libxkbcommon-x11-0 libxcb-icccm4
  libxcb-image0 libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 libxcb-xinerama0 libxcb-xfixes0
  libxcb-shape0 libxcb-cursor0 libdbus-1-3 libfontconfig1)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "Installing system packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch/torchvision are left unpinned in pyproject.toml so pip takes a matching pair.
.venv/bin/python -m pip install -q -e ".[$EXTRAS]"
.venv/bin/python -c "import torch, torchvision, openslide, napari_he2rna" \
  || { echo "setup failed: the installed packages do not import" >&2; exit 1; }
