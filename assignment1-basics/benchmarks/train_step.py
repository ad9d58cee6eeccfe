"""Training-step time of two models side by side, eager and compiled.

`--compare hf-llama` (default): our TransformerLM vs the same network built from HF transformers'
LlamaForCausalLM. `--compare moe-dense`: deepseek-v3-nano (MLA + MoE) vs the dense model with equal active
parameters: the same MLA attention with a SwiGLU of width d_ff = (top_k + shared experts) · moe_d_ff (needs
no transformers). Both models get the same dtype policy (fp32 weights, bf16 autocast), loss, optimizer (our
AdamW) and compile setting; one step = forward + backward + clip + AdamW (+ the MoE bias update).

    python assignment1-basics/benchmarks/train_step.py --out assignment1-basics/benchmarks/results/train_step_h100.json
    PYTHONPATH=assignment1-basics python assignment1-basics/benchmarks/train_step.py --compare moe-dense \
        --preset deepseek-v3-nano --batch-size 128 --out moe_step.json
"""

import argparse
import dataclasses
import json
import platform
import time

import torch

from cs336_basics.cli_support import save_figure
from cs336_basics.model import TransformerLM
from cs336_basics.nn_utils import cross_entropy
from cs336_basics.optim import AdamW, clip_gradients
from cs336_basics.training.config import config_from_preset
from cs336_basics.training.metrics import peak_flops, training_flops_per_token


def build_llama(model_config, device):
    import transformers

    c = model_config
    config = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.d_ff, num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads, num_key_value_heads=c.num_heads, max_position_embeddings=c.context_length,
        rms_norm_eps=c.rmsnorm_eps, rope_theta=c.rope_theta, tie_word_embeddings=False, attention_bias=False,
        mlp_bias=False, attn_implementation="sdpa")
    return transformers.LlamaForCausalLM(config).to(device)


class Runner:
    """One model with its optimizer; `run(n)` times n full training steps (synchronised, seconds each)."""

    def __init__(self, forward, model, batch, compile_model: bool):
        self.model, self.batch = model, batch
        self.optimizer = AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
        self.forward = torch.compile(forward) if compile_model else forward
        self.moe_layers = model.moe_layers() if hasattr(model, "moe_layers") else []

    def run(self, steps: int) -> list[float]:
        x, y = self.batch
        times = []
        for _ in range(steps):
            torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = cross_entropy(self.forward(x), y)
            loss.backward()
            clip_gradients(self.model.parameters(), 1.0)
            self.optimizer.step()
            for moe in self.moe_layers:
                moe.update_bias(1e-3)
            self.optimizer.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return times


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compare", choices=["hf-llama", "moe-dense"], default="hf-llama")
    parser.add_argument("--preset", default=None, help="default: tinystories-17m (hf-llama), deepseek-v3-nano")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--out", required=True)
    parser.add_argument("--figure", default=None)
    parser.add_argument("--profile", action="store_true", help="print the top ops of one eager step per model")
    args = parser.parse_args()
    args.preset = args.preset or ("tinystories-17m" if args.compare == "hf-llama" else "deepseek-v3-nano")
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = True
    device = torch.device("cuda")
    config = config_from_preset(args.preset, batch_size=args.batch_size, use_torch_sdpa=True)
    mc = config.model_config()
    names = ("ours", "hf-llama") if args.compare == "hf-llama" else ("moe", "dense-equal-active")
    if args.compare == "moe-dense" and mc.ffn != "moe":
        raise SystemExit(f"--compare moe-dense needs a preset with ffn='moe', not {args.preset}")
    dense = dataclasses.replace(mc, ffn="swiglu", d_ff=(mc.moe_top_k + mc.num_shared_experts) * mc.moe_d_ff)
    gen = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, mc.vocab_size, (args.batch_size, mc.context_length + 1), device=device, generator=gen)
    batch = (ids[:, :-1], ids[:, 1:])
    tokens = args.batch_size * mc.context_length
    peak = peak_flops(device, "bf16", True)
    rows = []
    for compile_model in (False, True):
        runners = {}
        for name in names:
            torch.manual_seed(0)
            if name != "hf-llama":
                model = TransformerLM(dense if name == "dense-equal-active" else mc, device=device)
                flops = training_flops_per_token(model)
                runners[name] = Runner(model, model, batch, compile_model)
            else:
                model = build_llama(mc, device)
                runners[name] = Runner(lambda x, m=model: m(input_ids=x).logits, model, batch, compile_model)
            runners[name].run(args.warmup)
        # Alternate blocks of steps so that clock or host-load drift hits both models alike.
        times = {name: [] for name in runners}
        rounds = 5
        for _ in range(rounds):
            for name, runner in runners.items():
                times[name] += runner.run(max(1, args.steps // rounds))
        for name, runner in runners.items():
            if args.profile and not compile_model:
                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    runner.run(3)
                print(name, prof.key_averages().table(sort_by="cpu_time_total", row_limit=18))
            t = times[name]
            mean = sum(t) / len(t)
            std = (sum((v - mean) ** 2 for v in t) / len(t)) ** 0.5
            median = sorted(t)[len(t) // 2]
            row = {"model": name, "compile": compile_model, "ms_per_step": median * 1e3, "mean_ms": mean * 1e3,
                   "std_ms": std * 1e3, "tokens_per_s": tokens / median,
                   "mfu": tokens / median * flops / peak if peak else None,
                   "params": sum(p.numel() for p in runner.model.parameters())}
            if isinstance(runner.model, TransformerLM):
                row["active_params_non_embedding"] = runner.model.num_active_parameters(include_embeddings=False)
            rows.append(row)
            print(f"{name:18s} compile={compile_model!s:5s} median {row['ms_per_step']:7.2f} ms "
                  f"(mean {mean * 1e3:.2f} ± {row['std_ms']:.2f})  "
                  f"{row['tokens_per_s']:,.0f} tok/s  MFU {row['mfu'] or 0:.1%}", flush=True)
        del runners
        torch.cuda.empty_cache()
    ratios = {}
    for compile_model in (False, True):
        first, second = (next(r for r in rows if r["model"] == m and r["compile"] == compile_model) for m in names)
        ratios[f"compile={compile_model}"] = first["ms_per_step"] / second["ms_per_step"]
    print(f"{names[0]} / {names[1]} step time:", {k: round(v, 3) for k, v in ratios.items()})
    print("\n| model | eager ms | compiled ms |\n|---|---|---|")
    for name in names:
        eager, comp = (next(r for r in rows if r["model"] == name and r["compile"] == c) for c in (False, True))
        print(f"| {name} | {eager['ms_per_step']:.2f} | {comp['ms_per_step']:.2f} |")
    result = {"compare": args.compare, "preset": args.preset, "batch_size": args.batch_size,
              "context_length": mc.context_length,
              "device": torch.cuda.get_device_name(device), "torch": torch.__version__,
              "python": platform.python_version(), "flops_per_token": flops, "peak_flops": peak,
              "rows": rows, f"{names[0]}_over_{names[1]}": ratios}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    if args.figure:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        labels = [f"{r['model']}\n{'compiled' if r['compile'] else 'eager'}" for r in rows]
        bars = ax.bar(labels, [r["ms_per_step"] for r in rows], color=["C0", "C1", "C0", "C1"])
        ax.bar_label(bars, fmt="%.1f ms")
        ax.set_ylabel("ms per training step")
        ax.set_title(f"{args.preset}, batch {args.batch_size}×{mc.context_length}, bf16, {result['device']}",
                     fontsize=9)
        fig.tight_layout()
        save_figure(fig, args.figure)


if __name__ == "__main__":
    main()
