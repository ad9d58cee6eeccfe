"""Memory and time of one SFT step on a random-weight Qwen2-shaped 1.5B model: full fine-tuning vs LoRA vs
QLoRA (issue 20). Nothing is downloaded: a transformers `Qwen2Config` with Qwen2.5-Math-1.5B's shape (hidden
1536, 28 layers, 12 heads, 2 KV heads, intermediate 8960, vocabulary 151,936, tied embeddings), random init.

- full:  fp32 master weights, bf16 autocast, AdamW over every parameter (what `cs336-align sft` does);
- lora:  frozen bf16 base, fp32 rank-r adapters on q/k/v/o/gate/up/down of every layer, bf16 autocast;
- qlora: the same adapters over NF4 base weights (4-bit codes, double-quantised scales, `cs336_alignment.peft`),
         de-quantised on the fly in bf16 by the Triton kernel (CS336_NF4_TRITON=0: the PyTorch version);
         embeddings and norms stay bf16.

Each method runs in its own process on CUDA (so one method's cached allocator blocks do not count for the
next); peak GB is `torch.cuda.max_memory_allocated` over the timed steps, step time the median of `--steps`
steps after one warm-up step. Prints a table and writes JSON. On the device:

    PYTHONPATH=assignment1-basics:assignment5-alignment python3 assignment5-alignment/benchmarks/peft_memory.py \\
        --out "$OUT/peft_memory.json"

`--tiny` shrinks the model and batch so the whole path runs on a CPU in seconds (the CI test); CPU runs report
byte counts (weights, optimizer state) but no peak, which only the CUDA allocator measures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
for sub in ("assignment1-basics", "assignment5-alignment"):
    if str(REPO / sub) not in sys.path:
        sys.path.insert(0, str(REPO / sub))

import torch  # noqa: E402

METHODS = ("full", "lora", "qlora")
QWEN2_1_5B = {"hidden_size": 1536, "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
              "intermediate_size": 8960, "vocab_size": 151936, "max_position_embeddings": 4096,
              "tie_word_embeddings": True, "rope_theta": 10000.0}
TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 128, "vocab_size": 512, "max_position_embeddings": 128, "tie_word_embeddings": True,
        "rope_theta": 10000.0}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GB = 1024**3


def build_model(method: str, shape: dict, device: torch.device, rank: int, alpha: float, seed: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from cs336_alignment.peft import LoRAConfig, inject_lora

    torch.manual_seed(seed)
    config = Qwen2Config(**shape, attn_implementation="sdpa" if device.type == "cuda" else "eager")
    base_dtype = torch.float32 if method == "full" or device.type == "cpu" else torch.bfloat16
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(base_dtype)
    if method != "full":
        inject_lora(model, LoRAConfig(rank=rank, alpha=alpha, targets=TARGETS, qlora=method == "qlora"))
    return model.train()


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def run_one(method: str, args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    shape = TINY if args.tiny else QWEN2_1_5B
    model = build_model(method, shape, device, args.rank, args.alpha, args.seed)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0)
    generator = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(0, shape["vocab_size"], (args.batch_size, args.seq_len), generator=generator).to(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast(
        "cpu", enabled=False)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()

    def step() -> float:
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    weights = tensor_bytes(list(model.parameters()) + list(model.buffers()))
    kernel_check = None
    if method == "qlora":  # the de-quantisation this run uses (Triton on CUDA) against the PyTorch reference
        from cs336_alignment.peft import NF4Linear
        from cs336_alignment.peft.nf4 import dequantize_nf4

        layer = next(m for m in model.modules() if isinstance(m, NF4Linear))
        used, reference = layer.dequantize(torch.float32), dequantize_nf4(layer.quantized(), use_triton=False)
        kernel_check = float((used - reference).abs().max())
    first_loss = step()  # warm-up; also creates the optimizer state
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for _ in range(args.steps):
        sync()
        start = time.perf_counter()
        losses.append(step())
        sync()
        times.append(time.perf_counter() - start)
    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return {
        "method": method,
        "total_params": sum(p.numel() for p in model.parameters()) + sum(
            b.numel() * 2 for n, b in model.named_buffers() if n.endswith("packed")),  # two 4-bit weights a byte
        "trainable_params": sum(p.numel() for p in trainable),
        "weights_bytes": weights,
        "weights_gb": weights / GB,
        "optimizer_state_bytes": tensor_bytes(state),
        "optimizer_state_gb": tensor_bytes(state) / GB,
        "peak_gb": torch.cuda.max_memory_allocated() / GB if device.type == "cuda" else None,
        "step_s_median": statistics.median(times),
        "step_s": times,
        "dequantize_max_abs_diff_vs_pytorch": kernel_check,
        "first_loss": first_loss,
        "losses": losses,
    }


def table(results: list[dict]) -> str:
    lines = ["| method | trainable params | weights GB | optimizer state GB | peak GB | step s (median) |",
             "|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['method']} | failed: {r['error']} | | | | |")
            continue
        peak = "n/a (CPU)" if r["peak_gb"] is None else f"{r['peak_gb']:.2f}"
        lines.append(f"| {r['method']} | {r['trainable_params']:,} | {r['weights_gb']:.3f} | "
                     f"{r['optimizer_state_gb']:.3f} | {peak} | {r['step_s_median']:.3f} |")
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up step")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="a tiny model and batch (CPU test of the whole path)")
    p.add_argument("--out", help="JSON file to write (default: benchmarks/results/peft_memory_<device>.json)")
    p.add_argument("--one", choices=METHODS, help=argparse.SUPPRESS)  # child process: run one method, print JSON
    args = p.parse_args(argv)
    if args.tiny:
        args.batch_size, args.seq_len, args.steps = min(args.batch_size, 2), min(args.seq_len, 32), 1
        args.rank = min(args.rank, 4)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    if args.one:
        print(json.dumps(run_one(args.one, args)))
        return {}
    results = []
    for method in args.methods:
        if torch.device(args.device).type == "cuda":  # a fresh process per method: clean allocator, clean peak
            child = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--methods" and a not in
                     METHODS]
            out = subprocess.run([sys.executable, __file__, *child, "--one", method], capture_output=True,
                                 text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            if out.returncode == 0:
                results.append(json.loads(out.stdout.strip().splitlines()[-1]))
            else:  # e.g. out of memory: keep the other methods' results and say why this one has none
                lines = out.stderr.strip().splitlines() or [f"exit code {out.returncode}"]
                results.append({"method": method, "error": lines[-1]})
                print(out.stderr[-3000:], file=sys.stderr)
        else:
            results.append(run_one(method, args))
        print(f"{method}: done", file=sys.stderr, flush=True)
    device = torch.cuda.get_device_name() if torch.device(args.device).type == "cuda" else "cpu"
    report = {"device": device, "model": "tiny" if args.tiny else "qwen2-1.5b-shape", "shape": TINY if args.tiny
              else QWEN2_1_5B, "batch_size": args.batch_size, "seq_len": args.seq_len, "rank": args.rank,
              "alpha": args.alpha, "targets": list(TARGETS), "gradient_checkpointing": args.gradient_checkpointing,
              "torch": torch.__version__, "results": results}
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / \
        f"peft_memory_{'tiny' if args.tiny else device.replace(' ', '_')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(table(results))
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
