"""The Hugging Face round trip as a user runs it: `quickstart`, then a few steps of each model-family preset on
its data, each run exported with `cs336-basics export-hf`, loaded by `transformers` (Auto classes, offline),
compared with our model on held-out text: logits (fp32) and the tokenizer's ids.

    uv run python assignment1-basics/benchmarks/hf_roundtrip.py --work-dir /tmp/hf_roundtrip \\
        --json assignment1-basics/benchmarks/results/hf_roundtrip.json

Prints a table and writes JSON. CPU is enough (about 3 minutes on two cores). Needs `transformers`.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import torch

PRESETS = ("llama3-gqa", "mistral-swa", "deepseek-v3-nano")
EOS = "<|endoftext|>"
# Beyond the stories: characters the generated corpus never has, runs of whitespace, the special token.
EXTRA_TEXT = f"Zoë's café — naïve 😀 tests!\n\n\t  spaced   out {EOS} 12345 + 67 = 67412?"


def cli(*args: str) -> None:
    command = [sys.executable, "-m", "cs336_basics", *args]
    print("$ cs336-basics " + " ".join(args), flush=True)
    subprocess.run(command, check=True)


def held_out_text(quickstart_dir: str, chars: int) -> str:
    with open(os.path.join(quickstart_dir, "data", "val.txt"), encoding="utf-8") as f:
        return f.read()[-chars:] + EXTRA_TEXT  # the end of the validation split: never trained on


def compare(run_dir: str, tokenizer_dir: str, hf_dir: str, text: str, context: int) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cs336_basics.artifacts import load_tokenizer, load_trained_model

    ours_tokenizer = load_tokenizer(tokenizer_dir, [EOS])
    hf_tokenizer = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    our_ids = ours_tokenizer.encode(text)
    hf_ids = hf_tokenizer(text, add_special_tokens=False)["input_ids"]
    model = load_trained_model(run_dir, device="cpu").float()
    hf_model = AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True, dtype=torch.float32).eval()
    ids = torch.tensor([our_ids[-context:]])
    with torch.no_grad():
        ours, theirs = model(ids), hf_model(ids).logits
    return {
        "hf_architecture": hf_model.config.architectures[0],
        "tokens_compared": len(our_ids),
        "ids_equal": our_ids == hf_ids,
        "decode_equal": hf_tokenizer.decode(hf_ids) == text,
        "positions": ids.shape[1],
        "max_abs_logit_diff": (ours - theirs).abs().max().item(),
        "max_abs_logit": ours.abs().max().item(),
        "argmax_agreement": (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", required=True, help="a new folder for the runs and exports")
    parser.add_argument("--quickstart-steps", type=int, default=400, help="the quickstart's own default is 400")
    parser.add_argument("--preset-steps", type=int, default=5)
    parser.add_argument("--preset-batch-size", type=int, default=8)
    parser.add_argument("--held-out-chars", type=int, default=1500)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if os.path.exists(args.work_dir):
        parser.error(f"--work-dir {args.work_dir} exists; pick a new folder")
    started = time.perf_counter()
    quick = os.path.join(args.work_dir, "quickstart")
    cli("quickstart", "--out-dir", quick, "--steps", str(args.quickstart_steps), "--device", "cpu")
    tokenizer_dir = os.path.join(quick, "tokenizer")
    with open(os.path.join(tokenizer_dir, "vocab.json"), encoding="utf-8") as f:
        vocab_size = len(json.load(f))
    runs = {"quickstart": os.path.join(quick, "run")}
    for preset in PRESETS:
        runs[preset] = os.path.join(args.work_dir, preset)
        cli("train", "--preset", preset, "--train-data", os.path.join(quick, "data", "train.npy"),
            "--val-data", os.path.join(quick, "data", "val.npy"), "--vocab-size", str(vocab_size),
            "--max-steps", str(args.preset_steps), "--batch-size", str(args.preset_batch_size),
            "--warmup-steps", "1", "--eval-interval", str(args.preset_steps), "--eval-batches", "2",
            "--device", "cpu", "--no-progress", "--out-dir", runs[preset])
    text = held_out_text(quick, args.held_out_chars)
    rows = []
    for name, run_dir in runs.items():
        hf_dir = os.path.join(args.work_dir, "hf", name)
        cli("export-hf", "--run-dir", run_dir, "--tokenizer", tokenizer_dir, "--out", hf_dir)
        from cs336_basics.artifacts import load_trained_model

        context = load_trained_model(run_dir, device="cpu").config.context_length
        rows.append({"run": name, **compare(run_dir, tokenizer_dir, hf_dir, text, context)})
    print(f"\n{'run':<18} {'HF class':<24} {'tokens':>6} {'ids equal':>9} {'max |Δlogit|':>13} {'argmax agree':>12}")
    for r in rows:
        print(f"{r['run']:<18} {r['hf_architecture']:<24} {r['tokens_compared']:>6} {r['ids_equal']!s:>9} "
              f"{r['max_abs_logit_diff']:>13.2e} {r['argmax_agreement']:>12.3f}")
    result = {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
              "python": platform.python_version(), "quickstart_steps": args.quickstart_steps,
              "preset_steps": args.preset_steps, "seconds": round(time.perf_counter() - started, 1), "rows": rows}
    if args.json:
        from cs336_basics.cli_support import atomic_write

        with atomic_write(args.json) as f:
            json.dump(result, f, indent=2)
    failed = [r["run"] for r in rows if not (r["ids_equal"] and r["decode_equal"] and r["max_abs_logit_diff"] < 1e-3)]
    if failed:
        sys.exit(f"round trip failed for {failed}")


if __name__ == "__main__":
    main()
