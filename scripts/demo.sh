#!/usr/bin/env bash
# The main job: set up, then train the built-in pipeline on 2 CPU workers.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/distflow run pipelines/bandit.py "$@"
