#!/usr/bin/env bash
# Set up distflow in ./.venv: the pinned CPU build of torch where there is no GPU
# (an unpinned torch would pull a multi-GB CUDA build), then distflow with its dev extra.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
if ! python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        pip install -q torch
    else
        pip install -q torch==2.13.0
    fi
fi
pip install -q -e ".[dev]"
