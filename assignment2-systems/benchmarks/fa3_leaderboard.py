"""Issue 24 timing at the leaderboard shape (batch 1, 16 heads, 16384 tokens, d 64, bf16, causal), in one run.

The Hopper Gluon forward with the Gluon dK/dV backward and with our Triton backward, beside our Triton
FlashAttention-2, SDPA cuDNN and SDPA flash:

    PYTHONPATH=assignment1-basics:assignment2-systems python3 assignment2-systems/benchmarks/fa3_leaderboard.py \
        --out $OUT/fa3_leaderboard.json

First checks each Gluon forward config (v1's and the warp-specialised fa3-v4's) against SDPA at that shape and
times it forward-only, then checks the Gluon backward's gradients against cuDNN's, then times fwd / bwd /
fwd+bwd of each implementation with do_bench (L2 flushed, median of its calls; the backward as
torch.autograd.grad on a retained graph), in `--rounds` rounds whose order rotates, and prints the mean over the
rounds beside cuDNN's. Writes one JSON with every number (each round's too), the backward path each fa3 row took,
and the device.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention as sdpa

from cs336_systems.benchmarking.attention import time_passes
from cs336_systems.benchmarking.common import round_robin
from cs336_systems.flash_attention import FlashAttentionTriton, hopper_impl, triton_impl
from cs336_systems.flash_attention.hopper_impl import FlashAttentionHopper

# d 64 with 64-key tiles in 3 or 2 stages: 128 / 107 registers and 98 / 82 KB of shared memory (causal,
# compile_check_hopper), so two programs fit on one SM, whose warps can then overlap each other's products
GLUON_CONFIGS = {64: [(64, 4, True), (64, 3, True), (64, 2, True), (128, 3, True), (128, 4, True), (128, 3, False),
                      (64, 4, False)],
                 128: [(64, 3, True), (64, 3, False), (128, 2, True), (128, 2, False)]}

# the warp-specialised forward (fa3-v4, `hopper_impl.hopper_forward_ws`): (key tile, stages, ping-pong); ping-pong
# = two 4-warp consumer partitions of 64 rows each, else one 8-warp consumer; a 1-warp TMA producer in both
GLUON_WS_CONFIGS = {64: [(64, 4, True), (128, 3, True), (128, 2, True), (64, 4, False)],
                    128: [(64, 3, True), (128, 2, True)]}
# name in the JSON -> forward launcher taking (q, k, v, causal, config=...)
SWEEPS = {"v1": ("hopper_forward", GLUON_CONFIGS), "ws": ("hopper_forward_ws", GLUON_WS_CONFIGS)}


def bench(fn, rep_ms: int) -> float:
    """Median ms (an occasional slow call, e.g. a host hiccup, moves a mean but not this)."""
    return triton.testing.do_bench(fn, warmup=100, rep=rep_ms, return_mode="median")


def fwd_bwd_times(attn, q, k, v, do, causal: bool, rep_ms: int) -> dict[str, float]:
    """Milliseconds of the forward, the backward alone and both (the attention benchmark's `time_passes`)."""
    times = time_passes(lambda a, b, c, _causal: attn(a, b, c), q, k, v, do, causal, warmup=100, rep=rep_ms)
    return {f"{name}_ms": ms for name, ms in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=16384)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--no-causal", action="store_true")
    parser.add_argument("--rep-ms", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3, help="timing rounds, the order rotated between them")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--only", type=re.compile, metavar="REGEX",
                        help="time only the rows whose name matches (cuDNN's is always kept) and skip the Gluon "
                             "forward sweep and the fused / one-loop checks")
    args = parser.parse_args()
    if args.rounds < 1 or args.rep_ms < 1:
        parser.error("--rounds and --rep-ms must be >= 1")
    causal = not args.no_causal
    dev = torch.device("cuda")
    result: dict = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__,
                    "triton": triton.__version__, "shape": [1, args.heads, args.seq, args.head_dim],
                    "causal": causal, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    gen = torch.Generator(device="cpu").manual_seed(0)
    shape = (1, args.heads, args.seq, args.head_dim)
    q, k, v, do = (torch.randn(shape, generator=gen).to(dev, torch.bfloat16) for _ in range(4))
    for x in (q, k, v):
        x.requires_grad_()

    # correctness at this shape first: a fast wrong kernel is worth nothing
    with torch.no_grad():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            o_ref = sdpa(q, k, v, is_causal=causal)
        o_ref32 = o_ref.float()
        # keys: "(key tile, stages, P in smem)" for the v1 forward, "ws (key tile, stages, ping-pong)" for fa3-v4
        check, sweep = {}, []
        for kernel, (launcher, configs) in SWEEPS.items():
            for cfg in configs[args.head_dim] if args.only is None else []:
                name = str(cfg) if kernel == "v1" else f"{kernel} {cfg}"
                sweep.append((name, getattr(hopper_impl, launcher), cfg))
        # each config checked then timed forward-only, printed as it goes: a config that hangs or fails (the ws
        # kernel had not run on a GPU when this was written) leaves the earlier lines in the log
        result["check"], result["gluon_fwd_ms"] = check, {}
        for name, fwd, cfg in sweep:
            o, lse = fwd(q, k, v, causal, config=cfg)
            err = ((o.float() - o_ref32).norm() / o_ref32.norm()).item()
            check[name] = {"o_rel_err_vs_cudnn": err, "finite": bool(torch.isfinite(o).all() and
                                                                      torch.isfinite(lse).all())}
            result["gluon_fwd_ms"][name] = bench(lambda f=fwd, c=cfg: f(q, k, v, causal, config=c), args.rep_ms)
            print(name, json.dumps(check[name]), f"fwd {result['gluon_fwd_ms'][name]:.3f} ms", flush=True)

    # the Gluon dK/dV backward's gradients at this shape against cuDNN's, before any timing
    def grads(attn):
        return torch.autograd.grad(attn(q, k, v), (q, k, v), do)

    fa3 = lambda a, b, c: FlashAttentionHopper.apply(a, b, c, causal)

    def with_setting(setting: str, setter, value, fn):  # one hopper_impl setting changed for the call fn()
        previous = hopper_impl._settings[setting]
        setter(value)
        try:
            return fn()
        finally:
            setter(previous)

    def fa3_ws(a, b, c):  # the warp-specialised forward (fa3-v4) for this call only
        return with_setting("forward", hopper_impl.set_forward_kernel, "ws", lambda: fa3(a, b, c))
    ref = grads(lambda a, b, c: _sdpa(SDPBackend.CUDNN_ATTENTION, a, b, c, causal))

    def rel_errors(got) -> dict[str, float]:
        return {f"{n}_rel_err_vs_cudnn": ((g.float() - r.float()).norm() / r.float().norm()).item()
                for n, g, r in zip(("dq", "dk", "dv"), got, ref, strict=True)}

    ours = rel_errors(grads(fa3))  # before reading the path that backward took
    result["bwd_check"] = {"path": hopper_impl.last_path["backward"] or "gluon dK/dV", **ours}
    print(json.dumps(result["bwd_check"]), flush=True)

    def with_backward_kernel(name: str, fn):  # one Gluon dK/dV kernel for this call (forward and backward)
        return with_setting("backward_kernel", hopper_impl.set_backward_kernel, name, fn)

    def with_dq_kernel(name: str, fn):  # one dQ kernel in front of the Gluon dK/dV kernel, for this call
        return with_setting("dq_kernel", hopper_impl.set_dq_kernel, name, fn)

    def fa3_triton_fwd(a, b, c):  # the Triton forward in front of the Gluon backward, for this call only
        return with_setting("forward", hopper_impl.set_forward_kernel, "triton", lambda: fa3(a, b, c))

    def pipelined_grads(dq: str, dkdv: str):  # the Gluon backward on, with these kernels, for one backward
        return with_setting("backward", hopper_impl.set_backward_enabled, True, lambda: with_dq_kernel(
            dq, lambda: with_backward_kernel(dkdv, lambda: grads(fa3_triton_fwd))))
    # each check only where --only keeps a row of its kernels (a kernel that hangs on its first GPU run then
    # takes only its own call down)
    checks = {"v5_bwd_check": ("triton", "v5", "cs336-fa3 (triton fwd + gluon v5 dK/dV)"),
              "v6_bwd_check": ("triton", "v6", "cs336-fa3 (triton fwd + gluon v6 dK/dV)"),
              "gluon_dq_check": ("gluon", "v5", "cs336-fa3 (triton fwd + gluon dQ + gluon v5 dK/dV)")}
    for key, (dq, dkdv, row) in checks.items():
        if args.only is not None and not args.only.search(row):
            continue
        result[key] = {**rel_errors(pipelined_grads(dq, dkdv)), "dq_kernel": hopper_impl.last_path["dq_kernel"],
                       "dkdv_kernel": hopper_impl.last_path["backward_kernel"]}
        print(key, json.dumps(result[key]), flush=True)
    fa2 = lambda a, b, c: FlashAttentionTriton.apply(a, b, c, causal)
    triton_mode = triton_impl._settings["backward"]
    one_loop_default = triton_impl._settings["dkdv_one_loop"]

    def fa2_grads_with(setter, value, default):  # one Triton setting changed for this call only
        setter(value)
        try:
            return grads(fa2)
        finally:
            setter(default)

    # the fused Triton backward (one dK/dV/dQ kernel, dQ bulk-reduced) and the split backward with the dK/dV
    # kernel's one-loop form (v10) against cuDNN too, before any timing
    if args.only is None:
        result["fused_bwd_check"] = rel_errors(fa2_grads_with(triton_impl.set_backward_mode, "fused", triton_mode))
        print("fused triton backward", json.dumps(result["fused_bwd_check"]), flush=True)
        result["one_loop_bwd_check"] = rel_errors(fa2_grads_with(triton_impl.set_dkdv_one_loop, True,
                                                                 one_loop_default))
        print("one-loop triton backward", json.dumps(result["one_loop_bwd_check"]), flush=True)

    # name -> (attention, Gluon dK/dV backward on?, Triton backward mode); read when the backward runs
    impls = {
        "cs336-fa3 (gluon fwd + gluon dK/dV)": (fa3, True, None),
        "cs336-fa3 (triton fwd + gluon v5 dK/dV)": (fa3_triton_fwd, True, None),
        "cs336-fa3 (triton fwd + gluon v5 dK/dV, 4 stages)": (fa3_triton_fwd, True, None),
        "cs336-fa3 (triton fwd + gluon v6 dK/dV)": (fa3_triton_fwd, True, None),
        "cs336-fa3 (triton fwd + gluon v6 dK/dV, 4 stages)": (fa3_triton_fwd, True, None),
        "cs336-fa3 (triton fwd + gluon dQ + gluon v5 dK/dV)": (fa3_triton_fwd, True, None),
        "cs336-fa3 (triton fwd + gluon dQ + gluon v6 dK/dV)": (fa3_triton_fwd, True, None),
        "cs336-fa3 (gluon fwd + gluon v5 dK/dV)": (fa3, True, None),
        "cs336-fa3 (gluon fwd + triton bwd)": (fa3, False, None),
        "cs336-fa3 (gluon fwd + fused triton bwd)": (fa3, False, "fused"),
        "cs336-fa3 (gluon ws fwd + triton bwd)": (fa3_ws, False, None),
        "cs336-fa2 (triton)": (fa2, None, None),
        "cs336-fa2 (triton, fused bwd)": (fa2, None, "fused"),
        "cs336-fa3 (gluon fwd + one-loop triton bwd)": (fa3, False, None),
        "cs336-fa2 (triton, one-loop bwd)": (fa2, None, None),
        "cs336-fa2 (triton, pipelined gluon bwd)": (fa2, None, "pipelined"),
        "sdpa cudnn": (lambda a, b, c: _sdpa(SDPBackend.CUDNN_ATTENTION, a, b, c, causal), None, None),
        "sdpa flash": (lambda a, b, c: _sdpa(SDPBackend.FLASH_ATTENTION, a, b, c, causal), None, None),
    }
    # the course leaderboard's own step: torch.compile(FlashAttentionTriton.apply) on 3-D (heads, seq, d) inputs,
    # o.sum().backward(); forward+backward only
    harness = {"course harness, compiled (split bwd)": "split", "course harness, compiled (fused bwd)": "fused",
               "course harness, compiled (one-loop split bwd)": "split",
               "course harness, compiled (pipelined gluon bwd)": "pipelined"}
    # rows whose split backward runs the dK/dV kernel's one-loop form (`triton_impl.set_dkdv_one_loop`)
    one_loop_rows = {name for name in (*impls, *harness) if "one-loop" in name}
    q3, k3, v3 = (x.detach().reshape(args.heads, args.seq, args.head_dim).requires_grad_() for x in (q, k, v))
    compiled_fa2 = torch.compile(FlashAttentionTriton.apply)

    def harness_step():
        compiled_fa2(q3, k3, v3, causal).sum().backward()

    impls.update({name: (None, None, mode) for name, mode in harness.items()})
    if args.only is not None:
        impls = {name: row for name, row in impls.items() if args.only.search(name) or name == "sdpa cudnn"}
        harness = {name: mode for name, mode in harness.items() if name in impls}
    result["backward_paths"] = {}
    backward_default = hopper_impl._settings["backward"]

    pipelined_configs = (dict(hopper_impl.BWD5_CONFIGS), dict(hopper_impl.BWD6_CONFIGS))

    def measure(name: str) -> dict[str, float]:
        triton_impl.set_dkdv_one_loop(name in one_loop_rows)
        if "4 stages" in name:  # the pipelined kernels' ring one stage deeper (v5: 115 KB, still two programs/SM)
            for configs in (hopper_impl.BWD5_CONFIGS, hopper_impl.BWD6_CONFIGS):
                configs.update({d: (*cfg[:2], 4) for d, cfg in configs.items()})
        kernel = next((k for k in ("v6", "v5") if k in name), "v2")
        try:
            return with_dq_kernel("gluon" if "gluon dQ" in name else "triton",
                                  lambda: with_backward_kernel(kernel, lambda: measure_row(name)))
        finally:
            triton_impl.set_dkdv_one_loop(one_loop_default)
            hopper_impl.BWD5_CONFIGS.update(pipelined_configs[0])
            hopper_impl.BWD6_CONFIGS.update(pipelined_configs[1])

    def measure_row(name: str) -> dict[str, float]:
        attn, gluon_bwd, mode = impls[name]
        if name in harness:
            triton_impl.set_backward_mode(mode)
            try:
                times = {"fwd_bwd_ms": bench(harness_step, args.rep_ms)}
            except Exception as e:  # torch.compile of a backward that launches Gluon kernels had never run
                result.setdefault("errors", {})[name] = f"{type(e).__name__}: {str(e)[-1000:]}"
                times = {"fwd_bwd_ms": float("nan")}
            finally:
                triton_impl.set_backward_mode(triton_mode)
            print(name, json.dumps(times), flush=True)
            return times
        if gluon_bwd is not None:
            hopper_impl.set_backward_enabled(gluon_bwd)
        if mode is not None:
            triton_impl.set_backward_mode(mode)
        try:
            times = fwd_bwd_times(attn, q, k, v, do, causal, args.rep_ms)
        finally:
            triton_impl.set_backward_mode(triton_mode)
        if gluon_bwd is not None:
            result["backward_paths"][name] = (hopper_impl.last_path["backward"]
                                              or f"gluon dK/dV {hopper_impl.last_path['backward_kernel']}")
            hopper_impl.set_backward_enabled(backward_default)
        print(name, json.dumps(times), flush=True)
        return times

    # the clock falls under sustained load (NOTES.md, v7): every implementation timed once per round, the
    # order rotated between rounds, the mean over rounds reported
    result["timings"], result["round_orders"], result["timing_rounds"] = round_robin(list(impls), args.rounds,
                                                                                     measure)
    result["fa3_path"] = hopper_impl.last_path["forward"] or "gluon"
    # the tile configs the autotuner chose for the Triton backward kernels at this shape
    result["triton_bwd_configs"] = {str(key): str(getattr(kernel, "best_config", None))
                                    for key, kernel in triton_impl._tuned_cache.items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    cudnn = result["timings"]["sdpa cudnn"]["fwd_bwd_ms"]
    print(f"\nmean of {args.rounds} rounds (do_bench medians), {result['device']}:")
    print("| implementation | fwd ms | bwd ms | fwd+bwd ms | fwd+bwd range over rounds | ÷ cuDNN |")
    print("|---|---:|---:|---:|---:|---:|")
    def cell(t: dict, key: str) -> str:  # the harness rows time forward+backward only
        return f"{t[key]:.3f}" if key in t else "—"

    for name, t in result["timings"].items():
        runs = [run["fwd_bwd_ms"] for run in result["timing_rounds"][name]]
        print(f"| {name} | {cell(t, 'fwd_ms')} | {cell(t, 'bwd_ms')} | {t['fwd_bwd_ms']:.3f} | "
              f"{min(runs):.3f}–{max(runs):.3f} | {t['fwd_bwd_ms'] / cudnn:.3f} |")


def _sdpa(backend, q, k, v, causal):
    with sdpa_kernel(backend):
        return sdpa(q, k, v, is_causal=causal)


if __name__ == "__main__":
    main()
