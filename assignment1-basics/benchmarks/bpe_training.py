"""Wall time of our `train_bpe` against HuggingFace `tokenizers`' BPE trainer on the same file, same run.

    uv run python assignment1-basics/benchmarks/bpe_training.py --input corpus.en --vocab-size 500 \
        --out assignment1-basics/benchmarks/results/bpe_training_corpus_en.json
"""

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from importlib.metadata import version

from cs336_basics.tokenizer import train_bpe
from cs336_basics.tokenizer.pretokenize import available_cpus
from cs336_basics.tokenizer.serialization import str_to_token


def machine_info() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in _lines("/proc/cpuinfo") if line.startswith("model name")), "")
    return {
        "cpu": cpu or platform.processor(),
        "cpus_available": available_cpus(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {name: version(name) for name in ("cs336-basics", "tokenizers", "tiktoken", "regex")},
        "load_average_1m_at_start": os.getloadavg()[0],
    }


def _lines(path: str) -> list[str]:
    try:
        with open(path) as f:
            return f.readlines()
    except OSError:
        return []


def timed(fn: Callable[[], object], repeats: int) -> tuple[dict, object]:
    """Runs `fn` `repeats` times; returns wall-time stats and the last result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return {"runs_s": [round(t, 4) for t in times], "best_s": min(times), "median_s": statistics.median(times)}, result


def train_hf(path: str, vocab_size: int, special_tokens: list[str]) -> list[tuple[bytes, bytes]]:
    """HF BPE with a byte-level pre-tokenizer (GPT-2 regex, no prefix space) and all 256 bytes in the alphabet."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train([path], trainer)
    merges = json.loads(tokenizer.to_str())["model"]["merges"]  # pairs of GPT-2 byte-mapped strings
    return [(str_to_token(left), str_to_token(right)) for left, right in merges]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="UTF-8 training text")
    parser.add_argument("--vocab-size", type=int, default=500)
    parser.add_argument("--special-token", action="append", help="repeatable (default: <|endoftext|>)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--num-workers", type=int, default=None, help="our pre-token counting processes (auto)")
    parser.add_argument("--out", help="write the results here as JSON")
    args = parser.parse_args()
    special_tokens = args.special_token or ["<|endoftext|>"]
    machine = machine_info()  # before the runs, so the load average is what they started under

    ours, (vocab, merges) = timed(
        lambda: train_bpe(args.input, args.vocab_size, special_tokens, num_workers=args.num_workers), args.repeats
    )
    hf, hf_merges = timed(lambda: train_hf(args.input, args.vocab_size, special_tokens), args.repeats)
    ours.update(vocab_size=len(vocab), merges=len(merges))
    hf.update(merges=len(hf_merges), threads=os.environ.get("RAYON_NUM_THREADS", f"all ({available_cpus()})"))
    # HF breaks count ties differently, so the lists diverge after the first tie but mostly hold the same merges.
    same_prefix = next((i for i, (a, b) in enumerate(zip(merges, hf_merges, strict=False)) if a != b), len(merges))
    hf.update(merges_in_common_with_ours=len(set(merges) & set(hf_merges)), identical_prefix=same_prefix)
    result = {
        "benchmark": "bpe_training",
        "input": os.path.basename(args.input),
        "input_bytes": os.path.getsize(args.input),
        "vocab_size": args.vocab_size,
        "special_tokens": special_tokens,
        "repeats": args.repeats,
        "ours": ours,
        "hf_tokenizers": hf,
        "ours_over_hf_best": ours["best_s"] / hf["best_s"],
        "ours_over_hf_median": ours["median_s"] / hf["median_s"],
        "machine": machine,
    }
    print(f"{'trainer':<16}{'best s':>10}{'median s':>10}{'merges':>8}")
    for name, stats in (("ours", ours), ("hf tokenizers", hf)):
        print(f"{name:<16}{stats['best_s']:>10.3f}{stats['median_s']:>10.3f}{stats['merges']:>8}")
    print(f"our time / HF's: {result['ours_over_hf_best']:.2f} (best), {result['ours_over_hf_median']:.2f} (median)")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
