#!/usr/bin/env bash
# The main job: set up, then GRPO-train a tiny Qwen2-shaped model on 2 CPU workers.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/distflow run pipelines/grpo.py "$@"
