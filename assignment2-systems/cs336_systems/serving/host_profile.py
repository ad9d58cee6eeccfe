"""Host (CPU) work per decode window of `LLMEngine`, with a tiny random model on the CPU.

    python -m cs336_systems.serving.host_profile                 # 64 sequences, HF byte-level BPE tokenizer
    python -m cs336_systems.serving.host_profile --per-token     # the per-step text path, for an A/B
    python -m cs336_systems.serving.host_profile --stop-strings  # every request has a (never met) stop string
    python -m cs336_systems.serving.host_profile --cprofile 25   # plus the top 25 functions by own time
    python -m cs336_systems.serving.host_profile --async-scheduling  # the engine's asynchronous scheduling
    python -m cs336_systems.serving.host_profile --prefill       # host side of one prefill pass (see below)

Every request decodes `--max-tokens` tokens (ignore_eos), so the decode windows are full batches. Each decode
window's wall time is split into the model runner's `decode` (here the CPU forward of the tiny model, on a
GPU the device work plus its launches) and everything else the engine does around it: scheduling, reading
the tokens, stop checks, detokenization, outputs. That second part is the "host ms per window" this script
reports (per window and per decode step), the median over `--repeats` runs after one warm-up run.

`--async-scheduling` measures the engine's asynchronous path (the next window is launched before the host
reads the current one), its host work per window counted the same way (everything but the runner's `launch`
and `collect`): what it adds or saves in host work, not what it hides. On a CPU the forward runs inside
`launch`, so nothing overlaps; on a GPU `launch` returns once the window is queued, and the host work of
window k then runs while window k + 1 computes.

`--prefill` times the runner's prefill pass instead, for the benchmark's 12-layer Llama shape (12 heads, bf16,
RMSNorm eps 1e-6; llama-125m in benchmarks/serving.py) at tiny widths (`--prefill-d-model`, d_ff 2·d_model) and
short prompts (`--prefill-lengths`), so that the wall time is the host's: top-level aten calls per pass
(torch.profiler, by op name with `--top`), and host ms per pass (median of `--prefill-passes`), for the engine's
prefill (`PrefillForward`) and for the model's own forward through the paged cache, side by side.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time


def build_served(tokenizer: str, vocab_size: int, seed: int):
    import torch

    from cs336_basics.model import TransformerConfig, TransformerLM
    from cs336_systems.serving.loader import ByteTokenizer, HFTokenizer, ServedModel

    if tokenizer == "hf":
        from transformers import AutoTokenizer

        from cs336_systems.serving.bench_models import write_tokenizer

        folder = tempfile.mkdtemp(prefix="cs336-host-profile-")
        eos = write_tokenizer(folder, vocab_size, 2048)
        tok = HFTokenizer(AutoTokenizer.from_pretrained(folder, local_files_only=True))
    else:
        vocab_size, eos, tok = 257, 256, ByteTokenizer()
    torch.manual_seed(seed)
    config = TransformerConfig(vocab_size=vocab_size, context_length=512, d_model=32, num_layers=1, num_heads=2,
                               d_ff=64)
    return ServedModel(TransformerLM(config).eval(), tok, f"tiny-{tokenizer}", eos_token_ids=[eos])


class Timer:
    """Wraps a bound method: calls and seconds spent inside it."""

    def __init__(self, fn):
        self.fn, self.calls, self.seconds = fn, 0, 0.0

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start
            self.calls += 1


def run_once(served, args, profiler=None) -> dict:
    from cs336_systems.serving.engine import EngineConfig, LLMEngine
    from cs336_systems.serving.params import SamplingParams

    engine = LLMEngine(served, EngineConfig(device="cpu", max_num_seqs=args.num_seqs,
                                            decode_steps=args.decode_steps, prefill_delay_steps=0,
                                            seed=args.seed, async_scheduling=args.async_scheduling))
    if args.per_token:
        engine.window_text = False
    runner = engine.runner
    # Both schedules launch and collect every decode window through the runner.
    launch = runner.launch = Timer(runner.launch)
    collect = runner.collect = Timer(runner.collect)
    schedule = engine.scheduler.schedule = Timer(engine.scheduler.schedule)
    ahead = engine.scheduler.schedule_ahead = Timer(engine.scheduler.schedule_ahead)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, ignore_eos=True,
                            stop=["\x00never\x00"] if args.stop_strings else [])
    prompts = [[(7 * i + j) % 200 + 32 for j in range(args.prompt_len)] for i in range(args.num_seqs)]
    if profiler is not None:
        profiler.enable()
    outputs = engine.generate(prompts, params)
    if profiler is not None:
        profiler.disable()
    windows, seconds, _ = engine.step_totals["decode"]
    # schedule() also planned the one prefill: negligible next to the windows
    decode_schedule = schedule.seconds + ahead.seconds
    host = seconds - launch.seconds - collect.seconds
    return {
        "windows": int(windows),
        "host_ms_per_window": 1e3 * host / windows,
        "host_ms_per_step": 1e3 * host / windows / args.decode_steps,
        "schedule_ms_per_window": 1e3 * decode_schedule / windows,
        "runner_ms_per_window": 1e3 * (launch.seconds + collect.seconds) / windows,
        "tokens": sum(len(o.outputs[0].token_ids) for o in outputs),
    }


def prefill_profile(args) -> dict:
    """Aten calls and host ms per prefill pass, the engine's prefill and the model's own forward."""
    import collections

    import torch
    from torch.profiler import ProfilerActivity, profile

    from cs336_basics.model import TransformerConfig, TransformerLM
    from cs336_systems.serving.model_runner import ModelRunner

    lengths = [int(n) for n in args.prefill_lengths.split(",")]
    block = 16
    slots, next_block = [], 1
    for n in lengths:
        blocks = list(range(next_block, next_block + -(-n // block)))
        next_block += len(blocks)
        slots.append([blocks[t // block] * block + t % block for t in range(n)])
    prompts = [[(7 * i + j) % 250 for j in range(n)] for i, n in enumerate(lengths)]
    result = {"lengths": lengths}
    for name, fast in (("model_forward", False), ("engine_prefill", True)):
        torch.manual_seed(args.seed)
        d = args.prefill_d_model
        config = TransformerConfig(vocab_size=256, context_length=1024, d_model=d, num_layers=12, num_heads=12,
                                   d_ff=2 * d, rmsnorm_eps=1e-6)
        model = TransformerLM(config).to(getattr(torch, args.prefill_dtype)).eval()
        runner = ModelRunner(model, next_block + 1, block, 64, cuda_graphs=False, fast_prefill=fast)
        for _ in range(5):
            runner.prefill(prompts, slots)
        times = []
        for _ in range(args.prefill_passes):
            start = time.perf_counter()
            runner.prefill(prompts, slots)
            times.append(time.perf_counter() - start)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            runner.prefill(prompts, slots)
        top = collections.Counter()
        for event in prof.events():
            parent = event.cpu_parent
            while parent is not None and not parent.name.startswith("aten::"):
                parent = parent.cpu_parent
            if event.name.startswith("aten::") and parent is None:
                top[event.name] += 1
        result[name] = {"aten_calls": sum(top.values()), "casts": top["aten::to"] + top["aten::_to_copy"],
                        "host_ms": 1e3 * statistics.median(times), "by_op": dict(top.most_common(args.top))}
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-seqs", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--decode-steps", type=int, default=4)
    p.add_argument("--temperature", type=float, default=1.0,
                   help="1.0 (default): random bytes, the worst case for multi-byte characters; 0: greedy")
    p.add_argument("--tokenizer", choices=("hf", "byte"), default="hf",
                   help="hf: a synthetic byte-level BPE behind tokenizers' Rust decode_batch (the benchmark's); "
                        "byte: cs336_basics' Python tokenizer over 256 bytes")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--per-token", action="store_true", help="the per-step text path for every sequence")
    p.add_argument("--stop-strings", action="store_true", help="every request has a stop string (never met)")
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=False,
                   help="the engine's asynchronous scheduling (next window launched before reading this one; "
                        "off here by default: the synchronous path's host work is what this profiles)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: steadier timings)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cprofile", type=int, default=0, metavar="N",
                   help="one more run under cProfile; print its top N functions by own time")
    p.add_argument("--json", action="store_true", help="one JSON line instead of the table")
    p.add_argument("--prefill", action="store_true", help="aten calls and host ms per prefill pass instead")
    p.add_argument("--prefill-lengths", default="5,12,3", help="the pass's prompt lengths (default: 3 short ones)")
    p.add_argument("--prefill-d-model", type=int, default=24, help="width (12 heads, d_ff 2x): near-free matrices")
    p.add_argument("--prefill-dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--prefill-passes", type=int, default=50)
    p.add_argument("--top", type=int, default=12, help="--prefill: the most frequent aten ops to list")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    if args.prefill:
        result = prefill_profile(args)
        if args.json:
            print(json.dumps(result))
            return 0
        print(f"prefill pass, 12-layer Llama shape, d_model {args.prefill_d_model}, {args.prefill_dtype}, "
              f"prompts {result['lengths']}; host ms median of {args.prefill_passes}")
        for name in ("model_forward", "engine_prefill"):
            r = result[name]
            print(f"  {name:15s} aten calls {r['aten_calls']:4d} (casts {r['casts']:3d})  host ms {r['host_ms']:.2f}")
            print("    " + ", ".join(f"{op.removeprefix('aten::')} {n}" for op, n in r["by_op"].items()))
        return 0
    served = build_served(args.tokenizer, args.vocab_size, args.seed)
    run_once(served, args)  # warm-up
    runs = [run_once(served, args) for _ in range(args.repeats)]
    summary = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    summary["host_ms_per_window_runs"] = [round(r["host_ms_per_window"], 3) for r in runs]
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"{args.num_seqs} sequences x {args.max_tokens} tokens, decode_steps {args.decode_steps}, "
              f"tokenizer {args.tokenizer}, {'per-token' if args.per_token else 'window'} text path"
              f"{', stop strings' if args.stop_strings else ''}"
              f"{', async scheduling' if args.async_scheduling else ''}"
              f"; median of {args.repeats}")
        for key in ("windows", "host_ms_per_window", "host_ms_per_step", "schedule_ms_per_window",
                    "runner_ms_per_window"):
            print(f"  {key:24s} {summary[key]:.3f}")
        print(f"  runs (host ms/window)    {summary['host_ms_per_window_runs']}")
    if args.cprofile:
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        run_once(served, args, profiler)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(args.cprofile)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
