#!/usr/bin/env bash
# Real-trainer isoFLOP profiles on one GPU (issue 9): 3 budgets × 4 sizes of the API's model variant, trained on
# generated stories (no network there) for each query's FLOPs. Needs only python3 with torch, numpy, scipy,
# matplotlib, einops and jaxtyping (cs336_basics' imports); run from the repository root:
#   OUT=/tmp/out bash assignment3-scaling/scripts/h100_profile.sh
# Rerunning with the same $OUT continues where a time limit stopped it (finished runs are read back from the JSONL).
set -euo pipefail
export PYTHONPATH=assignment1-basics:assignment3-scaling${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; DATA=${DATA:-/tmp/a3_data}; TIME_LIMIT=${TIME_LIMIT:-480}
mkdir -p "$OUT" "$DATA"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
if [ ! -f "$DATA/tokens.npy" ]; then
  python3 -m cs336_scaling make-tokens --out "$DATA/tokens.npy" --stories "${STORIES:-1000000}" --vocab-size 1024 \
    --work-dir "$DATA"
fi
# Shapes d_model x layers x heads keep d_model/n_layer = 64 and d_head = 64 (N = 12·L·d²: 0.39M … 10.6M);
# the budgets bracket N_opt ≈ √(C/120) ≈ 0.9M … 2.9M. Batch 128, lr 1e-3 (the API's top rate; small models).
python3 -m cs336_scaling profile --tokens "$DATA/tokens.npy" --vocab-size 1024 \
  --budgets 1e14 3e14 1e15 --shapes 128x2x2 192x3x3 256x4x4 384x6x6 \
  --batch-size 128 --learning-rate 1e-3 --log-every 0 --eval-batches 16 \
  --results "$OUT/a3_real_profile.jsonl" --figure-prefix "$OUT/a3_real" --time-limit-s "$TIME_LIMIT"
