#!/usr/bin/env bash
# Issue 19's serving benchmark on the device machine (one GPU): our server vs HF generate vs our non-paged
# decoding, llama-125m and tinystories-17m (random weights), concurrency 1/8/64/256. Under 8 minutes on an H100:
# measuring stops at --time-budget (remaining points are recorded as skipped), model set-up and the last point
# come on top.
#
# The device image has torch, transformers, httpx, anyio, h11, click but not the HTTP server stack. Its wheels
# (CPython 3.12, manylinux x86_64, the developer venv's versions) go in .whl/ at the repository root, which git
# ignores; made on the developer machine with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 \
#     typing-inspection==0.4.5 uvicorn==0.54.0 annotated-doc==0.0.7 opentelemetry-api==1.45.2 typing-extensions==4.16.0 \
#     uvloop==0.23.0 httptools==0.9.0
# (fastapi imports annotated-doc and opentelemetry-api; pydantic needs typing-extensions >= 4.16; uvicorn takes
# uvloop and httptools when they import, as in the project's environment).
#
# From the run tool: command `bash assignment2-systems/benchmarks/serving_device.sh`, carry [".whl"].
# Results: $OUT/serving.json, serving.md, serving.png, serving_log.txt.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/serving_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:assignment1-basics:assignment2-systems PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
# Extra arguments go to serving.py (e.g. `--decode-steps 8 --models llama-125m --stem serving_k8`, or
# `--async-scheduling --stem serving_async` for the server and engine rows with asynchronous scheduling, or
# `--api-workers 4 --baselines engine --stem serving_w4` for the server with four HTTP processes).
timeout 570 python3 assignment2-systems/benchmarks/serving.py --out-dir "$OUT" --stem serving --time-budget 330 "$@" \
    2>&1 | grep -v --line-buffered -e "^Loading weights" -e "^Writing model shards" | tee "$OUT/serving_log.txt"
