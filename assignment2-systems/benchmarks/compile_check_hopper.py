"""Compile every Hopper (Gluon) FlashAttention kernel variant for sm_90a without a GPU and report what the
machine code says about overlap: registers, spills, shared memory, wgmma count in the PTX, the
`wgmma.wait_group N` immediates (N > 0 means a product is left running under other work), HGMMA and
WARPGROUP.DEPBAR counts in the SASS.

Needs only Triton 3.6 (the version on the GPU machines; no torch, no GPU):

    python3 -m venv /tmp/tri36 && /tmp/tri36/bin/pip install triton==3.6.0
    /tmp/tri36/bin/python assignment2-systems/benchmarks/compile_check_hopper.py [--dump DIR] [--json PATH]

The kernel module is loaded by file path so that the cs336_systems package (which imports torch) stays out.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon import language as gl
from triton.experimental.gluon._runtime import GluonASTSource

KERNELS = Path(__file__).resolve().parents[1] / "cs336_systems" / "flash_attention" / "hopper_kernels.py"


def load_kernels() -> Any:
    spec = importlib.util.spec_from_file_location("cs336_hopper_kernels", KERNELS)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # gluon.jit resolves globals through the module
    spec.loader.exec_module(module)
    return module


def desc_type(dtype: str, block: list[int]) -> str:
    """Signature string of a Gluon TMA descriptor argument (what the launcher would derive from the host one)."""
    gl_dtype = {"bf16": gl.bfloat16, "fp16": gl.float16, "fp32": gl.float32}[dtype]
    layout = gl.NVMMASharedLayout.get_default_for(block, gl_dtype)
    return f"tensordesc<{dtype}[{', '.join(map(str, block))}],{layout!r}>"


def _fwd_signature(kernel: Any, dtype: str, head_dim: int, causal: bool, q_rows: int, block_m: int, block_n: int,
                   stages: int, flag: str, flag_value: bool) -> tuple[Any, dict, dict, dict]:
    """The forward kernels' shared signature: q's descriptor block of `q_rows` rows, and one variant flag."""
    sig = {
        "q_desc": desc_type(dtype, [q_rows, head_dim]),
        "k_desc": desc_type(dtype, [block_n, head_dim]),
        "v_desc": desc_type(dtype, [block_n, head_dim]),
        "o_ptr": f"*{dtype}", "lse_ptr": "*fp32",
        "N_QUERIES": "i32", "N_KEYS": "i32", "sm_scale": "fp32",
        "HEAD_DIM": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "STAGES": "constexpr",
        "IS_CAUSAL": "constexpr", flag: "constexpr",
    }
    consts = {"HEAD_DIM": head_dim, "BLOCK_M": block_m, "BLOCK_N": block_n, "STAGES": stages, "IS_CAUSAL": causal,
              flag: flag_value}
    attrs = {(kernel.arg_names.index(n), ): [["tt.divisibility", 16]] for n in ("o_ptr", "lse_ptr")}
    return kernel, sig, consts, attrs


def fwd_variant(mod: Any, dtype: str, head_dim: int, causal: bool, block_m: int, block_n: int, stages: int,
                num_warps: int, p_in_smem: bool = False) -> tuple[Any, dict, dict, dict]:
    return _fwd_signature(mod.flash_fwd_hopper_kernel, dtype, head_dim, causal, block_m, block_m, block_n, stages,
                          "P_IN_SMEM", p_in_smem)


def ws_variant(mod: Any, dtype: str, head_dim: int, causal: bool, block_m: int, block_n: int, stages: int,
               num_warps: int, pingpong: bool = True, maxnreg: int = 168) -> tuple[Any, dict, dict, dict]:
    """The warp-specialised forward (fa3-v4): a 1-warp TMA producer and one consumer partition of num_warps
    warps, or (pingpong) two 4-warp consumers of 64 rows each; q_desc's block is one consumer's rows."""
    rows_per_consumer = block_m // 2 if pingpong else block_m
    return _fwd_signature(mod.flash_fwd_hopper_ws_kernel, dtype, head_dim, causal, rows_per_consumer, block_m,
                          block_n, stages, "PINGPONG", pingpong)


def bwd_variant(mod: Any, dtype: str, head_dim: int, causal: bool, block_m: int, block_n: int, stages: int,
                num_warps: int, kernel: str = "flash_bwd_dkdv_hopper_kernel") -> tuple[Any, dict, dict, dict]:
    """A Gluon dK/dV kernel (fa3-v2's by default): key tile block_n resident, query tiles of block_m through the
    ring."""
    kernel = getattr(mod, kernel)
    sig = {
        "q_desc": desc_type(dtype, [block_m, head_dim]),
        "k_desc": desc_type(dtype, [block_n, head_dim]),
        "v_desc": desc_type(dtype, [block_n, head_dim]),
        "do_desc": desc_type(dtype, [block_m, head_dim]),
        "lse_ptr": "*fp32", "delta_ptr": "*fp32", "dk_ptr": f"*{dtype}", "dv_ptr": f"*{dtype}",
        "N_QUERIES": "i32", "N_KEYS": "i32", "sm_scale": "fp32",
        "HEAD_DIM": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "STAGES": "constexpr",
        "IS_CAUSAL": "constexpr",
    }
    consts = {"HEAD_DIM": head_dim, "BLOCK_M": block_m, "BLOCK_N": block_n, "STAGES": stages, "IS_CAUSAL": causal}
    attrs = {(kernel.arg_names.index(n), ): [["tt.divisibility", 16]]
             for n in ("lse_ptr", "delta_ptr", "dk_ptr", "dv_ptr")}
    return kernel, sig, consts, attrs


def sass_of(cubin: bytes) -> str:
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        return subprocess.run([str(cuobjdump), "-sass", path], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(path)


BUNDLED_PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


def ptxas_report(ptx: str, ptxas: Path = BUNDLED_PTXAS) -> str:
    """ptxas -v on the PTX (registers, spills, and any 'wgmma ... serialized' warning)."""
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        out = subprocess.run([str(ptxas), "-v", "-arch=sm_90a", str(src), "-o", str(Path(d) / "k.cubin")],
                             capture_output=True, text=True)
        return out.stdout + out.stderr


def ex2_under_mma(sass: str) -> int:
    """MUFU.EX2 issued (in program text order) after a `WARPGROUP.DEPBAR.LE gsb0, 0x1` and before the next
    wait for zero: exponentials that run while a warpgroup product is still in flight. ptxas may hoist a wait
    above them (a barrier it must not cross pulls it up), which this count exposes and the PTX does not."""
    count, open_window = 0, False
    for line in sass.splitlines():
        if re.search(r"WARPGROUP\.DEPBAR\.LE gsb0, 0x[1-9]", line):
            open_window = True
        elif "WARPGROUP.DEPBAR.LE gsb0, 0x0" in line:
            open_window = False
        elif open_window and "MUFU.EX2" in line:
            count += 1
    return count


def alu_under_mma(sass: str) -> int:
    """FP32 FADD/FMUL/FFMA/FMNMX and MUFU issued after an HGMMA (the products start as their k-steps issue,
    before the group's `gsb0` commit) and before the next WARPGROUP.DEPBAR of any depth: arithmetic that runs
    while a product is in flight without a wait in between. The backward's dS^T = P^T ∘ (dP^T − D) should land
    under the dV product this way (there is no DEPBAR 0x1 around it); exponentials behind a DEPBAR 0x1 are
    counted by `ex2_under_mma` instead."""
    count, open_window = 0, False
    for line in sass.splitlines():
        if "HGMMA" in line:
            open_window = True
        elif "WARPGROUP.DEPBAR" in line:
            open_window = False
        elif open_window and re.search(r"\b(FADD|FMUL|FFMA|FMNMX|MUFU)\b", line):
            count += 1
    return count


def registers_by_setmaxreg(sass: str) -> dict[str, int]:
    """Highest register index used after each USETMAXREG (SASS's setmaxnreg), in program text order, keyed
    "ALLOC240@addr" / "DEALLOC24@addr": in a warp-specialised kernel, roughly what each partition uses under its
    budget (ptxas -v reports only the kernel-wide maxnreg). Approximate: a partition's code need not be contiguous."""
    region, top = "entry", {}
    for line in sass.splitlines():
        m = re.search(r"USETMAXREG\.(\w+)\.CTAPOOL\s+(?:UP\d,\s*)?(0x[0-9a-f]+)", line)
        if m:
            addr = line.split("*/")[0].strip("/* ")
            region = f"{m.group(1).replace('TRY_', '')}{int(m.group(2), 16)}@{addr}"
            continue
        for r in re.findall(r"\bR(\d+)\b", line):
            top[region] = max(top.get(region, 0), int(r))
    return top


def registers_and_spills(report: str) -> tuple[int | None, int | None]:
    """Registers used and spill-store bytes from a `ptxas -v` report (None where it does not say)."""
    regs = re.search(r"Used (\d+) registers", report)
    spill = re.search(r"(\d+) bytes spill stores", report)
    return (int(regs.group(1)) if regs else None), (int(spill.group(1)) if spill else None)


def facts(compiled: Any) -> dict[str, Any]:
    ptx = compiled.asm["ptx"]
    sass = sass_of(compiled.asm["cubin"])
    report = ptxas_report(ptx)
    registers, spill_bytes = registers_and_spills(report)
    waits = [int(n) for n in re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", ptx)]
    return {
        "registers": registers,
        "spill_stores_bytes": spill_bytes,
        "shared_bytes": compiled.metadata.shared,
        "ptx_wgmma": len(re.findall(r"wgmma\.mma_async", ptx)),
        "ptx_wait_group": {n: waits.count(n) for n in sorted(set(waits))},
        "sass_hgmma": len(re.findall(r"\bHGMMA\.", sass)),
        "sass_depbar": len(re.findall(r"WARPGROUP\.DEPBAR", sass)),
        "sass_depbar_nonzero": len(re.findall(r"WARPGROUP\.DEPBAR\.LE gsb0, 0x[1-9]", sass)),
        "sass_ex2_under_mma": ex2_under_mma(sass),
        "sass_ex2": len(re.findall(r"MUFU\.EX2", sass)),
        "sass_alu_under_mma": alu_under_mma(sass),
        "serialized_warning": "serialized" in report,
        # warp-specialised kernels: the per-partition register budgets (setmaxnreg) and mbarrier traffic
        "sass_max_register_by_setmaxreg": registers_by_setmaxreg(sass),
        "ptx_setmaxnreg": re.findall(r"setmaxnreg\.(inc|dec)\.sync\.aligned\.u32\s+(\d+)", ptx),
        "ptx_bar_sync": len(re.findall(r"\bbar(?:rier)?\.sync", ptx)),
        "ptx_mbarrier_wait": len(re.findall(r"mbarrier\.try_wait", ptx)),
        "ptx_mbarrier_arrive": len(re.findall(r"mbarrier\.arrive", ptx)),
        "ptxas_warnings": [line for line in report.splitlines() if "warning" in line.lower()],
    }, ptx, sass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dump", type=Path, help="write each variant's PTX and SASS here")
    parser.add_argument("--json", type=Path, help="write the facts here")
    parser.add_argument("--only", choices=[name for name, _, _ in VARIANTS], help="one kernel's variants")
    parser.add_argument("--first", type=int, help="only the first N variants of each kernel (a quick look)")
    args = parser.parse_args()
    mod = load_kernels()
    target = GPUTarget("cuda", 90, 32)
    results = []
    print(f"triton {triton.__version__}, target sm_90a")
    for name, builder, variants in VARIANTS:
        if args.only and name != args.only:
            continue
        for v in variants[:args.first]:
            kernel, sig, consts, attrs = builder(mod, **v)
            label = f"{name} " + " ".join(f"{k}={val}" for k, val in v.items())
            try:
                src = GluonASTSource(kernel, sig, consts, attrs)
                options = {"num_warps": v["num_warps"]}
                if "maxnreg" in v:  # warp-specialised kernels: the budget the partitions' setmaxnreg share
                    options["maxnreg"] = v["maxnreg"]
                compiled = triton.compile(src, target=target, options=options)
                info, ptx, sass = facts(compiled)
                info["ok"] = True
                if args.dump:
                    args.dump.mkdir(parents=True, exist_ok=True)
                    stem = re.sub(r"[^A-Za-z0-9_=.-]+", "_", label)
                    (args.dump / f"{stem}.ptx").write_text(ptx)
                    (args.dump / f"{stem}.sass").write_text(sass)
            except Exception as e:  # report and go on: one variant failing must not hide the others
                info = {"ok": False, "error": f"{type(e).__name__}: {str(e)[-1500:]}"}
            info["variant"] = label
            results.append(info)
            print(json.dumps(info))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if not all(r["ok"] for r in results):
        sys.exit(1)


# (head dim, key tile, stages): 3+ stages keep the K/V copies at least one iteration ahead of the products
FWD_TILES = [(64, 128, 3), (64, 128, 4), (64, 64, 4), (128, 64, 3), (128, 128, 2)]
FWD_VARIANTS = [
    {"dtype": dt, "head_dim": d, "causal": c, "block_m": 128, "block_n": bn, "stages": st, "num_warps": 8}
    for dt in ("bf16", "fp16") for d, bn, st in FWD_TILES for c in (True, False)
] + [
    {"dtype": "bf16", "head_dim": d, "causal": c, "block_m": 128, "block_n": bn, "stages": st, "num_warps": 8,
     "p_in_smem": True}
    for d, bn, st in ((64, 128, 3), (64, 64, 4), (64, 64, 3), (64, 64, 2), (128, 64, 3), (128, 64, 2))
    for c in (True, False)
] + [
    {"dtype": "bf16", "head_dim": 64, "causal": True, "block_m": 64, "block_n": 128, "stages": 3, "num_warps": 4},
]

# dK/dV (head dim, query tile, key tile, stages, warps): 128 keys = two warpgroups of 64 key rows each
BWD_TILES = [(64, 64, 128, 2, 8), (64, 64, 128, 3, 8), (128, 64, 128, 2, 8), (128, 32, 128, 2, 8),
             (128, 32, 128, 3, 8), (64, 128, 128, 2, 8),
             (128, 64, 64, 2, 4)]
BWD_VARIANTS = [
    {"dtype": dt, "head_dim": d, "causal": c, "block_m": bm, "block_n": bn, "stages": st, "num_warps": nw}
    for dt in ("bf16", "fp16") for d, bm, bn, st, nw in BWD_TILES for c in (True, False)
]

# pipelined dK/dV (fa3-v5): one warpgroup, 64 keys × 64 queries, 3-4 stages
BWD5_VARIANTS = [
    {"dtype": dt, "head_dim": d, "causal": c, "block_m": 64, "block_n": 64, "stages": st, "num_warps": 4,
     "kernel": "flash_bwd_dkdv_hopper_v5_kernel"}
    for dt in ("bf16", "fp16") for d, st in ((64, 3), (64, 4), (128, 3)) for c in (True, False)
]


def bwd6_variant(mod: Any, dtype: str, head_dim: int, causal: bool, stages: int, num_warps: int,
                 maxnreg: int) -> tuple[Any, dict, dict, dict]:
    """fa3-v6: 128-key programs, two pipelined consumers of 64 keys (K/V descriptors of 64-row blocks)."""
    kernel, sig, consts, attrs = bwd_variant(mod, dtype, head_dim, causal, 64, 64, stages, num_warps,
                                             kernel="flash_bwd_dkdv_hopper_v6_kernel")
    consts["BLOCK_N"] = 128
    return kernel, sig, consts, attrs


def dq_variant(mod: Any, dtype: str, head_dim: int, causal: bool, stages: int,
               num_warps: int, anchor_p: bool = True) -> tuple[Any, dict, dict, dict]:
    """fa3-v7: the pipelined Gluon dQ kernel, 64 × 64 tiles."""
    kernel = mod.flash_bwd_dq_hopper_kernel
    sig = {
        "q_desc": desc_type(dtype, [64, head_dim]), "k_desc": desc_type(dtype, [64, head_dim]),
        "v_desc": desc_type(dtype, [64, head_dim]), "do_desc": desc_type(dtype, [64, head_dim]),
        "o_ptr": f"*{dtype}", "do_ptr": f"*{dtype}", "lse_ptr": "*fp32", "delta_ptr": "*fp32", "dq_ptr": f"*{dtype}",
        "N_QUERIES": "i32", "N_KEYS": "i32", "sm_scale": "fp32",
        "HEAD_DIM": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "STAGES": "constexpr",
        "IS_CAUSAL": "constexpr", "ANCHOR_P": "constexpr",
    }
    consts = {"HEAD_DIM": head_dim, "BLOCK_M": 64, "BLOCK_N": 64, "STAGES": stages, "IS_CAUSAL": causal,
              "ANCHOR_P": anchor_p}
    attrs = {(kernel.arg_names.index(n), ): [["tt.divisibility", 16]]
             for n in ("o_ptr", "do_ptr", "lse_ptr", "delta_ptr", "dq_ptr")}
    return kernel, sig, consts, attrs


DQ_VARIANTS = [
    {"dtype": dt, "head_dim": d, "causal": c, "stages": st, "num_warps": 4}
    for dt in ("bf16", "fp16") for d, st in ((64, 2), (64, 3), (128, 2)) for c in (True, False)
] + [{"dtype": "bf16", "head_dim": 64, "causal": c, "stages": 2, "num_warps": 4, "anchor_p": False}
     for c in (True, False)]

BWD6_VARIANTS = [
    {"dtype": dt, "head_dim": 64, "causal": c, "stages": st, "num_warps": 4, "maxnreg": 168}
    for dt in ("bf16", "fp16") for st in (3, 4) for c in (True, False)
]

# warp-specialised forward (fa3-v4): (head dim, key tile, stages, pingpong); 128-row tiles, maxnreg 168
WS_TILES = [(64, 64, 4, True), (64, 128, 3, True), (64, 128, 2, True), (64, 64, 4, False), (128, 64, 3, True),
            (128, 128, 2, True)]
WS_VARIANTS = [
    {"dtype": dt, "head_dim": d, "causal": c, "block_m": 128, "block_n": bn, "stages": st,
     "num_warps": 4 if pp else 8, "pingpong": pp, "maxnreg": 168}
    for dt in ("bf16", "fp16") for d, bn, st, pp in WS_TILES for c in (True, False)
]

VARIANTS: list[tuple[str, Any, list[dict]]] = [("fwd", fwd_variant, FWD_VARIANTS), ("bwd", bwd_variant, BWD_VARIANTS),
                                               ("ws", ws_variant, WS_VARIANTS), ("bwd5", bwd_variant, BWD5_VARIANTS),
                                               ("bwd6", bwd6_variant, BWD6_VARIANTS), ("dq", dq_variant, DQ_VARIANTS)]


if __name__ == "__main__":
    main()
