"""Compile the tensor-descriptor backward kernels (`triton_kernels_desc`: dQ, dK/dV) for sm_90a without a GPU and
report what ptxas says of each tile: registers, spills, and whether it serialised the warpgroup products (and
why), for one or more ptxas binaries given the same PTX.

Why: the 3-stage 64 × 64 dK/dV tile is serialised by the ptxas that Triton 3.6 bundles (48 waits for 48
products; NOTES.md, v8), and locally Triton 3.9 with a newer ptxas was not. `--ptxas` tells whether the newer
ptxas alone would do (Triton 3.6 honours TRITON_PTXAS_PATH on the GPU machines) or whether it is the PTX that
Triton 3.6 generates.

Needs only Triton 3.6 (the version on the GPU machines; no torch, no GPU):

    python3 -m venv /tmp/tri36 && /tmp/tri36/bin/pip install triton==3.6.0
    /tmp/tri36/bin/python assignment2-systems/benchmarks/compile_check_desc.py \\
        --ptxas bundled /tmp/tri36/lib/python3.11/site-packages/triton/backends/nvidia/bin/ptxas-blackwell \\
        --json assignment2-systems/benchmarks/results/compile_check_desc.json

The kernel modules are loaded by file path so that the cs336_systems package (which imports torch) stays out.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import triton
from compile_check_hopper import BUNDLED_PTXAS, ptxas_report, registers_and_spills  # this folder: run as a script
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

KERNELS = Path(__file__).resolve().parents[1] / "cs336_systems" / "flash_attention"

# (kind, queries, keys, warps, stages, register cap): the shipped defaults first (triton_impl._*_desc_configs)
TILES = [
    ("dkdv", 64, 64, 4, 2, 168), ("dkdv", 64, 64, 4, 3, 168), ("dkdv", 64, 64, 4, 3, None),
    ("dkdv", 32, 64, 4, 3, 128), ("dkdv", 32, 64, 4, 3, 168), ("dkdv", 64, 64, 4, 4, 168),
    ("dq", 128, 64, 8, 4, 128), ("dq", 128, 64, 8, 3, 128), ("dq", 64, 64, 4, 3, None),
]

# the dK/dV kernel that also reduces each dQ tile (FUSED_DQ, backward mode "fused"): triton_impl._dkdv_fused_configs
FUSED_TILES = [
    ("dkdv_fused", 64, 64, 4, 3, None), ("dkdv_fused", 64, 64, 4, 2, None), ("dkdv_fused", 32, 64, 4, 2, 168),
    ("dkdv_fused", 32, 64, 4, 3, 168), ("dkdv_fused", 64, 64, 4, 3, 168), ("dkdv_fused", 32, 128, 8, 2, None),
    ("dkdv_fused", 32, 128, 8, 3, None), ("dkdv_fused", 64, 128, 8, 2, None),
]


def load_kernels() -> Any:
    """triton_kernels_desc, with its one import from triton_kernels resolved by file path (no torch)."""
    for package in ("cs336_systems", "cs336_systems.flash_attention"):
        sys.modules.setdefault(package, types.ModuleType(package))
    modules = {}
    for name in ("triton_kernels", "triton_kernels_desc"):
        qualified = f"cs336_systems.flash_attention.{name}"
        spec = importlib.util.spec_from_file_location(qualified, KERNELS / f"{name}.py")
        modules[name] = importlib.util.module_from_spec(spec)
        sys.modules[qualified] = modules[name]  # triton.jit resolves globals through the module
        spec.loader.exec_module(modules[name])
    return modules["triton_kernels_desc"]


def descriptor(rows: int, head_dim: int, dtype: str = "bf16") -> str:
    return f"tensordesc<{dtype}[1, 1, {rows}, {head_dim}]>"


def source(mod: Any, kind: str, block_m: int, block_n: int, head_dim: int, causal: bool,
           one_loop: bool = False) -> ASTSource:
    """The kernel's signature as its launcher would bind it: 4-D descriptors of (1, 1, tile rows, d) blocks."""
    scalars = {"N_HEADS": "i32", "N_QUERIES": "i32", "N_KEYS": "i32", "sm_scale": "fp32"}
    consts = {"HEAD_DIM": head_dim, "IS_CAUSAL": causal, "BLOCK_M": block_m, "BLOCK_N": block_n}
    if kind in ("dkdv", "dkdv_fused"):
        fn = mod.flash_bwd_dkdv_desc_kernel
        q_rows, k_rows = ("Q_DESC", "DO_DESC"), ("K_DESC", "V_DESC", "DK_DESC", "DV_DESC")
        pointers = ("L2", "Delta")
        consts.update(FUSED_DQ=kind == "dkdv_fused", ONE_LOOP=one_loop)
        if kind == "dkdv":
            consts["DQ_ACC_DESC"] = None
    else:
        fn = mod.flash_bwd_dq_desc_kernel
        q_rows, k_rows = ("Q_DESC", "O_DESC", "DO_DESC", "DQ_DESC"), ("K_DESC", "V_DESC")
        pointers = ("L", "Delta", "L2")
    signature = {}
    for name in fn.arg_names:
        if name in consts:
            signature[name] = "constexpr"
        elif name in q_rows:
            signature[name] = descriptor(block_m, head_dim)
        elif name in k_rows:
            signature[name] = descriptor(block_n, head_dim)
        elif name == "DQ_ACC_DESC":  # the fused kernel's float32 dQ accumulator, reduced one query tile at a time
            signature[name] = descriptor(block_m, head_dim, "fp32")
        elif name in pointers:
            signature[name] = "*fp32"
        else:
            signature[name] = scalars[name]
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in pointers}
    return ASTSource(fn, signature, consts, attrs)


