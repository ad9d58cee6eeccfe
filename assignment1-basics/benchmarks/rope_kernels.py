"""RoPE in the training step's layout, compiled, forward + backward: our pair-swap form (`layers.py`,
x·cos + swap(x)·(−sin, sin)) against the textbook even/odd `stack` the model used before, and the rotation of
contiguous halves that `--rope-layout halves` uses (features reordered (evens, odds) by the projection).
The input is one layer's fused q/k/v projection (batch, seq, heads + 2 kv_heads, d) in bf16, sequence-major as under
`--attention-layout bshd`; q and k are rotated, v passes through, and the backward assembles the q/k/v
gradient as the step's does. Prints a table (ms per layer and for the model's layers, GB/s of the minimum
traffic) and writes JSON; the outputs of the forms are checked equal first.

    PYTHONPATH=assignment1-basics python3 assignment1-basics/benchmarks/rope_kernels.py --out $OUT/rope.json
    PYTHONPATH=assignment1-basics python3 assignment1-basics/benchmarks/rope_kernels.py --device cpu \\
        --batch-size 2 --seq-len 32 --iters 3 --out /tmp/rope.json        # smoke test
"""

import argparse
import json
import platform
import statistics
import time

import torch

from cs336_basics.layers import RotaryPositionalEmbedding


def textbook_rotation(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The form `layers.py` had until 2026-12-07: each pair taken apart, rotated, stacked back."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    pairs = x.unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)


def layer_rope(rotate, tables: tuple[torch.Tensor, torch.Tensor], num_heads: int):
    """One layer's q/k/v split and rotation; `tables`: the (seq, ·) cos and sin tables `rotate` takes."""
    def run(qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        seq = qkv.shape[1]
        qk, v = qkv.split((2 * num_heads, num_heads), dim=-2)
        q, k = rotate(qk, *(t[:seq, None, :] for t in tables)).split(num_heads, dim=-2)
        return q, k, v
    return run


def time_form(fn, qkv: torch.Tensor, grads, iters: int, device: torch.device) -> float:
    """Median ms of forward + backward over `iters` timed runs (after three warm-up runs)."""
    def once():
        x = qkv.detach().requires_grad_(True)
        torch.autograd.backward(fn(x), grads)
    for _ in range(3):
        once()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            once()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            once()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--num-heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--num-layers", type=int, default=12, help="layers per model step (for the model's total)")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    for name in ("batch_size", "seq_len", "num_heads", "head_dim", "num_layers", "iters"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.head_dim % 2:
        parser.error("--head-dim must be even")
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    rope = RotaryPositionalEmbedding(10_000.0, args.head_dim, args.seq_len, device=device)
    shape = (args.batch_size, args.seq_len, 3 * args.num_heads, args.head_dim)
    qkv = torch.randn(shape, device=device, dtype=dtype)
    grads = tuple(torch.randn(args.batch_size, args.seq_len, args.num_heads, args.head_dim, device=device,
                              dtype=dtype) for _ in range(3))
    forms = {"textbook stack": (textbook_rotation, (rope.cos, rope.sin)),
             "pair swap (ours)": (RotaryPositionalEmbedding._rotate, (rope.cos_pairs, rope.signed_sin)),
             "halves (--rope-layout halves)": (RotaryPositionalEmbedding.rotate_halves, (rope.cos, rope.sin))}
    # eager outputs equal (the compiled ones may contract multiply-adds differently); the halves form takes
    # each head's features as (evens, odds), as the reordered projection gives them, and is compared so
    evens_then_odds = torch.cat((torch.arange(0, args.head_dim, 2), torch.arange(1, args.head_dim, 2)))
    expected = layer_rope(textbook_rotation, (rope.cos, rope.sin), args.num_heads)(qkv)
    for name, (rotate, tables) in forms.items():
        halves = rotate is RotaryPositionalEmbedding.rotate_halves
        got = layer_rope(rotate, tables, args.num_heads)(qkv[..., evens_then_odds] if halves else qkv)
        for a, b in zip(got, expected, strict=True):
            assert torch.equal(a, b[..., evens_then_odds] if halves else b), f"{name} disagrees with the textbook form"
    # fewest bytes a layer must move: forward reads and writes q and k; backward reads dq, dk, dv, writes dqkv
    element = qkv.element_size()
    min_bytes = element * qkv[..., 0, 0].numel() * args.head_dim * args.num_heads * (2 * 2 + 3 * 2)
    rows = []
    print(f"{device.type} {torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor()}, "
          f"shape {shape} {str(dtype).removeprefix('torch.')}")
    print("| form | ms per layer | ms for the model's layers | GB/s of the minimum traffic |")
    print("|---|---:|---:|---:|")
    for name, (rotate, tables) in forms.items():
        torch._dynamo.reset()  # each form compiled on its own (they share `layer_rope`'s code object)
        ms = time_form(torch.compile(layer_rope(rotate, tables, args.num_heads)), qkv, grads, args.iters, device)
        rows.append({"form": name, "ms_per_layer": ms, "ms_per_step": ms * args.num_layers,
                     "gb_per_s": min_bytes / ms / 1e6})
        print(f"| {name} | {ms:.3f} | {ms * args.num_layers:.2f} | {min_bytes / ms / 1e6:,.0f} |")
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "shape": list(shape), "dtype": str(dtype),
              "num_layers": args.num_layers, "iters": args.iters, "min_bytes_per_layer": min_bytes, "rows": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
