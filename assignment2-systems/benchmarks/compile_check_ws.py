"""Compile the warp-specialised kernels (`ws_kernels_v11.py`, v11: the forward and the split backward) for sm_90a
without a GPU and report what Triton's Hopper warp specialisation built: whether the loop became a
`ttg.warp_specialize` op, the registers its partitions asked for, the warpgroup products and waits in the PTX,
and ptxas's registers, spills and serialisation warning.

Needs only Triton 3.6 (the version on the GPU machines; no torch, no GPU):

    /tmp/tri36/bin/python assignment2-systems/benchmarks/compile_check_ws.py \\
        --json assignment2-systems/benchmarks/results/compile_check_ws_v11.json

The kernel module is loaded by file path (it needs no torch to compile).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import triton
from compile_check_desc import ptxas_facts  # this folder: run as a script
from compile_check_hopper import BUNDLED_PTXAS
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

KERNELS = Path(__file__).resolve().parent / "ws_kernels_v11.py"

# (kind, query tile, key tile, warps, stages): the consumers split the tile's first dimension (keys for dK/dV,
# queries for dQ) in two, so that dimension is 128
TILES = [
    ("dkdv", 64, 128, 4, 2), ("dkdv", 64, 128, 4, 3), ("dkdv", 32, 128, 4, 2), ("dkdv", 32, 128, 4, 3),
    ("dq", 128, 64, 4, 2), ("dq", 128, 64, 4, 3), ("dq", 128, 32, 4, 3), ("dq", 128, 128, 4, 2),
    ("fwd", 128, 64, 4, 2), ("fwd", 128, 64, 4, 3), ("fwd", 128, 128, 4, 2), ("fwd", 128, 128, 4, 3),
]


def load_kernels() -> Any:
    spec = importlib.util.spec_from_file_location("ws_kernels_v11", KERNELS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def source(mod: Any, kind: str, block_m: int, block_n: int, head_dim: int, causal: bool,
           dtype: str = "bf16") -> ASTSource:
    """The signature as the launcher binds it: 16-byte aligned pointers (the kernels make their descriptors)."""
    fn = {"dkdv": mod.flash_bwd_dkdv_ws_kernel, "dq": mod.flash_bwd_dq_ws_kernel, "fwd": mod.flash_fwd_ws_kernel}[kind]
    consts = {"HEAD_DIM": head_dim, "IS_CAUSAL": causal, "BLOCK_M": block_m, "BLOCK_N": block_n}
    signature, aligned = {}, []
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            signature[name] = "constexpr"
        elif name in ("N_CTX", "sm_scale"):
            signature[name] = {"N_CTX": "i32", "sm_scale": "fp32"}[name]
        else:
            signature[name] = "*fp32" if name in ("L2", "Delta", "L") else f"*{dtype}"
            aligned.append(i)
    return ASTSource(fn, signature, consts, {(i,): [["tt.divisibility", 16]] for i in aligned})


def facts(compiled) -> dict[str, Any]:
    ttgir, ptx = compiled.asm["ttgir"], compiled.asm["ptx"]
    requested = re.search(r"requestedRegisters = array<i32: ([\d, ]+)>", ttgir)
    # rows of each TMA copy's destination: the partitioned tiles' copies are half the tile
    copies = re.findall(r"async_tma_copy_global_to_local .* -> !ttg\.memdesc<([0-9x]+)", ttgir)
    return {"warp_specialized": "ttg.warp_specialize" in ttgir, "tma_copy_shapes": sorted(set(copies)),
            "requested_registers": [int(r) for r in requested.group(1).split(",")] if requested else None,
            "setmaxnreg": ptx.count("setmaxnreg"), "ptx_wgmma": ptx.count("wgmma.mma_async"),
            "ptx_waits": len(re.findall(r"wgmma\.wait_group", ptx)), "shared_bytes": compiled.metadata.shared,
            **ptxas_facts(BUNDLED_PTXAS, ptx)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head-dim", type=int, default=64, choices=(64, 128))
    parser.add_argument("--json", type=Path, help="write the facts here")
    args = parser.parse_args()
    mod = load_kernels()
    target = GPUTarget("cuda", 90, 32)
    print(f"triton {triton.__version__}, sm_90a, d {args.head_dim}")
    rows = []
    for causal in (True, False):
        for kind, block_m, block_n, warps, stages in TILES:
            row: dict[str, Any] = {"kind": kind, "tile": [block_m, block_n, warps, stages], "causal": causal}
            try:
                compiled = triton.compile(source(mod, kind, block_m, block_n, args.head_dim, causal), target=target,
                                          options={"num_warps": warps, "num_stages": stages})
                row.update(facts(compiled))
            except RuntimeError as e:  # the warp-specialisation pass rejected the loop
                row["error"] = str(e).splitlines()[0][:200]
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"triton": triton.__version__, "head_dim": args.head_dim, "rows": rows},
                                        indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
