"""The cross-entropy over the leaderboard's logits (32 768 tokens × 32 000 classes, bf16): loss and gradient by
the compiled one-pass path the preset uses (`onepass_ce.py` under torch.compile: a log-sum-exp reduction in the
forward, one pointwise kernel in the backward) against the Triton kernel of `--loss-impl fused`
(`fused_ce.softmax_grad_`: one read of the logits, the gradient written over them), with the whole row in
registers and block by block (the default: blocks of 16 384). Checks the kernel's loss and gradient against
float64 first; prints a table (ms, GB/s of the traffic each path needs) and writes JSON.

    PYTHONPATH=assignment1-basics python3 assignment1-basics/benchmarks/loss_kernels.py --out $OUT/loss_kernels.json
"""

import argparse
import json
import platform
import statistics

import torch
import torch.nn.functional as F

from cs336_basics.fused_ce import launch_config, softmax_grad_
from cs336_basics.onepass_ce import onepass_cross_entropy


def median_ms(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def check_against_float64(logits: torch.Tensor, targets: torch.Tensor, block: int | None) -> dict:
    """Loss and gradient of the kernel on the first 512 rows against float64 autograd."""
    rows = logits[:512]
    reference = rows.double().requires_grad_(True)
    expected = F.cross_entropy(reference, targets[:512], reduction="sum")
    expected.backward()
    scale = 1.0 / rows.shape[0]
    loss, grad = softmax_grad_(rows.clone(), targets[:512], scale, block=block)
    grad_error = (grad.double() - reference.grad * scale).abs().max().item()
    ulp = torch.finfo(logits.dtype).eps * scale  # one unit in the last place at the gradient's largest size
    return {"loss_rel_error": abs(loss.item() - expected.item()) / expected.item(), "grad_max_error": grad_error,
            "grad_error_in_ulps": grad_error / ulp}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("loss_kernels.py times CUDA kernels: no GPU here")
    torch.manual_seed(0)
    logits = (torch.randn(args.tokens, args.vocab, device="cuda") * 2).to(torch.bfloat16)
    targets = torch.randint(0, args.vocab, (args.tokens,), device="cuda")
    traffic = 2 * logits.numel() * logits.element_size()  # read the logits once, write the gradient once

    compiled = torch.compile(onepass_cross_entropy)
    leaf = logits.clone().requires_grad_(True)

    def onepass():
        leaf.grad = None
        compiled(leaf, targets).backward()

    work = logits.clone()
    rows = []
    timed = {"onepass, compiled (forward reduction + backward pass)": (onepass, None)}
    for block in (None, 32768, 8192, 4096):
        size, whole_row, warps = launch_config(args.vocab, block)
        label = (f"fused kernel{', default' if block is None else ''}, "
                 f"{'whole row' if whole_row else f'blocks of {size}'}, {warps} warps")
        timed[label] = ((lambda b=block: softmax_grad_(work, targets, 1.0 / args.tokens, block=b)), block)
    for label, (fn, block) in timed.items():
        row = {"path": label}
        if fn is not onepass:
            row.update(check_against_float64(logits, targets, block))
            work.copy_(logits)  # the kernel overwrites its input: time it on real logits, not on gradients
        row["ms"] = median_ms(fn, args.iters)
        row["GB_per_s"] = traffic / row["ms"] / 1e6
        rows.append(row)
    print(f"\n{torch.cuda.get_device_name()}: cross-entropy loss + gradient, {args.tokens} × {args.vocab} bf16 logits")
    print("| path | ms | GB/s of 2 × logits | grad error (ulps) |")
    print("|---|---:|---:|---:|")
    for r in rows:
        ulps = f"{r['grad_error_in_ulps']:.2f}" if "grad_error_in_ulps" in r else "—"
        print(f"| {r['path']} | {r['ms']:.3f} | {r['GB_per_s']:.0f} | {ulps} |")
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "host": platform.node(),
                   "tokens": args.tokens, "vocab": args.vocab, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
