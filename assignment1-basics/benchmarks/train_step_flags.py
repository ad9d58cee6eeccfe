"""Issue 25 in one GPU call: the `owt-leaderboard` training step with the old settings, each throughput flag on
its own, all of them together, and HF Llama at the same shape; a table (ms/step, tokens/s, MFU against the
stated peak, peak memory) and JSON. `--profile`: torch.profiler over a few steps of chosen variants, kernel time
by category (matmul, attention, norm/activation, cross-entropy, optimizer, clipping, copies, other) and the idle
gap (wall - busy GPU time), printed and written as JSON.

Every variant runs the trainer's own step (`training.trainer._make_step`: the batch from a token array, forward,
loss, backward, clipping, optimizer), timed over windows of steps without a host sync inside a window, like the
trainer runs. The loss of step 0 (same weights, same batch) is recorded per variant as a sanity check.

    PYTHONPATH=assignment1-basics python3 assignment1-basics/benchmarks/train_step_flags.py \\
        --out $OUT/flags.json --profile --profile-out $OUT/profile.json
    PYTHONPATH=assignment1-basics python3 assignment1-basics/benchmarks/train_step_flags.py --tiny --device cpu \\
        --out /tmp/flags.json --profile --profile-out /tmp/profile.json      # smoke test, seconds
"""

import argparse
import itertools
import json
import os
import platform
import re
import socket
import statistics
import sys
import time
import traceback

import numpy as np
import torch

from cs336_basics.data import batch_at, step_batch_starts
from cs336_basics.model import TransformerLM
from cs336_basics.nn_utils import cross_entropy
from cs336_basics.optim import AdamW, clip_gradients
from cs336_basics.training.config import config_from_preset
from cs336_basics.training.distributed import Dist, Launch, wrap_model
from cs336_basics.training.gc_schedule import CollectionLog, ScheduledGC
from cs336_basics.training.metrics import peak_flops, training_flops_per_token
from cs336_basics.training.spike_guard import SpikeGuard
from cs336_basics.training.trainer import _autocast, _make_step, apply_activation_flags, build_optimizer

# Every variant starts from the flags as they were before issue 25 (the preset now turns some on), so that
# "baseline" stays the old step and each single-flag variant changes one thing.
OLD_SETTINGS = dict(loss_impl="full", compile_loss=False, adamw_impl="ours", prefetch=False,
                    compile_mode="default", residual_dtype="param", attention_layout="bhsd",
                    rope_layout="pairs", value_proj="fused")
