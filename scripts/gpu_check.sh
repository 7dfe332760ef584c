#!/usr/bin/env bash
# One command for a machine with one CUDA GPU: the GPU tests, then the generation,
# training-MFU, memory and vs-TRL benchmarks at the qwen2-0.5b shape, results in
# benchmarks/results/gpu/ (one JSON per benchmark + gpu_check.log). Sized to finish in
# under 8 minutes on one H100/H200-class GPU; each step has its own time limit, and a
# failed step is reported and the rest still run (exit status: the number of failures).
#
#   scripts/gpu_check.sh            # uses .venv/bin/python if present, else python
#   PY=/path/to/python scripts/gpu_check.sh
#
# Goals it measures (issue 13): generation >= 5x transformers generate with its static
# cache at batch 256; training MFU >= 45%; GRPO >= 20x TRL; peak memory <= 0.7x TRL.
set -u
cd "$(dirname "$0")/.."
PY=${PY:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
OUT=benchmarks/results/gpu
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: > "$LOG"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: CUDA is not available to $PY (torch $("$PY" -c 'import torch; print(torch.__version__)'))" | tee -a "$LOG"
    exit 2
fi
"$PY" -c "import torch; print('gpu_check:', torch.cuda.get_device_name(), 'torch', torch.__version__)" | tee -a "$LOG"
fails=0
step() {  # step NAME SECONDS CMD...
    local name=$1 limit=$2; shift 2
    echo "== $name (limit ${limit}s): $*" | tee -a "$LOG"
    local t0=$SECONDS
    if timeout "$limit" "$@" >> "$LOG" 2>&1; then
        echo "== $name: ok ($((SECONDS - t0)) s)" | tee -a "$LOG"
    else
        echo "== $name: FAILED (exit $?, $((SECONDS - t0)) s; see $LOG)" | tee -a "$LOG"
        fails=$((fails + 1))
    fi
}
step tests 60 "$PY" -m pytest tests/test_gpu.py -q
step generation 120 "$PY" benchmarks/generation.py --preset qwen2-0.5b --device cuda --dtype bfloat16 \
    --batch 256 --prompt-min 16 --prompt-max 64 --max-new-tokens 128 --eos ragged --static --repeats 3 \
    --out "$OUT/generation.json"
step train_mfu 60 "$PY" benchmarks/train_mfu.py --device cuda --preset qwen2-0.5b --tokens 65536 --seq 1024 \
    --steps 5 --out "$OUT/train_mfu.json"
step memory 80 "$PY" benchmarks/memory.py --device cuda --steps 4 --warmup 1 --out "$OUT/memory.json"
step vs_trl 150 "$PY" benchmarks/vs_trl.py --device cuda --shape qwen2-0.5b --task reverse_ragged \
    --max-new-tokens 64 --prompts 8 --group-size 8 --steps 4 --rounds 1 --nproc 1 --trl-threads 1 \
    --lr 1e-5 --trl-budget 100 --timeout 140 --tail 2 --out-dir "$OUT"
echo "gpu_check: $fails step(s) failed; results in $OUT" | tee -a "$LOG"
exit "$fails"
