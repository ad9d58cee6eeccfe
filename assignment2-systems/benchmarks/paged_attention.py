"""Decode-attention micro-benchmark: the Triton paged kernel (with automatic split-K, and with split-K off) vs the
PyTorch reference over the same paged pool vs `F.scaled_dot_product_attention` on a contiguous cache holding the
same keys (the no-paging lower bound that a dense KV cache would give).

Every sequence of a batch has the same context length (so SDPA needs no mask); the pool's blocks are handed out
in a random permutation, as a long-running server's would be.

    PYTHONPATH=assignment1-basics:assignment2-systems python3 assignment2-systems/benchmarks/paged_attention.py \
        [--out assignment2-systems/benchmarks/results/paged_attention.json] [--dtype bf16] [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from cs336_systems.serving.paged_attention import paged_attention_reference, paged_attention_triton

SHAPES = {"llama (32h, 8kv, d128)": (32, 8, 128), "125M (12h, 12kv, d64)": (12, 12, 64)}
BATCHES = (1, 8, 64, 256)
CONTEXTS = (512, 2048)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "paged_attention.json"


def make_inputs(batch: int, ctx: int, heads: int, kv_heads: int, d: int, block_size: int, dtype: torch.dtype):
    blocks_per_seq = math.ceil(ctx / block_size)
    num_blocks = 1 + batch * blocks_per_seq
    gen = torch.Generator(device="cuda").manual_seed(0)
    k_cache = torch.randn(num_blocks, block_size, kv_heads, d, device="cuda", dtype=dtype, generator=gen)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, d, device="cuda", dtype=dtype, generator=gen)
    perm = torch.randperm(num_blocks - 1, device="cuda", generator=gen).to(torch.int32) + 1
    tables = perm.view(batch, blocks_per_seq).contiguous()
    lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, heads, d, device="cuda", dtype=dtype, generator=gen)
    # Contiguous copy of the same keys for SDPA: (batch, kv_heads, ctx, d).
    idx = tables.long()
    k_dense = k_cache[idx].reshape(batch, -1, kv_heads, d)[:, :ctx].transpose(1, 2).contiguous()
    v_dense = v_cache[idx].reshape(batch, -1, kv_heads, d)[:, :ctx].transpose(1, 2).contiguous()
    return q, k_cache, v_cache, tables, lens, k_dense, v_dense


def bench_one(shape: str, batch: int, ctx: int, dtype: torch.dtype, block_size: int, run_reference: bool) -> dict:
    heads, kv_heads, d = SHAPES[shape]
    q, k_cache, v_cache, tables, lens, k_dense, v_dense = make_inputs(batch, ctx, heads, kv_heads, d, block_size, dtype)
    scale = d**-0.5
    fns = {
        "triton": lambda: paged_attention_triton(q, k_cache, v_cache, tables, lens, scale=scale),
        "triton_nosplit": lambda: paged_attention_triton(q, k_cache, v_cache, tables, lens, scale=scale, num_splits=1),
        # The group's query heads ride as G query rows of their kv head (no mask: one decode position, all
        # keys visible), so SDPA reads each kv head once, as the paged kernel does.
        "sdpa_contiguous": lambda: F.scaled_dot_product_attention(
            q.view(batch, kv_heads, heads // kv_heads, d), k_dense, v_dense, scale=scale
        ).reshape(batch, heads, d),
    }
    if run_reference:
        fns["reference"] = lambda: paged_attention_reference(q, k_cache, v_cache, tables, lens, scale=scale)
    expected = fns["sdpa_contiguous"]()
    row: dict = {"shape": shape, "batch": batch, "context": ctx, "block_size": block_size}
    for name, fn in fns.items():
        out = fn()
        err = (out.float() - expected.float()).abs().max().item()
        row[f"{name}_ms"] = do_bench(fn, warmup=10, rep=50)
        row[f"{name}_max_abs_err_vs_sdpa"] = err
    kv_bytes = batch * ctx * kv_heads * 2 * d * k_cache.element_size()
    row["kv_bytes"] = kv_bytes
    row["triton_gb_per_s"] = kv_bytes / (row["triton_ms"] * 1e-3) / 1e9
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="batch 1 and 64, context 512 only")
    parser.add_argument("--no-reference", action="store_true", help="skip the (slow, memory-hungry) reference")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    batches, contexts = ((1, 64), (512,)) if args.quick else (BATCHES, CONTEXTS)
    rows = []
    header = (
        f"{'shape':<24}{'batch':>6}{'ctx':>6}{'triton ms':>11}{'nosplit ms':>11}{'ref ms':>9}{'sdpa ms':>9}"
        f"{'vs ref':>8}{'vs sdpa':>8}{'GB/s':>7}"
    )
    print(header)
    for shape in SHAPES:
        for ctx in contexts:
            for batch in batches:
                row = bench_one(shape, batch, ctx, DTYPES[args.dtype], args.block_size, not args.no_reference)
                rows.append(row)
                torch.cuda.empty_cache()  # the previous config's pools are gone once bench_one returns
                ref = row.get("reference_ms", float("nan"))
                print(
                    f"{shape:<24}{batch:>6}{ctx:>6}{row['triton_ms']:>11.4f}{row['triton_nosplit_ms']:>11.4f}"
                    f"{ref:>9.3f}{row['sdpa_contiguous_ms']:>9.4f}{ref / row['triton_ms']:>7.1f}x"
                    f"{row['sdpa_contiguous_ms'] / row['triton_ms']:>7.2f}x{row['triton_gb_per_s']:>7.0f}",
                    flush=True,
                )
    meta = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "dtype": args.dtype,
        "block_size": args.block_size,
        "timer": "triton.testing.do_bench (ms, mean)",
        "note": "uniform context per batch; vs ref / vs sdpa = that time / triton time (>1: triton faster)",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
