"""Our FlashAttention-2 in real training: the training step of a cs336_basics model with each attention backend.

For each model shape (the 17M TinyStories preset and a ~125M shape: d_model 768, 12 layers, 12 heads) and
context (1024, 2048, 4096 at a fixed number of tokens per step), one step = forward + backward + gradient
clipping + our AdamW, fp32 weights under bf16 autocast, on random tokens; the backends' steps are timed in
alternating blocks so clock and host drift hit all alike. Then a short run per backend from the same
initialisation on the same batches (a synthetic corpus with repeated segments, so the loss falls) shows the
losses agree. Prints a table and writes JSON plus a Markdown table. Timings stop starting new (shape, context)
cells after --time-budget-s (default 280 s), so the whole run stays within about 6 minutes.

    PYTHONPATH=assignment1-basics:assignment2-systems python3 \
        assignment2-systems/benchmarks/attention_backend_training.py --out $OUT/attention_backend_training.json
    # CPU smoke test (tiny shapes, CPU-capable backends, a few steps)
    PYTHONPATH=assignment1-basics:assignment2-systems python3 \
        assignment2-systems/benchmarks/attention_backend_training.py --tiny --out /tmp/abt.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from cs336_basics.attention_backends import get_attention_backend
from cs336_basics.model import TransformerConfig, TransformerLM
from cs336_basics.nn_utils import cross_entropy
from cs336_basics.optim import AdamW, clip_gradients

SHAPES = {  # name -> TransformerConfig fields other than context_length
    "17m": dict(vocab_size=10_000, d_model=512, num_layers=4, num_heads=16, d_ff=1344),  # tinystories-17m
    "125m": dict(vocab_size=32_000, d_model=768, num_layers=12, num_heads=12, d_ff=2048),  # owt-leaderboard
    "tiny": dict(vocab_size=256, d_model=64, num_layers=2, num_heads=4, d_ff=128),
}


@dataclasses.dataclass
class Setting:
    device: torch.device
    precision: str  # "bf16" (autocast) or "fp32"
    compile: bool

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")


class Trainer:
    """One model + optimizer; `step(x, y)` is a full training step, returning the loss tensor."""

    def __init__(self, config: TransformerConfig, setting: Setting, lr: float = 1e-3, seed: int = 0):
        torch.manual_seed(seed)  # the same initial weights for every backend
        self.model = TransformerLM(config, device=setting.device)
        self.optimizer = AdamW(self.model.parameters(), lr=lr, weight_decay=0.1)
        self.forward = torch.compile(self.model) if setting.compile else self.model
        self.setting = setting

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with self.setting.autocast():
            loss = cross_entropy(self.forward(x), y)
        loss.backward()
        clip_gradients(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def timed(self, x: torch.Tensor, y: torch.Tensor, steps: int) -> list[float]:
        times = []
        for _ in range(steps):
            self.setting.sync()
            start = time.perf_counter()
            self.step(x, y)
            self.setting.sync()
            times.append(time.perf_counter() - start)
        return times


def model_config(shape: str, context: int, backend: str) -> TransformerConfig:
    return TransformerConfig(**SHAPES[shape], context_length=context, use_torch_sdpa=True, attention_backend=backend)


def time_backends(shape: str, context: int, batch: int, backends: list[str], setting: Setting, warmup: int,
                  steps: int, rounds: int = 3) -> list[dict]:
    """Median ms per step of each backend, timed in `rounds` alternating blocks after `warmup` steps each."""
    gen = torch.Generator(device=setting.device).manual_seed(0)
    vocab = SHAPES[shape]["vocab_size"]
    ids = torch.randint(0, vocab, (batch, context + 1), device=setting.device, generator=gen)
    x, y = ids[:, :-1], ids[:, 1:]
    trainers, rows = {}, {}
    for name in backends:
        row = rows[name] = {"shape": shape, "context": context, "batch": batch, "backend": name}
        try:
            if setting.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(setting.device)
                before = torch.cuda.memory_allocated(setting.device)
            trainer = Trainer(model_config(shape, context, name), setting)
            start = time.perf_counter()
            trainer.timed(x, y, warmup)  # compiles, autotunes, builds cuDNN plans
            row["warmup_s"] = time.perf_counter() - start
            if setting.device.type == "cuda":  # this model's weights, optimizer state and step activations
                row["peak_mem_gib"] = (torch.cuda.max_memory_allocated(setting.device) - before) / 2**30
            trainers[name] = trainer
        except Exception as e:  # one backend failing (no kernel for this shape, out of memory) leaves the others
            row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"
            print(f"  {name}: {row['error']}", flush=True)
    times = {name: [] for name in trainers}
    for _ in range(rounds):
        for name, trainer in trainers.items():
            times[name] += trainer.timed(x, y, max(1, steps // rounds))
    for name, t in times.items():
        median = statistics.median(t)
        rows[name].update(ms_per_step=median * 1e3, mean_ms=statistics.fmean(t) * 1e3,
                          std_ms=statistics.pstdev(t) * 1e3, tokens_per_s=batch * context / median,
                          steps=len(t))
    return list(rows.values())


def repeated_segments(vocab: int, batch: int, context: int, segment: int, gen: torch.Generator,
                      device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of one random segment repeated: after its first copy every token is predictable by attention."""
    seg = torch.randint(0, vocab, (batch, segment), generator=gen)
    ids = seg.repeat(1, -(-(context + 1) // segment))[:, : context + 1].to(device)
    return ids[:, :-1], ids[:, 1:]


def loss_runs(shape: str, context: int, batch: int, backends: list[str], setting: Setting, steps: int) -> dict:
    """Per backend: the loss at every step of a short run from the same weights on the same batches."""
    vocab = min(SHAPES[shape]["vocab_size"], 512)  # a small alphabet: the segments are learnable in a few steps
    losses = {}
    for name in backends:
        trainer = None
        try:
            trainer = Trainer(model_config(shape, context, name), setting, lr=3e-3)
            gen = torch.Generator().manual_seed(1)
            run = []
            for _ in range(steps):
                run.append(trainer.step(*repeated_segments(vocab, batch, context, 64, gen, setting.device)))
            losses[name] = [float(v) for v in run]
        except Exception as e:
            losses[name] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"
        del trainer
    return losses


def markdown(result: dict) -> str:
    backends = result["backends"]
    lines = [f"Training step (forward + backward + AdamW), {result['precision']}"
             f"{', compiled' if result['compile'] else ''}, {result['tokens_per_step']} tokens per step, "
             f"{result['device_name']}, torch {result['torch']}: ms per step (median), lower is better.", "",
             "| shape | context | batch | " + " | ".join(backends) + f" | {backends[0]} / best other |",
             "|---|---|---|" + "---|" * (len(backends) + 1)]
    keys = sorted({(r["shape"], r["context"], r["batch"]) for r in result["timing"]},
                  key=lambda k: (list(SHAPES).index(k[0]), k[1]))
    for shape, context, batch in keys:
        cells, ms = [], {}
        for name in backends:
            row = next(r for r in result["timing"]
                       if (r["shape"], r["context"], r["backend"]) == (shape, context, name))
            if "ms_per_step" in row:
                ms[name] = row["ms_per_step"]
                cells.append(f"{row['ms_per_step']:.2f}")
            else:
                cells.append("skipped" if row.get("skipped") else "failed")
        others = [v for k, v in ms.items() if k != backends[0]]
        ratio = f"{ms[backends[0]] / min(others):.3f}" if backends[0] in ms and others else "–"
        lines.append(f"| {shape} | {context} | {batch} | " + " | ".join(cells) + f" | {ratio} |")
    for key, runs in result["loss_runs"].items():
        ok = {k: v for k, v in runs["losses"].items() if isinstance(v, list)}
        lines += ["", f"Short run, {key}: {runs['steps']} steps from the same weights on the same batches "
                      f"(batch {runs['batch']}, lr 3e-3).", "",
                  "| backend | first loss | last loss | max abs. difference from " + backends[0] + " |",
                  "|---|---|---|---|"]
        ref = ok.get(backends[0])
        for name, v in runs["losses"].items():
            if not isinstance(v, list):
                lines.append(f"| {name} | failed | | |")
                continue
            diff = max(abs(a - b) for a, b in zip(v, ref, strict=True)) if ref else float("nan")
            lines.append(f"| {name} | {v[0]:.4f} | {v[-1]:.4f} | {diff:.2e} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON file; the Markdown table goes beside it (.md)")
    parser.add_argument("--shapes", nargs="+", default=None, choices=list(SHAPES))
    parser.add_argument("--contexts", nargs="+", type=int, default=None)
    parser.add_argument("--backends", nargs="+", default=None, help="the first is compared with the best other")
    parser.add_argument("--tokens-per-step", type=int, default=None, help="batch = this / context")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--loss-steps", type=int, default=None)
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--device", default=None)
    parser.add_argument("--time-budget-s", type=float, default=280.0,
                        help="skip the remaining timings once this much time has passed (the loss runs still run)")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny shape, CPU backends, few steps")
    args = parser.parse_args(argv)
    tiny = dict(shapes=["tiny"], contexts=[64, 128], backends=["cs336-fa2-torch", "sdpa-math", "sdpa"],
                tokens_per_step=512, warmup=1, steps=3, loss_steps=5, device="cpu")
    full = dict(shapes=["17m", "125m"], contexts=[1024, 2048, 4096], backends=["cs336-fa2", "sdpa-flash", "sdpa-cudnn"],
                tokens_per_step=32_768, warmup=3, steps=15, loss_steps=50, device="cuda")
    for key, value in (tiny if args.tiny else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for name in args.backends:
        get_attention_backend(name)  # an unknown name fails before anything runs
    setting = Setting(torch.device(args.device), args.precision, args.compile)
    if setting.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    started = time.perf_counter()
    timing = []
    for shape in args.shapes:
        for context in args.contexts:
            batch = max(1, args.tokens_per_step // context)
            if time.perf_counter() - started > args.time_budget_s:
                timing += [{"shape": shape, "context": context, "batch": batch, "backend": b, "skipped": True}
                           for b in args.backends]
                continue
            rows = time_backends(shape, context, batch, args.backends, setting, args.warmup, args.steps)
            timing += rows
            print(f"{shape:5s} ctx {context:5d} batch {batch:3d}  " + "  ".join(
                f"{r['backend']} {r['ms_per_step']:.2f} ms" if "ms_per_step" in r else f"{r['backend']} failed"
                for r in rows), flush=True)
    runs = {}
    for shape in args.shapes:
        context = min(args.contexts)
        batch = max(1, args.tokens_per_step // context // 2)
        losses = loss_runs(shape, context, batch, args.backends, setting, args.loss_steps)
        runs[f"{shape} ctx {context}"] = {"steps": args.loss_steps, "batch": batch, "losses": losses}
        print(f"loss after {args.loss_steps} steps ({shape}, ctx {context}): " + "  ".join(
            f"{k} {v[-1]:.4f}" if isinstance(v, list) else f"{k} failed" for k, v in losses.items()), flush=True)
    result = {"backends": args.backends, "precision": args.precision, "compile": args.compile,
              "tokens_per_step": args.tokens_per_step, "device": str(setting.device),
              "device_name": torch.cuda.get_device_name(setting.device) if setting.device.type == "cuda" else
              platform.processor() or "cpu", "torch": torch.__version__, "python": platform.python_version(),
              "elapsed_s": time.perf_counter() - started, "timing": timing, "loss_runs": runs}
    try:
        import triton

        result["triton"] = triton.__version__
    except ImportError:
        pass
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    table = markdown(result)
    out.with_suffix(".md").write_text(table)
    print("\n" + table)
    return result


if __name__ == "__main__":
    main()
