"""Time each FlashAttention-2 Triton kernel alone over candidate tiles at one shape (default: the
leaderboard's), with the compiler's register and spill counts, to choose the autotune lists.

    PYTHONPATH=assignment1-basics:assignment2-systems python3 assignment2-systems/benchmarks/tune_kernels.py
"""

from __future__ import annotations

import argparse
import json

import torch
import ws_kernels_v11 as ws  # this folder: run as a script
from triton.testing import do_bench

from cs336_systems.flash_attention import triton_impl as ti
from cs336_systems.flash_attention.triton_impl import (
    BackwardTensors,
    launch_dkdv,
    launch_dkdv_desc,
    launch_dq,
    launch_dq_desc,
    launch_preprocess,
)

# (BLOCK_M, BLOCK_N, warps, stages[, DIRECT[, register cap per thread]])
CANDIDATES = {
    "fwd": [(128, 64, 4, 3), (128, 64, 8, 3), (128, 64, 4, 4), (128, 64, 8, 4), (128, 32, 4, 3), (128, 128, 8, 3),
            (64, 64, 4, 3), (256, 64, 8, 3), (256, 64, 8, 2), (128, 64, 8, 2),
            (128, 64, 4, 3, None, 168), (128, 64, 4, 3, None, 128), (128, 64, 8, 3, None, 128),
            (64, 64, 4, 3, None, 128), (64, 64, 4, 4, None, 96)],
    "dq": [(64, 64, 4, 3), (64, 64, 4, 4), (64, 64, 4, 2), (64, 32, 4, 3), (64, 32, 4, 4), (128, 64, 8, 3),
           (128, 32, 4, 4), (64, 64, 8, 3), (128, 128, 8, 2),
           (64, 64, 4, 3, None, 128), (64, 64, 4, 3, None, 104), (128, 32, 4, 4, None, 168),
           (64, 32, 4, 3, None, 96)],
    # fifth entry: DIRECT (queries × keys form, K and V in shared memory) or not (keys × queries)
    "dkdv": [(64, 128, 4, 3, False), (16, 128, 4, 4, False), (64, 128, 4, 3, True), (64, 128, 4, 4, True),
             (32, 128, 4, 3, True), (32, 128, 4, 4, True), (128, 128, 8, 3, True), (128, 128, 8, 2, True),
             (64, 128, 8, 3, True), (64, 64, 4, 3, True),
             # 64-key tiles in the keys × queries form: half the K, V and dK, dV registers of 128-key tiles
             (64, 64, 4, 3, False), (32, 64, 4, 3, False), (64, 64, 4, 4, False), (128, 64, 8, 3, False),
             (64, 64, 8, 3, False), (16, 64, 4, 4, False),
             (64, 64, 4, 3, False, 168), (64, 64, 4, 3, False, 128), (32, 64, 4, 3, False, 128),
             (64, 128, 8, 3, False, 128), (16, 128, 4, 4, False, 168)],
    # the dK/dV kernel that also reduces dQ tiles through the TMA (backward mode "tma")
    "dkdv_tma": [(64, 128, 8, 3, False), (64, 128, 4, 3, False), (64, 128, 8, 3, True), (128, 128, 8, 3, True),
                 (32, 128, 4, 3, False), (64, 64, 4, 3, True), (128, 64, 8, 3, True), (64, 128, 8, 2, False),
                 (128, 128, 8, 2, True), (32, 128, 8, 3, False)],
}

# second round (v6): register caps around the first round's winners on the H200
REFINE = {
    "fwd": [(128, 64, 8, 3, None, 128), (128, 64, 8, 3, None, 112), (128, 64, 8, 3, None, 144),
            (128, 64, 8, 3, None, 96), (128, 64, 8, 4, None, 128), (128, 64, 8, 2, None, 128),
            (128, 128, 8, 3, None, 128), (256, 64, 8, 3, None, 128)],
    "dq": [(128, 32, 4, 4, None, 168), (128, 32, 4, 4, None, 184), (128, 32, 4, 4, None, 152),
           (128, 32, 4, 3, None, 168), (128, 32, 4, 5, None, 168), (128, 64, 8, 3, None, 128),
           (128, 64, 8, 2, None, 128), (64, 64, 4, 2, None, 136)],
    "dkdv": [(64, 64, 4, 3, False, 168), (64, 64, 4, 3, False, 152), (64, 64, 4, 3, False, 184),
             (64, 64, 4, 2, False, 168), (64, 64, 4, 4, False, 168), (32, 64, 4, 3, False, 152),
             (32, 64, 4, 4, False, 128), (64, 128, 8, 3, False, 152), (64, 128, 8, 2, False, 128)],
}


