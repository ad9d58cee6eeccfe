"""Issue 19's serving benchmark in one run: our OpenAI-compatible server (continuous batching, paged KV cache)
against Hugging Face `generate` with static batching and our own non-paged static-batched decoding, same
requests, at several concurrencies, for two random-weight models:

- llama-125m: a transformers `LlamaConfig` (hidden 768, 12 layers, 12 heads, intermediate 2048, vocabulary
  32,000, 2048 positions; ~134M parameters with the untied LM head), transformers' own random init, bf16;
- tinystories-17m: the cs336_basics preset with our random init, its context raised to 1024 so that the same
  prompts (up to 512) and outputs (up to 256) fit (RoPE: no parameter depends on the context length).

Each is saved as a Hugging Face folder (with a synthetic byte-level BPE tokenizer filling its vocabulary), which
the server loads as `--hf-model` and the baselines load too; a third row runs the server's own engine in-process
without HTTP (the serving path's share is the gap to it). Reports output tokens/s, TTFT and ITL
percentiles, and KV memory: what the server's paged pool held at its peak (blocks high-water x bytes per block)
against the contiguous pre-allocation static batching needs. On the device:

    PYTHONPATH=assignment1-basics:assignment2-systems python3 assignment2-systems/benchmarks/serving.py \\
        --out-dir "$OUT"                      # see serving_device.sh for the whole command line

`--tiny` shrinks both models and the workload so the whole path (server, load generator, baselines, report,
figure) runs on a CPU in seconds (the CI test).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
for sub in ("assignment1-basics", "assignment2-systems"):
    if str(REPO / sub) not in sys.path:
        sys.path.insert(0, str(REPO / sub))

from cs336_systems.serving import bench_cli  # noqa: E402
from cs336_systems.serving.bench_models import write_random_llama, write_random_preset  # noqa: E402
from cs336_systems.serving.engine_args import (  # noqa: E402
    MAX_API_WORKERS,
    add_http_arguments,
    add_speed_arguments,
    http_settings,
    speed_settings,
)

FULL = {
    "concurrency": [1, 8, 64, 256],
    "num_requests": [8, 32, 256, 512],  # four rounds at 64 and two at 256: the closed loop's ramp-down weighs less
    "prompt_len_range": (16, 512),
    "output_len_range": (32, 256),
}
TINY = {
    "concurrency": [1, 4],
    "num_requests": [3, 8],
    "prompt_len_range": (4, 24),
    "output_len_range": (4, 12),
}
TINY_LLAMA = dict(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, vocab_size=512, max_position=256)


def build_models(tmp: str, tiny: bool, only: list[str] | None) -> list[tuple[str, str, dict]]:
    """(name, HF folder, info) for each model of the run."""
    models = []
    if only is None or "llama-125m" in only:
        kwargs = TINY_LLAMA if tiny else {}
        info = write_random_llama(os.path.join(tmp, "llama"), **kwargs)
        models.append(("llama-tiny" if tiny else "llama-125m", info["hf_dir"], info))
    if only is None or "tinystories-17m" in only:
        preset, context = ("quickstart", 256) if tiny else ("tinystories-17m", 1024)
        info = write_random_preset(os.path.join(tmp, "preset"), preset, context_length=context)
        info["note"] = f"preset context {info['preset_context_length']} raised to {context}"
        models.append((f"{preset} (random weights)", info["hf_dir"], info))
    return models


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny models and workload: a CPU smoke test in seconds")
    p.add_argument("--out-dir", type=Path, default=None,
                   help="write <stem>.json/.md/.png here (default: assignment2-systems/benchmarks/results)")
    p.add_argument("--stem", default=None, help="output file name stem (default: serving, or serving_tiny)")
    p.add_argument("--models", default=None, help="comma-separated subset of llama-125m,tinystories-17m")
    p.add_argument("--concurrency", type=int, nargs="+", default=None)
    p.add_argument("--num-requests", type=int, nargs="+", default=None)
    p.add_argument("--baselines", default="engine,hf,nonpaged")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-budget", type=float, default=420.0,
                   help="seconds of measuring after which remaining points are recorded as skipped")
    add_speed_arguments(p)
    add_http_arguments(p)
    args = p.parse_args(argv)
    if not 1 <= args.api_workers <= MAX_API_WORKERS:
        p.error(f"--api-workers must be >= 1 and <= {MAX_API_WORKERS}, got {args.api_workers}")
    import torch

    # Every system gets the same attention kernels: with torch 2.11 on Hopper, SDPA picks cuDNN, which plans anew
    # for every sequence length (~50 ms per step for HF `generate` at batch 1, whose key length grows each step).
    # Flash/efficient SDPA have no per-shape set-up, so the baselines are measured at their best.
    torch.backends.cuda.enable_cudnn_sdp(False)

    settings = dict(TINY if args.tiny else FULL)
    if args.concurrency is not None:
        settings["concurrency"] = args.concurrency
    if args.num_requests is not None:
        settings["num_requests"] = args.num_requests
    levels = bench_cli.requests_per_level(settings["concurrency"], settings["num_requests"])
    baselines = bench_cli.parse_baselines(args.baselines)
    only = args.models.split(",") if args.models else None
    out_dir = args.out_dir or bench_cli.RESULTS_DIR
    stem = args.stem or ("serving_tiny" if args.tiny else "serving")

    import torch

    from cs336_systems.serving.engine import EngineConfig

    if args.tiny and not torch.cuda.is_available():
        torch.set_num_threads(1)  # tiny matrices gain nothing from threads, and a busy CI core stalls OpenMP

    engine_config = EngineConfig(max_num_seqs=max(settings["concurrency"]), **speed_settings(args))
    start = time.monotonic()
    deadline = start + args.time_budget
    results = {"env": bench_cli.environment(), "models": []}
    with tempfile.TemporaryDirectory(prefix="cs336-serving-bench-") as tmp:
        for name, hf_dir, info in build_models(tmp, args.tiny, only):
            print(f"[{name}] {info['parameters'] / 1e6:.1f}M parameters, {hf_dir}", flush=True)
            results["models"].append(bench_cli.benchmark_model(
                name, hf_dir, info, concurrency=settings["concurrency"], num_requests=levels,
                prompt_len_range=settings["prompt_len_range"], output_len_range=settings["output_len_range"],
                seed=args.seed, baselines=baselines, engine_config=engine_config, http=http_settings(args),
                api_workers=args.api_workers, deadline=deadline, log=lambda msg: print(msg, flush=True),
            ))
    results["workload"] = {"seed": args.seed, "prompt_len_range": list(settings["prompt_len_range"]),
                           "output_len_range": list(settings["output_len_range"]),
                           "concurrency": settings["concurrency"],
                           "num_requests": dict(zip(settings["concurrency"], levels, strict=True)),
                           "sampling": "greedy, ignore_eos", "tiny": args.tiny,
                           "http": http_settings(args)}
    results["wall_s"] = time.monotonic() - start
    bench_cli.write_outputs(results, out_dir / f"{stem}.json", out_dir / f"{stem}.md", out_dir / f"{stem}.png")
    print(f"done in {results['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