def ptxas_facts(ptxas: Path, ptx: str) -> dict[str, Any]:
    """Registers, spill bytes and the serialisation warning (with its reason) from `ptxas -v` on the PTX."""
    report = ptxas_report(ptx, ptxas)
    if "fatal" in report:
        return {"error": report[-800:]}
    registers, spill_bytes = registers_and_spills(report)
    serialized = [line.split("serialized due to ")[-1].split(" in the function")[0]
                  for line in report.splitlines() if "serialized" in line]
    return {"registers": registers, "spill_bytes": spill_bytes, "serialized": serialized[0] if serialized else None}


def ptxas_version(ptxas: Path) -> str:
    out = subprocess.run([str(ptxas), "--version"], capture_output=True, text=True, check=True).stdout
    return re.search(r"release ([\d.]+)", out).group(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ptxas", nargs="+", default=["bundled"],
                        help="ptxas binaries to assemble the same PTX with ('bundled': Triton's own)")
    parser.add_argument("--head-dim", type=int, default=64, choices=(64, 128))
    parser.add_argument("--non-causal", action="store_true")
    parser.add_argument("--one-loop", action="store_true", help="the dK/dV kernel's ONE_LOOP form")
    parser.add_argument("--fused", action="store_true", help="the dK/dV kernel that also reduces dQ (FUSED_DQ)")
    parser.add_argument("--json", type=Path, help="write the facts here")
    args = parser.parse_args()
    binaries = [BUNDLED_PTXAS if p == "bundled" else Path(p) for p in args.ptxas]
    missing = [str(p) for p in binaries if not p.is_file()]
    if missing:
        parser.error(f"no such ptxas: {missing}")
    versions = {str(p): ptxas_version(p) for p in binaries}
    mod = load_kernels()
    target = GPUTarget("cuda", 90, 32)
    print(f"triton {triton.__version__}, sm_90a, d {args.head_dim}, causal {not args.non_causal}, "
          f"one loop {args.one_loop}, fused {args.fused}; "
          f"ptxas {', '.join(versions.values())}")
    rows = []
    for kind, block_m, block_n, warps, stages, cap in FUSED_TILES if args.fused else TILES:
        options = {"num_warps": warps, "num_stages": stages, **({"maxnreg": cap} if cap else {})}
        compiled = triton.compile(source(mod, kind, block_m, block_n, args.head_dim, not args.non_causal,
                                         args.one_loop),
                                  target=target, options=options)
        ptx = compiled.asm["ptx"]
        row = {"kind": kind, "tile": [block_m, block_n, warps, stages, cap],
               "ptx_wgmma": ptx.count("wgmma.mma_async"), "ptx_waits": len(re.findall(r"wgmma\.wait_group", ptx)),
               "ptxas": {versions[str(p)]: ptxas_facts(p, ptx) for p in binaries}}
        rows.append(row)
        print(json.dumps(row))
    if args.json:
        args.json.write_text(json.dumps({"triton": triton.__version__, "head_dim": args.head_dim,
                                         "causal": not args.non_causal, "one_loop": args.one_loop, "fused": args.fused,
                                         "ptxas": versions, "rows": rows},
                                        indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
