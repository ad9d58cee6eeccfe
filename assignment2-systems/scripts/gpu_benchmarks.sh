#!/usr/bin/env bash
# GPU runs of the assignment-2 benchmarking harness (handout §1.1 and §2), from the repository root:
#
#   bash assignment2-systems/scripts/gpu_benchmarks.sh STAGE
#
# Stages (each bounded by `timeout`s summing to under 4 minutes; `all-*` run several in a row):
#   single    one GPU: model-size table (small … 2.7B, context 128/256/512, forward, forward+backward, AdamW step),
#             eager, fp32 then bf16 autocast
#   memory    one GPU: 2.7B peak memory (forward without grad, train step; fp32, bf16; context 128/256/512) and
#             CUDA memory-history snapshots of its forward and train step at context 128
#   compile   one GPU: eager vs torch.compile (small, medium, large at context 256; fp32, bf16), and the
#             mixed-precision accumulation / autocast-dtype tables
#   multi     two GPUs: NCCL all-reduce 1 MiB … 1 GiB (world 2; 4 and 6 where GPUs exist), DDP variants on the
#             medium model (context 512), AdamW / ZeRO-1 / FSDP memory per rank
#   multi-xl  two GPUs: DDP variants and memory on the handout's xl model (context 128)
#   gloo      CPU only: gloo all-reduce, world sizes 2, 4, 6
#   all-single = single memory compile;  all-multi = multi multi-xl gloo
#
# A collective that hangs (a rank died) is given up after 60 s (process-group timeout), inside each step's bound.
# Uses `python3` (override: PYTHON=...) with PYTHONPATH on the source trees: no installed package is needed.
# Outputs go to $OUT when set (else ./gpu_bench_out): gpu_STAGE.log, gpu_STAGE_summary.md (every Markdown
# table), gpu_STAGE.tar.gz (JSON, Markdown, figures) and gzipped memory snapshots — at most 5 files.
# Environment overrides: WARMUP, STEPS (model table; default 5 and 10, as in the handout).
set -u

STAGE=${1:-}
case "$STAGE" in
  single|memory|compile|multi|multi-xl|gloo|all-single|all-multi) ;;
  *) echo "usage: $0 single|memory|compile|multi|multi-xl|gloo|all-single|all-multi" >&2; exit 2 ;;
esac

REPO=$(cd "$(dirname "$0")/../.." && pwd)
cd "$REPO" || exit 2
PY=${PYTHON:-python3}
OUT_DIR=${OUT:-$REPO/gpu_bench_out}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_bench_${STAGE}.XXXXXX")
mkdir -p "$OUT_DIR" "$WORK/snapshots"
LOG="$OUT_DIR/gpu_${STAGE}.log"
exec > >(tee -a "$LOG") 2>&1

export PYTHONPATH="$REPO/assignment1-basics:$REPO/assignment2-systems${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
# NVLink multicast stays off on these hosts (it can take shared GPUs down)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
WARMUP=${WARMUP:-5}
STEPS=${STEPS:-10}
CLI=("$PY" -m cs336_systems.cli)
FAILED=()
T_START=$SECONDS

# run NAME LIMIT_S CMD...: one bounded step; a failure is logged and the script goes on
run() {
  local name=$1 limit=$2 rc t0=$SECONDS
  shift 2
  echo "=== [$(date -u +%H:%M:%S)] $name (at most ${limit}s)"
  timeout --kill-after=10 "$limit" "$@"
  rc=$?
  echo "=== $name: exit $rc after $((SECONDS - t0))s"
  if [ "$rc" -ne 0 ]; then FAILED+=("$name:exit$rc"); fi
}

# re-render a model-bench JSON that a killed run left (its Markdown and figure were not written)
render_if_missing() {
  local stem=$1
  if [ -f "$WORK/$stem.json" ] && [ ! -f "$WORK/$stem.md" ]; then
    run "render $stem" 20 "${CLI[@]}" bench-model --render "$WORK/$stem.json" --out-dir "$WORK"
  fi
}

gpus() { "$PY" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0; }

stage_single() {
  run "model table fp32" 125 "${CLI[@]}" bench-model --sizes small medium large xl 2.7B --contexts 128 256 512 \
    --precisions fp32 --warmup "$WARMUP" --steps "$STEPS" --time-budget 95 --no-progress \
    --out-dir "$WORK" --stem model_fp32
  render_if_missing model_fp32
  run "model table bf16" 65 "${CLI[@]}" bench-model --sizes small medium large xl 2.7B --contexts 128 256 512 \
    --precisions bf16 --warmup "$WARMUP" --steps "$STEPS" --time-budget 40 --no-progress \
    --out-dir "$WORK" --stem model_bf16
  render_if_missing model_bf16
}