# v7: one exponential in n on the FMA pipe (seventh entry, EXP2_POLY = n) around the v6 winners, and
# 32-key dQ tiles that fit the 128-register cap without serialising the warpgroup products
POLY = {
    "fwd": [(128, 64, 8, 3, None, 112), (128, 64, 8, 3, None, 112, 8), (128, 64, 8, 3, None, 112, 4),
            (128, 64, 8, 3, None, 112, 2), (128, 64, 8, 3, None, 128, 4)],
    "dq": [(128, 64, 8, 3, None, 128), (128, 64, 8, 3, None, 128, 8), (128, 64, 8, 3, None, 128, 4),
           (128, 64, 8, 3, None, 128, 2), (128, 32, 8, 3, None, 128), (128, 32, 8, 3, None, 128, 4),
           (128, 32, 8, 4, None, 128)],
    "dkdv": [(64, 64, 4, 3, False, 152), (64, 64, 4, 3, False, 152, 8), (64, 64, 4, 3, False, 152, 4),
             (64, 64, 4, 3, False, 152, 2), (64, 64, 4, 3, False, 168, 4)],
}
# v7, sustained: the contenders of each list timed over 1 s windows (--rep 1000), where the GPU holds its power
# cap instead of its boost clock, to see whether energy per step reorders them
SUSTAINED = {
    "fwd": [(128, 64, 8, 3, None, 112), (128, 64, 8, 3, None, 128), (128, 64, 4, 3)],
    "dq": [(128, 64, 8, 3, None, 128), (128, 32, 4, 4, None, 168), (64, 64, 4, 2)],
    "dkdv": [(64, 64, 4, 3, False, 152), (64, 64, 4, 3, False, 168), (64, 128, 4, 3, False), (16, 128, 4, 4, False)],
}
# v8: the tensor-descriptor backward kernels (triton_kernels_desc), whose warpgroup products ptxas no longer
# serialises, beside the v7 pointer winners in the same run (sixth entry: register cap)
DESC = {
    "dq": [(128, 64, 8, 3, None, 128)],
    "dq_desc": [(128, 64, 8, 3, None, 128), (128, 64, 8, 3), (64, 64, 4, 3), (64, 64, 4, 3, None, 128),
                (128, 128, 8, 3), (128, 32, 8, 3, None, 128), (128, 64, 8, 4, None, 128), (128, 64, 8, 2, None, 128)],
    "dkdv": [(64, 64, 4, 3, False, 152)],
    "dkdv_desc": [(64, 64, 4, 3, None, 168), (64, 64, 4, 3), (64, 64, 4, 3, None, 152), (64, 64, 4, 4, None, 168),
                  (64, 64, 4, 2, None, 168), (64, 128, 8, 3), (32, 64, 4, 3, None, 128), (32, 64, 4, 4, None, 128),
                  (32, 64, 4, 3), (64, 128, 8, 2)],
}
# v8, second round: on the device's Triton 3.6 ptxas still serialises the 3-stage 64 × 64 dK/dV tile; 2 stages
# (less shared memory) did not, and 4 stages helped dQ: vary caps and stages around those two
DESC_REFINE = {
    "dq_desc": [(128, 64, 8, 4, None, 128), (128, 64, 8, 5, None, 128), (128, 64, 8, 4), (128, 64, 8, 4, None, 112),
                (64, 64, 4, 4, None, 128), (64, 64, 4, 2)],
    "dkdv_desc": [(64, 64, 4, 2, None, 168), (64, 64, 4, 2), (64, 64, 4, 2, None, 184), (64, 64, 4, 2, None, 160),
                  (64, 64, 4, 2, None, 152), (32, 64, 4, 2, None, 128), (32, 64, 4, 2), (64, 64, 8, 2),
                  (32, 32, 4, 2, None, 128)],
}
# v9: the fused descriptor backward (one dK/dV/dQ kernel, dQ tiles bulk-reduced) beside the split descriptor
# kernels' defaults; 128-key tiles halve the dQ reductions (local compiles: 32 × 128 × 8 warps 187 registers)
FUSED = {
    "dq_desc": [(128, 64, 8, 3, None, 128)],
    "dkdv_desc": [(64, 64, 4, 2, None, 168)],
    # the split dK/dV kernel's best tile ran 2.11 ms at a 168-register cap (three programs per SM) and 2.61
    # uncapped at 178 (two): 32 × 64 fused tiles fit that cap without spilling, 64 × 64 spills 128 B at it
    "dkdv_fused": [(64, 64, 4, 3), (64, 64, 4, 2), (32, 64, 4, 2, None, 168), (32, 64, 4, 3, None, 168),
                   (64, 64, 4, 2, None, 168), (64, 64, 4, 2, None, 184), (32, 128, 8, 2), (32, 128, 8, 3),
                   (16, 128, 8, 2), (64, 128, 8, 2), (32, 64, 4, 2)],
}
# v10: the dK/dV kernel's ONE_LOOP form (no products serialised at 3-4 stages under Triton 3.6, local compiles)
# beside v8's winner in its three-loop form
ONE_LOOP = {
    "dq_desc": [(128, 64, 8, 3, None, 128)],
    "dkdv_desc": [(64, 64, 4, 2, None, 168)],
    "dkdv_desc1": [(64, 64, 4, 2, None, 168), (64, 64, 4, 3, None, 168), (64, 64, 4, 4, None, 168),
                   (64, 64, 4, 3), (32, 64, 4, 3, None, 128), (32, 64, 4, 3, None, 168), (32, 64, 4, 4, None, 128)],
}
# v11: the forward and the split pair under Triton's Hopper warp specialisation (ws_kernels_v11.py: a producer
# warpgroup, two consumers of 64 rows each) beside the defaults, whose outputs they are checked against
WARP_SPECIALIZED = {
    "fwd": [(128, 64, 8, 3, None, 112)],
    "fwd_ws": ws.FWD_CONFIGS,
    "dq_desc": [(128, 64, 8, 3, None, 128)],
    "dkdv_desc": [(64, 64, 4, 2, None, 168)],
    "dq_ws": ws.DQ_CONFIGS,
    "dkdv_ws": ws.DKDV_CONFIGS,
}
ROUNDS = {"v6": CANDIDATES, "v6-refine": REFINE, "v7": POLY, "v7-sustained": SUSTAINED, "v8": DESC,
          "v8-refine": DESC_REFINE, "v9": FUSED, "v10": ONE_LOOP,
          "v11": WARP_SPECIALIZED}
