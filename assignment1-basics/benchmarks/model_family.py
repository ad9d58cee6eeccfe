"""Trains the model family on the project's generated corpus, one model after another on one device, for the
same token budget: tinystories-17m, llama3-gqa, mistral-swa, deepseek-v3-nano and tinystories-17m with Muon.

Writes JSON (validation loss against step and wall-clock, tokens/s, KV-cache bytes per token, active
parameters) and a two-panel figure. Needs only torch, numpy, einops, jaxtyping, regex, tqdm and matplotlib:

    PYTHONPATH=assignment1-basics python assignment1-basics/benchmarks/model_family.py --compile \\
        --out-dir /tmp/family --json results/model_family_h200.json --figure fig/model_family_h200.png

(2000 steps × 128 × 256 tokens per model, 1M generated stories ≈ 73M training tokens: under 3 minutes for all
five on one H200, compiled.)

`--tiny` shrinks every model (keeping what makes it its variant) and the corpus, for a CPU smoke test.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

from cs336_basics.corpus import prepare_encoded_corpus
from cs336_basics.model import TransformerLM
from cs336_basics.training import train
from cs336_basics.training.config import config_from_preset
from cs336_basics.training.metrics import read_jsonl

# (label, preset, overrides): the Muon run differs from the baseline in its optimizer only.
FAMILY = [
    ("tinystories-17m", "tinystories-17m", {}),
    ("llama3-gqa", "llama3-gqa", {}),
    ("mistral-swa", "mistral-swa", {}),
    ("deepseek-v3-nano", "deepseek-v3-nano", {}),
    ("tinystories-17m-muon", "tinystories-17m", {"optimizer": "muon"}),
]

# --tiny: small widths for every model; each variant keeps its distinguishing feature at a fitting size.
TINY = dict(d_model=32, num_layers=2, num_heads=4, d_ff=64, context_length=32, batch_size=4, eval_batches=2)
TINY_VARIANT = {"llama3-gqa": dict(num_kv_heads=2, d_ff=64), "mistral-swa": dict(num_kv_heads=2, sliding_window=8),
                "deepseek-v3-nano": dict(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                                         num_experts=4, moe_d_ff=16)}


def prepare_data(data_dir: str, num_stories: int, vocab_size: int, workers: int | None) -> tuple[str, str, int]:
    """The generated stories, a BPE trained on them and both splits encoded (as `quickstart` does)."""
    info = prepare_encoded_corpus(data_dir, num_stories, vocab_size, workers)
    for split in ("train", "val"):
        print(f"{split}: {info[f'{split}_tokens']:,} tokens", flush=True)
    return info["train_data"], info["val_data"], info["bpe_vocab"]


def kv_bytes_per_token(model_config) -> int:
    """Decoding-cache bytes one more token costs (all layers, bf16), measured from the model's own caches."""
    with torch.device("meta"):
        model = TransformerLM(model_config, dtype=torch.bfloat16)
    return model.new_kv_caches(1).bytes_per_token