stage_memory() {
  run "2.7B peak memory" 120 "${CLI[@]}" bench-model --sizes 2.7B --contexts 128 256 512 \
    --modes forward train_step --forward-no-grad --precisions fp32 bf16 --warmup 1 --steps 2 \
    --time-budget 90 --no-progress --out-dir "$WORK" --stem memory_2.7B
  render_if_missing memory_2.7B
  run "2.7B memory snapshots" 90 "${CLI[@]}" bench-model --sizes 2.7B --contexts 128 \
    --modes forward train_step --forward-no-grad --warmup 1 --steps 1 --snapshot-steps 1 \
    --memory-snapshot "$WORK/snapshots/mem_2.7B.pickle" --no-progress --out-dir "$WORK" --stem snapshot_2.7B
}

stage_compile() {
  run "eager vs compiled" 190 "${CLI[@]}" bench-model --sizes small medium large --contexts 256 \
    --precisions fp32 bf16 --compile eager compiled --warmup "$WARMUP" --steps "$STEPS" --time-budget 150 \
    --no-progress --out-dir "$WORK" --stem model_compile
  render_if_missing model_compile
  run "mixed-precision tables" 25 "${CLI[@]}" mixed-precision --out-dir "$WORK"
}

stage_multi() {
  echo "GPUs visible: $(gpus)"
  run "NCCL all-reduce" 90 "${CLI[@]}" bench-allreduce --backends nccl --world-sizes 2 4 6 \
    --sizes-mb 1 10 100 1000 --warmup 5 --iters 10 --timeout 60 --out-dir "$WORK" --stem allreduce_nccl
  run "DDP medium" 140 "${CLI[@]}" bench-ddp --backend nccl --world-size 2 --size medium --context 512 \
    --batch-size 4 --bucket-sizes-mb 1 10 25 100 1000 --warmup 3 --steps 8 --memory adamw zero1 fsdp --timeout 60 \
    --out-dir "$WORK" --stem ddp_medium
}

stage_multi_xl() {
  echo "GPUs visible: $(gpus)"
  run "DDP xl" 220 "${CLI[@]}" bench-ddp --backend nccl --world-size 2 --size xl --context 128 \
    --batch-size 4 --bucket-sizes-mb 1 10 100 1000 --warmup 3 --steps 5 --memory adamw zero1 fsdp --timeout 60 \
    --out-dir "$WORK" --stem ddp_xl
}

stage_gloo() {
  run "gloo all-reduce" 220 "${CLI[@]}" bench-allreduce --backends gloo --world-sizes 2 4 6 \
    --sizes-mb 1 10 100 1000 --warmup 2 --iters 5 --out-dir "$WORK" --stem allreduce_gloo
}

echo "gpu_benchmarks.sh $STAGE: $(date -u), repo $REPO, python $("$PY" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__)' 2>&1)"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "nvidia-smi: not available"
case "$STAGE" in
  single) stage_single ;;
  memory) stage_memory ;;
  compile) stage_compile ;;
  multi) stage_multi ;;
  multi-xl) stage_multi_xl ;;
  gloo) stage_gloo ;;
  all-single) stage_single; stage_memory; stage_compile ;;
  all-multi) stage_multi; stage_multi_xl; stage_gloo ;;
esac

# pack: every Markdown table in one summary, results in one archive, snapshots gzipped beside it
: > "$OUT_DIR/gpu_${STAGE}_summary.md"
for md in "$WORK"/*.md; do
  [ -f "$md" ] && { cat "$md"; echo; } >> "$OUT_DIR/gpu_${STAGE}_summary.md"
done
tar -czf "$OUT_DIR/gpu_${STAGE}.tar.gz" -C "$WORK" --exclude='snapshots' . || FAILED+=("tar")
for snap in "$WORK"/snapshots/*.pickle; do
  [ -f "$snap" ] && gzip -c "$snap" > "$OUT_DIR/$(basename "$snap").gz"
done
ls -l "$OUT_DIR"
echo "=== stage $STAGE done in $((SECONDS - T_START))s; failed steps: ${FAILED[*]:-none}"
rm -rf "$WORK"
sleep 1  # let tee write the last lines of the log
exit 0
