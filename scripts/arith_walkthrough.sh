#!/usr/bin/env bash
# The README walk-through, timed: SFT a tiny model from scratch on the shipped arithmetic
# word problems, then GRPO with reward=math; prints held-out greedy accuracy before/after.
#   bash scripts/arith_walkthrough.sh [OUT_DIR]      (after scripts/setup.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/arith}
PY=${PYTHON:-.venv/bin/python}
t0=$(date +%s)
$PY -m distflow.cli run sft data=examples/arith/train.jsonl --out "$OUT/sft"
t1=$(date +%s)
$PY -m distflow.cli run grpo model="$OUT/sft/model" data=examples/arith/train.jsonl \
    data.eval=examples/arith/heldout.jsonl eval_every=20 reward=math \
    max_prompt_len=64 max_new_tokens=16 lr=5e-4 --steps 60 --out "$OUT/grpo"
t2=$(date +%s)
echo "walkthrough: sft $((t1 - t0)) s, grpo $((t2 - t1)) s, total $((t2 - t0)) s"