ALL = dict(loss_impl="chunked", compile_loss=True, adamw_impl="fused", prefetch=True)
FULL_LOSS = dict(ALL, loss_impl="full")  # the flags the preset now carries
ONEPASS_BF16 = dict(ALL, loss_impl="onepass", residual_dtype="bf16")
# owt-leaderboard's flags before --loss-impl fused (the preset-fused variants add it; the preset now has it)
PRESET = dict(ONEPASS_BF16, attention_layout="bshd", rope_layout="halves")
VARIANTS: dict[str, dict] = {
    "baseline": {},  # OLD_SETTINGS: full logits + eager cross-entropy, our AdamW, no prefetch
    "compile-loss": dict(compile_loss=True),
    "chunked": dict(loss_impl="chunked"),
    "chunked+compile-loss": dict(loss_impl="chunked", compile_loss=True),
    "fused": dict(adamw_impl="fused"),
    "prefetch": dict(prefetch=True),
    "reduce-overhead": dict(compile_mode="reduce-overhead"),
    "max-autotune": dict(compile_mode="max-autotune-no-cudagraphs"),  # minutes of autotuning: opt-in
    "all": ALL,
    "all-full-loss": FULL_LOSS,
    "all-bs128": dict(ALL, batch_size=128),
    "bf16-residual": dict(FULL_LOSS, residual_dtype="bf16"),
    "all-bf16-residual": dict(ALL, residual_dtype="bf16"),
    # the cross-entropy's gradient written out as one pass over the logits (cs336_basics/onepass_ce.py)
    "onepass": dict(FULL_LOSS, loss_impl="onepass"),
    "onepass-bf16-residual": ONEPASS_BF16,
    # the attention at context 512 (cuDNN's by default: 6.6 ms of kernels a step) through other backends
    "onepass-bf16-residual-flash": dict(ONEPASS_BF16, attention_backend="sdpa-flash"),
    "onepass-bf16-residual-fa2": dict(ONEPASS_BF16, attention_backend="cs336-fa2"),
    # q, k, v and the attention output kept (batch, seq, heads, d) around SDPA: no layout copies
    "bshd": dict(FULL_LOSS, attention_layout="bshd"),
    "onepass-bf16-residual-bshd": dict(ONEPASS_BF16, attention_layout="bshd"),
    # ... with clipping's scale applied inside the fused AdamW kernel (no separate pass over the gradients)
    "onepass-bf16-residual-bshd-clip": dict(ONEPASS_BF16, attention_layout="bshd", clip_in_optimizer=True),
    # the same under CUDA graphs: the 2.2 ms of idle GPU a step that its profile shows
    "onepass-bf16-residual-bshd-graphs": dict(ONEPASS_BF16, attention_layout="bshd", compile_mode="reduce-overhead"),
    # ... and with inductor's GEMM templates tried against cuBLAS (minutes of autotuning: its own device run)
    "onepass-bf16-residual-bshd-autotune": dict(ONEPASS_BF16, attention_layout="bshd",
                                                compile_mode="max-autotune-no-cudagraphs"),
    "bf16-residual-bshd": dict(FULL_LOSS, residual_dtype="bf16", attention_layout="bshd"),
    # ... with RoPE over contiguous halves (q/k features reordered through the projection's weight rows)
    "onepass-bf16-residual-bshd-halves": dict(ONEPASS_BF16, attention_layout="bshd", rope_layout="halves"),
    "onepass-bf16-residual-bshd-halves-graphs": dict(ONEPASS_BF16, attention_layout="bshd", rope_layout="halves",
                                                     compile_mode="reduce-overhead"),
    # the same without the background batch builder (its rows' second timing window is ~2.3 ms a step slower)
    "onepass-bf16-residual-bshd-halves-no-prefetch": dict(ONEPASS_BF16, attention_layout="bshd",
                                                          rope_layout="halves", prefetch=False),
    # inductor's GEMM templates against cuBLAS (epilogues fused into them) and tuned elementwise block sizes,
    # without and with CUDA graphs: minutes of autotuning, their own device run
    "onepass-bf16-residual-bshd-halves-autotune": dict(ONEPASS_BF16, attention_layout="bshd", rope_layout="halves",
                                                       compile_mode="max-autotune-no-cudagraphs"),
    "onepass-bf16-residual-bshd-halves-autotune-graphs": dict(ONEPASS_BF16, attention_layout="bshd",
                                                              rope_layout="halves", compile_mode="max-autotune"),
    # the preset's flags (above) with the cross-entropy as one Triton pass that reads the logits once and writes
    # the gradient over them during the forward (fused_ce.py): the whole batch one chunk, or four
    "preset-fused": dict(PRESET, loss_impl="fused", loss_chunk_tokens=32768),
    "preset-fused-separate-v": dict(PRESET, loss_impl="fused", loss_chunk_tokens=32768, value_proj="separate"),
    "preset-fused-chunk8k": dict(PRESET, loss_impl="fused", loss_chunk_tokens=8192),
    # ... with Python's garbage collection on a schedule (training/gc_schedule.py), for the once-a-second stall
    "preset-fused-gc": dict(PRESET, loss_impl="fused", loss_chunk_tokens=32768, gc_interval=50),
    "preset-fused-graphs": dict(PRESET, loss_impl="fused", loss_chunk_tokens=32768, compile_mode="reduce-overhead"),
    "preset-fused-autotune-graphs": dict(PRESET, loss_impl="fused", loss_chunk_tokens=32768,
                                         compile_mode="max-autotune"),
    # twice the tokens a step (a different optimisation: the loss curve is not the preset's)
    "onepass-bf16-residual-b128": dict(ONEPASS_BF16, batch_size=128),
    "hf-llama": {},  # transformers' LlamaForCausalLM, compiled, our loss and AdamW (train_step.py's setup)
    # the trainer's data-parallel wrappers in a one-process group (world size 1): their cost against "baseline"
    "ddp": dict(parallel="ddp"),
    "fsdp": dict(parallel="fsdp"),
    "fsdp-reshard": dict(parallel="fsdp", fsdp_reshard="always"),  # each block gathered again for backward
    "fsdp-blocks": dict(parallel="fsdp", fsdp_units="block"),  # one unit per block (the default on several ranks)
}
# the acceptance rows first (before, after, HF Llama), then one flag at a time; reduce-overhead (riskiest) last
DEFAULT_VARIANTS = ("baseline,all,hf-llama,compile-loss,chunked,chunked+compile-loss,fused,prefetch,all-full-loss,"
                    "reduce-overhead")