KINDS = ["fwd", "dq", "dkdv", "dkdv_tma", "dq_desc", "dkdv_desc", "dkdv_desc1", "dkdv_fused", "dq_ws", "dkdv_ws",
         "fwd_ws"]


def sass_stats(compiled) -> dict[str, int]:
    """Warpgroup products, waits on them (one per product = serialised by ptxas) and MUFU.EX2 in the SASS."""
    try:
        sass = compiled.asm["sass"]
    except Exception:  # no disassembler on this machine
        return {}
    return {"hgmma": sass.count("HGMMA."), "wgmma_waits": sass.count("WARPGROUP.DEPBAR"),
            "mufu_ex2": sass.count("MUFU.EX2")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", type=int, nargs=4, default=[1, 16, 16384, 64], metavar=("B", "H", "N", "D"))
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--non-causal", action="store_true")
    p.add_argument("--kinds", nargs="+", default=["fwd", "dq", "dkdv"], choices=KINDS)
    p.add_argument("--refine", action="store_true", help="the second-round register-cap candidates")
    p.add_argument("--round", choices=list(ROUNDS), default=None, help="candidate list (default v6, or "
                   "v6-refine with --refine)")
    p.add_argument("--rep", type=int, default=200)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    b, h, n, d = args.shape
    causal = not args.non_causal
    dtype = getattr(torch, args.dtype)
    ti.set_autotune(False)
    q, k, v, do = (torch.randn(b, h, n, d, device="cuda", dtype=dtype) for _ in range(4))
    o, lse = ti.flash_forward(q, k, v, causal)
    o_ws, lse_ws = torch.empty_like(o), torch.empty_like(lse)  # the warp-specialised forward's outputs
    one = 2.0 * b * h * n * n * d * (0.5 if causal else 1.0)
    products = {"fwd": 2, "dq": 3, "dkdv": 4, "dkdv_tma": 5, "dq_desc": 3, "dkdv_desc": 4, "dkdv_desc1": 4,
                "dkdv_fused": 5, "dq_ws": 3, "dkdv_ws": 4, "fwd_ws": 2}
    rows = []
    references = {}  # by what a kernel computes: the one-loop dK/dV kernel is checked against the three-loop one
    for kind in args.kinds:
        same_as = {"dkdv_desc1": "dkdv_desc", "dkdv_ws": "dkdv_desc", "dq_ws": "dq_desc",
                   "fwd_ws": "fwd"}.get(kind, kind)
        reference = references.get(same_as)
        candidates = ROUNDS[args.round or ("v6-refine" if args.refine else "v6")]
        for cfg in candidates[kind]:
            ti.forced_configs[kind] = cfg
            t = BackwardTensors(q, k, v, o, do, lse, d)
            # D and L₂, which the (descriptor) dQ kernel would otherwise write for the dK/dV kernels
            launch_preprocess(t, zero_dq=kind == "dkdv_tma", write_l2=True)
            if kind == "dkdv_fused":  # cleared before every launch by the kernel's pre-hook
                t.dq_acc = torch.empty((b, h, n, d), dtype=torch.float32, device="cuda")
            launchers = {
                "fwd": lambda: ti.flash_forward(q, k, v, causal),
                "dq": lambda t=t: launch_dq(t, causal),
                "dkdv": lambda t=t: launch_dkdv(t, causal),
                "dkdv_tma": lambda t=t: launch_dkdv(t, causal, atomic=True, tma=True),
                "dq_desc": lambda t=t: launch_dq_desc(t, causal),
                "dkdv_desc": lambda t=t: launch_dkdv_desc(t, causal, one_loop=False),
                "dkdv_desc1": lambda t=t: launch_dkdv_desc(t, causal, one_loop=True),
                "dkdv_fused": lambda t=t: launch_dkdv_desc(t, causal, fused_dq=True),
                "dq_ws": lambda t=t, cfg=cfg: ws.launch_dq(t, causal, cfg),
                "dkdv_ws": lambda t=t, cfg=cfg: ws.launch_dkdv(t, causal, cfg),
                "fwd_ws": lambda cfg=cfg: (ws.launch_fwd(q, k, v, o_ws, lse_ws, causal, cfg), o_ws, lse_ws),
            }
            fn = launchers[kind]
            row = {"kind": kind, "cfg": cfg}
            try:
                compiled = fn()
                # the v11 kernels are launched directly: their launchers return the compiled kernel
                ws_compiled = compiled[0] if kind == "fwd_ws" else compiled
                # same outputs as the first candidate (a broken variant shows here)
                parts = {"fwd": list(compiled) if kind == "fwd" else [], "dq": [t.dq], "dkdv": [t.dk, t.dv],
                         "dkdv_tma": [t.dk, t.dv, t.dq_acc], "dq_desc": [t.dq], "dkdv_desc": [t.dk, t.dv],
                         "dkdv_desc1": [t.dk, t.dv],
                         "dkdv_fused": [t.dk, t.dv, t.dq_acc], "dq_ws": [t.dq], "dkdv_ws": [t.dk, t.dv],
                         "fwd_ws": list(compiled[1:]) if kind == "fwd_ws" else []}[kind]
                out = torch.cat([x.flatten().float() for x in parts])
                reference = out if reference is None else reference
                references.setdefault(same_as, reference)
                row["rel_err_vs_first"] = ((out - reference).norm() / reference.norm()).item()
                ms = do_bench(fn, warmup=25, rep=args.rep, return_mode="median")
                row.update(ms=ms, tflops=products[kind] * one / (ms * 1e-3) / 1e12)
                compiled = ws_compiled if kind in ("fwd_ws", "dq_ws", "dkdv_ws") else ti.last_compiled.get(kind)
                row.update(regs=getattr(compiled, "n_regs", None), spills=getattr(compiled, "n_spills", None),
                           **sass_stats(compiled))
            except Exception as e:  # out of shared memory/registers: report and go on
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:90]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
        ti.forced_configs.pop(kind, None)
    print("\nbest per kernel:")
    for kind in args.kinds:
        ok = [r for r in rows if r["kind"] == kind and "ms" in r]
        if ok:
            best = min(ok, key=lambda r: r["ms"])
            print(f"  {kind:9s} {best['cfg']} {best['ms']:.3f} ms {best['tflops']:.0f} TFLOP/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"shape": args.shape, "dtype": args.dtype, "causal": causal, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
