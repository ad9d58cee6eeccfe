#!/usr/bin/env bash
# What issue 3's GPU measurements ran on the H100 (python3 with torch preinstalled, repo root as cwd):
#   1. our training step vs HF LlamaForCausalLM at the tinystories-17m shape, batch 32 x 256, bf16;
#   2. a tinystories-17m convergence run on the generated story corpus (no network there for real data),
#      bounded by TIME_LIMIT seconds and resumable: run the script again to continue it.
set -euo pipefail
export PYTHONPATH=assignment1-basics${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; RUNS=${RUNS:-/tmp/runs}; TIME_LIMIT=${TIME_LIMIT:-300}
mkdir -p "$OUT" "$RUNS"
cli() { python3 -m cs336_basics "$@"; }
if [ "${SKIP_STEP_BENCH:-0}" != 1 ]; then
  python3 assignment1-basics/benchmarks/train_step.py --out "$OUT/train_step_h100.json" \
    --figure "$OUT/train_step_h100.png"
fi
if [ ! -f "$RUNS/data/train.npy" ]; then
  mkdir -p "$RUNS/data"
  python3 -c "from cs336_basics.corpus import write_corpus as w; w('$RUNS/data/train.txt', 400_000, 0); w('$RUNS/data/val.txt', 4_000, 1)"
  cli train-tokenizer --input "$RUNS/data/train.txt" --vocab-size 10000 --out-dir "$RUNS/tok" --overwrite
  for s in train val; do cli encode --tokenizer "$RUNS/tok" --input "$RUNS/data/$s.txt" --output "$RUNS/data/$s.npy" --overwrite; done
fi
resume=(); [ -f "$RUNS/ts17m/checkpoint.pt" ] && resume=(--resume)
cli train --preset tinystories-17m --train-data "$RUNS/data/train.npy" --val-data "$RUNS/data/val.npy" \
  --out-dir "$RUNS/ts17m" --compile --time-limit-s "$TIME_LIMIT" --no-progress --log-interval 50 "${resume[@]}" \
  | tail -3
cp "$RUNS/ts17m/metrics.jsonl" "$OUT/ts17m_metrics.jsonl"
cli plot --runs "$RUNS/ts17m" --labels tinystories-17m --out "$OUT/ts17m_loss.png" \
  --title "tinystories-17m on the generated corpus, H100"
cli generate --run-dir "$RUNS/ts17m" --tokenizer "$RUNS/tok" --prompt "Once upon a time," --prompt "Tom" \
  --max-new-tokens 256 | tee "$OUT/ts17m_samples.txt"