TINY = dict(vocab_size=512, context_length=32, d_model=64, num_layers=2, num_heads=4, d_ff=128, batch_size=4,
            loss_chunk_tokens=48)

# Kernel (or CPU op) name -> category; the first match wins.
CATEGORIES = [
    ("optimizer", r"adam|multi_tensor|foreach"),
    ("clip", r"normtwo|norm_two|vector_norm"),
    ("attention", r"flash|fmha|attention|sdpa|_attn|cudnn.*mha"),
    ("cross_entropy", r"softmax|logsumexp|nll|cross_entropy|amax|maxops|max_values|gather|scatter|exp_kernel|"
                      r"log_kernel|chunk_loss|\bexp\b|\blog\b"),
    ("matmul", r"gemm|nvjet|cutlass|xmma|cublas|matmul|\bmm\b|addmm|bmm|triton_tem|splitk|wgmma|sm90_|sm80_"),
    ("copy", r"memcpy|memset|copy|\bcat\b|catarray|fill"),
    ("norm_activation", r"rsqrt|mean|pow|sigmoid|silu|rms|triton_|mul|add|sub|div|neg|cos|sin|where|\bsum\b"),
]


def categorise(name: str) -> str:
    lowered = name.lower()
    if lowered.startswith("triton_"):
        # inductor names a fused kernel by its ops joined with "_" (which \b does not split), and nearly every
        # one starts with a dtype cast "_to_copy": the ops as words, the casts and views dropped, decide
        words = " " + " ".join(lowered.split("_")) + " "
        for noise in (" to copy ", " unsafe view ", " view ", " fused ", " triton ", " poi ", " red ", " per "):
            words = words.replace(noise, " ")
        lowered = "triton_" + words  # "triton_" keeps the elementwise default for what names no op below
        if re.fullmatch(r"triton_[\s\d]*((clone|permute|transpose|cat|t|slice|select|stack|split|expand|"
                        r"unsqueeze|squeeze|new|zeros|copy)\s*)+[\s\d]*", lowered):
            return "copy"  # layout only: a transpose made contiguous, a concatenation
    for category, pattern in CATEGORIES:
        if category == "copy" and lowered.startswith("triton_"):
            continue  # arithmetic fused with a concatenation is arithmetic (layout-only kernels returned above)
        if re.search(pattern, lowered):
            return category
    return "other"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_config(args, variant: str):
    """The preset, then the old speed flags, then --tiny's shape, then --set, then the variant's own flags."""
    overrides = {**OLD_SETTINGS, **(TINY if args.tiny else {}), **args.overrides, **VARIANTS[variant]}
    if args.tiny and "batch_size" in VARIANTS[variant]:
        overrides["batch_size"] = TINY["batch_size"] * 2
    overrides.setdefault("batch_size", args.batch_size or None)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return config_from_preset(args.preset, device=str(args.device), compile=args.compile, **overrides)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_override(item: str) -> tuple[str, object]:
    """KEY=VALUE of a TrainConfig field, the value as an int, a float or else a string."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise SystemExit(f"--set wants KEY=VALUE, got {item!r}")
    for kind in (int, float):
        try:
            return key.replace("-", "_"), kind(text)
        except ValueError:
            pass
    return key.replace("-", "_"), text


class TrainerStep:
    """The trainer's step for one config (model, optimizer, compile, loss path, prefetch)."""

    def __init__(self, config, device, precision):
        torch.manual_seed(config.seed)
        self.model = TransformerLM(config.model_config(), device=device)
        apply_activation_flags(self.model, config, precision)
        dist = Dist(Launch(launched=True), config.parallel, device, 600.0)
        if config.parallel != "none":  # a one-process group, as `torchrun --nproc_per_node 1` would give
            for name, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(free_port())), ("RANK", "0"),
                                ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
                os.environ.setdefault(name, value)
            dist.start()
        wrapped = wrap_model(self.model, config.parallel, device, precision, config.compile, config.compile_mode,
                             config.fsdp_reshard, config.fsdp_units)
        self.optimizer = build_optimizer(self.model, config)
        scaler = torch.amp.GradScaler(device.type, enabled=False)
        self.step_fn = _make_step(self.model, wrapped, self.optimizer, scaler, SpikeGuard(0.0, 0), config, device,
                                  precision, dist)

    def __call__(self, tokens, index: int):
        return self.step_fn(tokens, 1e-3, index)[0]