def run_one(label: str, preset: str, overrides: dict, args, data: tuple[str, str, int]) -> dict:
    train_path, val_path, vocab_size = data
    settings = dict(train_data=train_path, val_data=val_path, out_dir=os.path.join(args.out_dir, label),
                    vocab_size=vocab_size, max_steps=args.steps, warmup_steps=max(1, args.steps // 20),
                    eval_interval=max(1, args.steps // args.evals), log_interval=max(1, args.steps // 50),
                    checkpoint_interval=args.steps, eval_batches=args.eval_batches, device=args.device,
                    compile=args.compile, overwrite=True, progress=False, seed=0)
    if args.batch_size:
        settings["batch_size"] = args.batch_size
    if args.tiny:
        settings.update(TINY, **TINY_VARIANT.get(preset, {}))
    config = config_from_preset(preset, **settings, **overrides)
    print(f"\n== {label}: {config.max_steps} steps × {config.tokens_per_step:,} tokens", flush=True)
    started = time.time()
    summary = train(config)
    records = read_jsonl(os.path.join(config.out_dir, "metrics.jsonl"))
    val = [r for r in records if r["split"] == "val"]
    speeds = [r["tokens_per_s"] for r in records if r["split"] == "train"][1:]  # the first includes compiling
    model_config = config.model_config()
    with torch.device("meta"):
        model = TransformerLM(model_config)
    result = {
        "label": label, "preset": preset, "overrides": overrides, "steps": config.max_steps,
        "tokens": config.max_steps * config.tokens_per_step, "val_step": [r["step"] for r in val],
        "val_wall_s": [r["wall_s"] for r in val], "val_loss": [r["loss"] for r in val],
        "final_val_loss": summary["val_loss"], "train_wall_s": summary["wall_s"],
        "run_s": time.time() - started, "tokens_per_s": statistics.median(speeds) if speeds else None,
        "kv_cache_bytes_per_token": kv_bytes_per_token(model_config),
        "active_params_non_embedding": model.num_active_parameters(include_embeddings=False),
        "params_non_embedding": model.num_parameters(include_embeddings=False),
        "skipped_steps": summary["skipped_steps"],
    }
    print(f"{label}: val loss {result['final_val_loss']:.4f}, {result['tokens_per_s'] or 0:,.0f} tok/s, "
          f"{result['kv_cache_bytes_per_token']:,} KV bytes/token, {result['run_s']:.0f}s", flush=True)
    return result


def draw(results: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cs336_basics.cli_support import save_figure

    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for r in results:
        by_step.plot(r["val_step"], r["val_loss"], marker=".", label=r["label"])
        by_time.plot(r["val_wall_s"], r["val_loss"], marker=".", label=r["label"])
    by_step.set(xlabel="step", ylabel="validation loss", title="against steps (same tokens per step)")
    by_time.set(xlabel="wall-clock (s, incl. compile and evaluation)", title="against wall-clock")
    for ax in (by_step, by_time):
        ax.grid(alpha=0.3)
    by_step.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000, help="training steps per model (same for all)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the presets' 128")
    parser.add_argument("--evals", type=int, default=20, help="validation points per run")
    parser.add_argument("--eval-batches", type=int, default=10)
    parser.add_argument("--num-stories", type=int, default=1_000_000, help="generated training stories")
    parser.add_argument("--vocab-size", type=int, default=2_000, help="BPE size (the corpus has few words)")
    parser.add_argument("--workers", type=int, default=None, help="BPE/encoding processes (default: cores)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--only", nargs="+", default=None, help="labels to run (default: all five)")
    parser.add_argument("--out-dir", default="runs/model_family", help="data and one run folder per model")
    parser.add_argument("--json", required=True, help="results file")
    parser.add_argument("--figure", required=True, help="two-panel figure (val loss vs steps, vs wall-clock)")
    parser.add_argument("--tiny", action="store_true", help="tiny models and corpus (a CPU smoke test)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.num_stories, args.vocab_size = min(args.num_stories, 300), min(args.vocab_size, 300)
    started = time.time()
    data = prepare_data(os.path.join(args.out_dir, "data"), args.num_stories, args.vocab_size, args.workers)
    data_s = time.time() - started
    family = [f for f in FAMILY if args.only is None or f[0] in args.only]
    results = [run_one(label, preset, overrides, args, data) for label, preset, overrides in family]
    device = "cpu"
    if torch.cuda.is_available() and args.device in ("auto", "cuda"):
        device = torch.cuda.get_device_name()
    report = {"device": device, "torch": torch.__version__, "python": platform.python_version(),
              "compile": args.compile, "steps": args.steps, "num_stories": args.num_stories,
              "vocab_size": data[2], "data_s": data_s, "total_s": time.time() - started, "runs": results}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(report, f, indent=2)
    draw(results, args.figure, f"generated stories, {args.steps} steps × {results[0]['tokens'] // args.steps:,} "
                               f"tokens, {device}{', compiled' if args.compile else ''}")
    print("\n| model | val loss | tokens/s | KV bytes/token | active non-emb. params |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['label']} | {r['final_val_loss']:.3f} | {r['tokens_per_s'] or 0:,.0f} | "
              f"{r['kv_cache_bytes_per_token']:,} | {r['active_params_non_embedding']:,} |")
    print(f"wrote {args.json} and {args.figure} in {report['total_s']:.0f}s", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
