#!/usr/bin/env bash
# FlashAttention-2 on a GPU machine, from the repository root, in one call:
#
#   bash assignment2-systems/scripts/fa2_device.sh [tests] [tune] [leaderboard] [course]
#
#   tests        our Triton GPU tests (first tile config of each list, plus the every-config tests)
#   tune         per-kernel tile sweep of the dK/dV kernels (split and TMA-reduced dQ) at the leaderboard shape
#   leaderboard  ours (split, TMA) against every SDPA backend, forward/backward/forward+backward, course harness
#   course       the course's attention tests in each folder of COURSE_TESTS (unpacked course tests/ folders)
#   profile      kernel times and idle gaps inside the leaderboard step, and the host cost of one call
#   harness      the course's compiled leaderboard step against the same step eager, per backward form
#   quick        the GPU tests whose names match QUICK_K (default: exp2)
# Uses the machine's python3 with PYTHONPATH on the source trees; writes logs and results into $OUT
# (else ./fa2_out). Each step is bounded by `timeout`.
set -u
PY=${PYTHON:-python3}
OUT=${OUT:-fa2_out}
mkdir -p "$OUT"
export PYTHONPATH=assignment1-basics:assignment2-systems${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
steps=${*:-tests tune leaderboard}
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv | tee "$OUT/gpu.txt"
for step in $steps; do
  echo "=== $step $(date +%T)"
  case $step in
    tests)
      CS336_FA2_AUTOTUNE=0 timeout ${TESTS_TIMEOUT:-400} $PY -m pytest -q -p no:cacheprovider -o addopts="" \
        assignment2-systems/tests/test_flash_attention_impl.py -k "triton" 2>&1 | tee "$OUT/tests.log" | tail -4 ;;
    tune)
      timeout ${TUNE_TIMEOUT:-420} $PY assignment2-systems/benchmarks/tune_kernels.py --kinds ${TUNE_KINDS:-dkdv_tma dkdv} ${TUNE_ARGS:-} --rep ${TUNE_REP:-100} \
        --json "$OUT/tune.json" 2>&1 | tail -${TUNE_TAIL:-30} ;;
    leaderboard)
      timeout 300 $PY -m cs336_systems.cli bench-attention --grid leaderboard --course-harness \
        --leaderboard-impls ${LB_IMPLS:-triton triton_tma sdpa_flash sdpa_cudnn} --out-dir "$OUT" 2>&1 \
        | tee "$OUT/leaderboard.log" | grep -v "^ *[A-Za-z_]*  *[0-9.]*%" | tail -40 ;;
    profile)
      # the SM clock, power and throttle reasons every 200 ms while it runs (sustained load can lower the clock)
      nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu,clocks_throttle_reasons.active \
        --format=csv,noheader -lms 200 > "$OUT/clocks.csv" 2>/dev/null & smi=$!
      timeout 300 $PY assignment2-systems/benchmarks/profile_leaderboard.py --json "$OUT/profile.json" \
        ${PROFILE_ARGS:-} 2>&1 | tail -14
      kill $smi 2>/dev/null ;;
    harness)
      timeout 400 $PY assignment2-systems/benchmarks/course_harness_check.py --json "$OUT/harness.json" 2>&1 \
        | grep -v Warning | tail -6 ;;
    quick)
      CS336_FA2_AUTOTUNE=0 timeout 240 $PY -m pytest -q -p no:cacheprovider -o addopts="" \
        assignment2-systems/tests/test_flash_attention_impl.py -k "${QUICK_K:-exp2}" 2>&1 | tail -4 ;;
    course)
      # COURSE_TESTS: one or more unpacked course tests/ folders (with our adapters.py copied in)
      for dir in ${COURSE_TESTS:-}; do
        echo "--- $dir"
        timeout 200 $PY -m pytest -q -p no:cacheprovider -o addopts="" "$dir" -k "flash" 2>&1 | tail -3
      done ;;
    *) echo "unknown step $step" ;;
  esac
done