class LlamaStep:
    """HF LlamaForCausalLM at the same shape: compiled forward, our cross-entropy, clipping and AdamW (the setup
    of train_step.py), on the same batches."""

    def __init__(self, config, device, precision):
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from train_step import build_llama

        torch.manual_seed(config.seed)
        self.model = build_llama(config.model_config(), device)
        self.config, self.device, self.precision = config, device, precision
        def forward(x):
            return self.model(input_ids=x).logits

        self.forward = torch.compile(forward) if config.compile else forward
        self.optimizer = AdamW(self.model.parameters(), lr=1e-3, weight_decay=config.weight_decay)

    def __call__(self, tokens, index: int):
        c = self.config
        starts = step_batch_starts(len(tokens), c.batch_size, c.context_length, c.seed, index)
        x, y = batch_at(tokens, starts, c.context_length, self.device)
        with _autocast(self.device, self.precision):
            loss = cross_entropy(self.forward(x), y)
        loss.backward()
        clip_gradients(self.model.parameters(), c.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


def step_end_marker(device: torch.device):
    """Something that later tells when the step just issued finished: a recorded CUDA event on a GPU (read after
    the window's sync), the host clock elsewhere (where issuing is running)."""
    if device.type == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


def step_trace(issued: list[float], ends: list, collections: list[dict]) -> dict:
    """The traced steps' durations, each from the end of the step before it to its own end (GPU events or the
    host clock; one fewer than the steps, and a window's first step also holds the sync between windows), the
    host time at which each was issued (s from the start of the timing) and the garbage collections of the run
    on the same clock."""
    if ends and not isinstance(ends[0], float):
        step_ms = [earlier.elapsed_time(later) for earlier, later in itertools.pairwise(ends)]
    else:
        step_ms = [(later - earlier) * 1e3 for earlier, later in itertools.pairwise(ends)]
    return {"step_ms": [round(ms, 4) for ms in step_ms], "issued_s": [round(t, 6) for t in issued],
            "collections": collections}


def device_spans(events) -> list[tuple[str, float, float]]:
    """(name, start, end) of each kernel and memcpy on the GPU timeline. Not the GPU-side copies of
    `record_function` ranges (`Optimizer.step#AdamW.step`, ...): they are device events too, but span the
    kernels they enclose and the idle time between them, so counted they inflate a category and the busy time."""
    return [(e.name, e.time_range.start, e.time_range.end) for e in events
            if e.device_type == torch.autograd.DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]


def call_sites(events, op: str, steps: int) -> list[dict]:
    """Where `op` was called from: its chains of enclosing events (Python frames under with_stack), with the
    input shapes, call count and CPU time per step of each distinct chain."""
    sites: dict[tuple, dict] = {}
    for e in events:
        if e.name != op:
            continue
        chain, parent = [], e.cpu_parent
        while parent is not None and len(chain) < 14:
            chain.append(parent.name[:140])
            parent = parent.cpu_parent
        key = (str(getattr(e, "input_shapes", ""))[:200], tuple(chain))
        site = sites.setdefault(key, {"shapes": key[0], "callers": chain, "count": 0, "cpu_ms_per_step": 0.0})
        site["count"] += 1
        site["cpu_ms_per_step"] += e.cpu_time_total / 1e3 / steps
    return sorted(sites.values(), key=lambda s: -s["cpu_ms_per_step"])[:8]


def kernel_profile(run_steps, steps: int, device: torch.device, stack_ops: tuple[str, ...] = ()) -> dict:
    """Kernel time by category over `steps` steps (after the variant's timing, so compiled and warm).
    `stack_ops`: CPU ops (e.g. aten::sum) whose Python call sites are recorded, to say where an eager kernel
    of the step comes from."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    synchronize(device)
    with profile(activities=activities, with_stack=bool(stack_ops), record_shapes=bool(stack_ops)) as prof:
        start = time.perf_counter()
        run_steps(steps)
        synchronize(device)
        wall_ms = (time.perf_counter() - start) * 1e3
    spans, timeline = [], device.type == "cuda"
    if device.type == "cuda":  # every GPU kernel/memcpy with its interval on the timeline
        spans = device_spans(prof.events())
    if not spans:  # CPU smoke mode (aten ops' self time) or no device timeline: totals laid end to end
        timeline, clock = False, 0.0
        for e in prof.key_averages():
            on_device = device.type == "cuda" and e.device_type == torch.autograd.DeviceType.CUDA
            total = e.self_device_time_total if on_device else e.self_cpu_time_total
            if (on_device or (device.type != "cuda" and e.key.startswith("aten::"))) and total > 0:
                spans.append((e.key, clock, clock + total))
                clock += total
    by_category: dict[str, float] = {}
    kernels: dict[str, dict[str, float]] = {}
    for name, begin, end in spans:
        category = categorise(name)
        by_category[category] = by_category.get(category, 0.0) + (end - begin) / 1e3
        kernels.setdefault(category, {})
        kernels[category][name] = kernels[category].get(name, 0.0) + (end - begin) / 1e3
    busy_ms, last_end = 0.0, -float("inf")
    for _, begin, end in sorted(spans, key=lambda s: s[1]):  # the union of the intervals
        if end > last_end:
            busy_ms += (end - max(begin, last_end)) / 1e3
            last_end = end
    categories = {k: v / steps for k, v in sorted(by_category.items(), key=lambda kv: -kv[1])}
    categories["idle_gap"] = max(wall_ms - busy_ms, 0.0) / steps
    top = {category: sorted(((round(ms / steps, 4), name[:160]) for name, ms in names.items()), reverse=True)[:12]
           for category, names in kernels.items()}
    # host side: the ops and hooks (FSDP's all-gather/reduce-scatter hooks among them) with the most self time
    cpu_top = sorted(((e.self_cpu_time_total / 1e3 / steps, e.key[:120]) for e in prof.key_averages()
                      if e.self_cpu_time_total > 0), reverse=True)[:15]
    stacks = {op: call_sites(prof.events(), op, steps) for op in stack_ops}
    return {"steps": steps, "timeline": timeline,  # False: busy is a sum of kernel times, not their union
            **({"stacks": stacks} if stack_ops else {}),
            "cpu_self_ms_per_step": sum(e.self_cpu_time_total for e in prof.key_averages()) / 1e3 / steps,
            "top_cpu_ops_ms": [(round(ms, 4), name) for ms, name in cpu_top],
            "wall_ms_per_step": wall_ms / steps, "busy_ms_per_step": busy_ms / steps,
            "categories_ms": categories, "top_kernels_ms": top}


def measure(args, variant: str, device: torch.device, precision: str, tokens, peak) -> tuple[dict, dict | None]:
    config = make_config(args, variant)
    step = LlamaStep(config, device, precision) if variant == "hf-llama" else TrainerStep(config, device, precision)
    # HF Llama's row: the FLOPs of our model of the same architecture, built on the meta device
    flops_model = TransformerLM(config.model_config(), device="meta") if variant == "hf-llama" else step.model
    flops_per_token = training_flops_per_token(flops_model)
    index = 0
    compile_start = time.perf_counter()
    first_loss = float(step(tokens, index))  # includes compilation
    index += 1
    compile_s = time.perf_counter() - compile_start
    window_ms = []
    # --trace-steps: when each step was issued (host) and ended (GPU events, no sync inside a window), and every
    # garbage collection in between, to line a slow window's stall up with what the host did
    issued, ends = [], []
    # the garbage-collection schedule as the trainer's loop runs it
    with ScheduledGC(config.gc_interval) as collector, CollectionLog() as collections:
        for _ in range(args.warmup):
            step(tokens, index)
            index += 1
            collector.step(index)
        synchronize(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(args.windows):
            synchronize(device)
            start = time.perf_counter()
            for _ in range(args.steps):
                if args.trace_steps:
                    issued.append(time.perf_counter() - collections.origin)
                loss = step(tokens, index)
                index += 1
                collector.step(index)
                if args.trace_steps:
                    ends.append(step_end_marker(device))
            synchronize(device)
            window_ms.append((time.perf_counter() - start) * 1e3 / args.steps)
    ms = statistics.median(window_ms)
    trace = step_trace(issued, ends, collections.events) if args.trace_steps else None
    if trace is not None:  # the trace's clock origin on the wall clock, to line it up with a GPU clock log
        trace["origin_unix"] = collections.origin_unix
    tokens_per_step = config.batch_size * config.context_length
    row = {"variant": variant, "flags": VARIANTS[variant], "batch_size": config.batch_size,
           "ms_per_step": ms, "window_ms": window_ms, "tokens_per_s": tokens_per_step / ms * 1e3,
           "mfu": tokens_per_step / ms * 1e3 * flops_per_token / peak if peak else None,
           "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None,
           "first_step_loss": first_loss, "last_loss": float(loss), "first_step_s": compile_s,
           "flops_per_token": flops_per_token, **({"trace": trace} if trace else {})}
    profile = None
    if args.profile and variant in args.profile_variants:
        def run_steps(n):
            nonlocal index
            for _ in range(n):
                step(tokens, index)
                index += 1
        stack_ops = tuple(filter(None, args.profile_stacks.split(",")))
        profile = {"variant": variant, **kernel_profile(run_steps, args.profile_steps, device, stack_ops)}
    return row, profile


def print_table(rows, peak, device_name):
    peak_text = f"{peak / 1e12:.0f} TFLOP/s dense bf16" if peak else "unknown peak"
    print(f"\n{device_name}; MFU against {peak_text}")
    print("| variant | batch | ms/step | tokens/s | MFU | peak mem GB | step-0 loss | first step s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['variant']} | | error: {r['error'][:80]} | | | | | |")
            continue
        mfu = f"{r['mfu']:.1%}" if r["mfu"] else "-"
        mem = f"{r['peak_memory_gb']:.1f}" if r["peak_memory_gb"] is not None else "-"
        print(f"| {r['variant']} | {r['batch_size']} | {r['ms_per_step']:.2f} | {r['tokens_per_s']:,.0f} | {mfu} | "
              f"{mem} | {r['first_step_loss']:.4f} | {r['first_step_s']:.1f} |")


def print_profile(profile):
    print(f"\nprofile of {profile['variant']}: {profile['wall_ms_per_step']:.2f} ms/step wall, "
          f"{profile['busy_ms_per_step']:.2f} ms busy")
    for category, ms in profile["categories_ms"].items():
        print(f"  {category:16s} {ms:8.2f} ms  {ms / profile['wall_ms_per_step']:6.1%}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="owt-leaderboard")
    parser.add_argument("--batch-size", type=int, default=0, help="0: the preset's")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field of every variant (e.g. d_model=768 num_layers=12)")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma-separated of {', '.join(VARIANTS)}")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="default: on for CUDA (the preset's setting), off on CPU")
    parser.add_argument("--tiny", action="store_true", help="a tiny model (CPU smoke test)")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="auto: bf16 on CUDA, fp32 elsewhere (the bf16-residual variants need bf16)")
    parser.add_argument("--steps", type=int, default=10, help="steps per timing window")
    parser.add_argument("--windows", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3, help="steps after the first (compiling) one")
    parser.add_argument("--tokens", type=int, default=50_000_000, help="random token ids in the array sampled")
    parser.add_argument("--peak-flops", type=float, default=0.0, help="0: look up by device name")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--profile-variants", default="baseline,all")
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--profile-stacks", default="", metavar="OP[,OP]",
                        help="CPU ops (e.g. aten::sum) whose Python call sites and shapes the profile records")
    parser.add_argument("--profile-out", default=None)
    parser.add_argument("--trace-steps", action="store_true",
                        help="record each timed step's duration (CUDA events), when it was issued, and every "
                             "garbage collection of the timing, in the row's 'trace'")
    parser.add_argument("--time-budget-s", type=float, default=420.0,
                        help="variants not started by then are skipped (recorded as such); 0: no limit")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    started = time.perf_counter()
    args.device = torch.device(args.device)
    if args.compile is None:
        args.compile = args.device.type == "cuda"
    args.profile_variants = set(args.profile_variants.split(","))
    args.overrides = dict(parse_override(item) for item in args.set)
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    device = args.device
    precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    base = make_config(args, "baseline")
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, base.vocab_size, size=min(args.tokens, 200_000) if args.tiny else args.tokens,
                          dtype=np.uint16)
    peak = args.peak_flops or peak_flops(device, precision, True)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    rows, profiles = [], []
    for variant in variants:
        if args.time_budget_s and time.perf_counter() - started > args.time_budget_s:
            rows.append({"variant": variant, "flags": VARIANTS[variant], "error": "skipped: --time-budget-s"})
            continue
        try:
            row, profile = measure(args, variant, device, precision, tokens, peak)
        except Exception as e:  # one failing variant (e.g. CUDA graphs) must not cost the others
            traceback.print_exc()
            row, profile = {"variant": variant, "flags": VARIANTS[variant], "error": f"{type(e).__name__}: {e}"}, None
        rows.append(row)
        if "error" not in row:
            print(f"{variant:22s} {row['ms_per_step']:8.2f} ms/step  MFU {row['mfu'] or 0:6.1%}  "
                  f"loss0 {row['first_step_loss']:.4f}  first step {row['first_step_s']:.1f} s", flush=True)
        if profile:
            profiles.append(profile)
            print_profile(profile)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print_table(rows, peak, device_name)
    result = {"preset": args.preset, "tiny": args.tiny, "device": device_name, "torch": torch.__version__,
              "python": platform.python_version(), "peak_flops": peak, "compile": args.compile,
              "steps_per_window": args.steps, "windows": args.windows, "rows": rows}
    baseline = next((r for r in rows if r["variant"] == "baseline" and "error" not in r), None)
    if baseline:
        for r in rows:
            if "error" not in r:
                r["speedup_vs_baseline"] = baseline["ms_per_step"] / r["ms_per_step"] \
                    * r["batch_size"] / baseline["batch_size"]
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    if args.profile_out:
        with open(args.profile_out, "w") as f:
            json.dump({"device": device_name, "torch": torch.__version__, "profiles": profiles}, f, indent=2)


if __name__ == "__main__":
    main()
