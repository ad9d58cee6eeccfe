#!/usr/bin/env bash
# Real-trainer isoFLOP profiles on one GPU (issue 9): 3 budgets × 4 sizes of the API's model variant, trained on
# generated stories (no network there) for each query's FLOPs. Needs only python3 with torch, numpy, scipy,
# matplotlib and cs336_basics' imports (einops, jaxtyping, regex, tqdm); run from the repository root:
#   OUT=/tmp/out bash assignment3-scaling/scripts/h100_profile.sh
# It starts no new run after TIME_LIMIT seconds; finished runs live in runs/ (git-ignored, kept while the machine
# stays warm), so running it again continues the grid. Results and figures are copied to $OUT each time.
set -euo pipefail
export PYTHONPATH=assignment1-basics:assignment3-scaling${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; RUNS=${RUNS:-runs/a3_real}; TIME_LIMIT=${TIME_LIMIT:-420}
mkdir -p "$OUT" "$RUNS"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
if [ ! -f "$RUNS/tokens.npy" ]; then
  python3 -m cs336_scaling make-tokens --out "$RUNS/tokens.npy" --stories "${STORIES:-300000}" --vocab-size 1024 \
    --work-dir "$RUNS"
fi
# Shapes d_model x layers x heads keep d_model/n_layer = 64 and d_head = 64 (N = 12·L·d²: 0.39M … 10.6M);
# the budgets bracket N_opt ≈ √(C/120) ≈ 0.9M … 2.9M. Batch 128, lr 1e-3 (the API's top rate; small models).
# About 0.87B tokens in all, 62% of them in the 1e15 profile.
python3 -m cs336_scaling profile --tokens "$RUNS/tokens.npy" --vocab-size 1024 \
  --budgets ${BUDGETS:-1e14 3e14 1e15} --shapes ${SHAPES:-128x2x2 192x3x3 256x4x4 384x6x6} \
  --batch-size 128 --learning-rate 1e-3 --eval-batches 16 \
  --results "$RUNS/profile.jsonl" --figure-prefix "$RUNS/a3_real" --time-limit-s "$TIME_LIMIT"
cp "$RUNS/profile.jsonl" "$OUT/a3_real_profile.jsonl"
cp "$RUNS"/a3_real_*.png "$OUT/"
