"""Single-process encoding throughput of our Tokenizer against tiktoken built on the same ranks.

The tokenizer is trained on --train-input (default: the text itself) or loaded from --vocab/--merges (GPT-2
style files). tiktoken gets our ids as ranks, so both must produce identical ids; the script checks it. A text
shorter than --min-mb is repeated up to that size, which favours our per-instance pre-token cache over
tiktoken (which has none) once the first copy is through; the JSON records the repeat count and our cache
hit rate.

    uv run python assignment1-basics/benchmarks/tokenizer_throughput.py --text corpus.en \
        --out assignment1-basics/benchmarks/results/tokenizer_throughput_corpus_en.json
"""

import argparse
import json
import os

import tiktoken
from bpe_training import machine_info, timed

from cs336_basics.tokenizer import Tokenizer, load_merges, load_vocab, train_bpe
from cs336_basics.tokenizer.pretokenize import GPT2_PATTERN


def tiktoken_on_same_ranks(vocab: dict[int, bytes], special_tokens: list[str]) -> tiktoken.Encoding:
    specials = {token.encode("utf-8") for token in special_tokens}
    ranks = {token: i for i, token in vocab.items() if token not in specials}
    if len(ranks) + len(specials) != len(vocab):
        raise ValueError("the vocab has duplicate byte strings, so tiktoken ranks would be ambiguous")
    ids = {token: i for i, token in vocab.items()}
    special_ids = {token: ids[token.encode("utf-8")] for token in special_tokens}
    return tiktoken.Encoding(name="same-ranks", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens=special_ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", required=True, help="UTF-8 text to encode")
    parser.add_argument("--train-input", help="train on this file (default: --text)")
    parser.add_argument("--vocab-size", type=int, default=1000, help="when training")
    parser.add_argument("--vocab", help="GPT-2 style vocab.json to load instead of training")
    parser.add_argument("--merges", help="GPT-2 style merges.txt to load instead of training")
    parser.add_argument("--special-token", action="append", help="repeatable (default: <|endoftext|>)")
    parser.add_argument("--min-mb", type=float, default=8.0, help="repeat the text up to at least this many MB")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", help="write the results here as JSON")
    args = parser.parse_args()
    special_tokens = args.special_token or ["<|endoftext|>"]
    machine = machine_info()  # before the runs, so the load average is what they started under

    if args.vocab or args.merges:
        if not (args.vocab and args.merges):
            parser.error("--vocab and --merges go together")
        vocab, merges = load_vocab(args.vocab), load_merges(args.merges)
        source = {"loaded": [os.path.basename(args.vocab), os.path.basename(args.merges)]}
    else:
        train_input = args.train_input or args.text
        vocab, merges = train_bpe(train_input, args.vocab_size, special_tokens)
        source = {"trained_on": os.path.basename(train_input), "vocab_size": args.vocab_size}
    # Special tokens missing from a loaded vocab get ids the same way the Tokenizer assigns them.
    vocab = Tokenizer(vocab, merges, special_tokens).vocab
    reference = tiktoken_on_same_ranks(vocab, special_tokens)

    with open(args.text, encoding="utf-8") as f:
        original = f.read()
    copies = max(1, -(-int(args.min_mb * 1e6) // max(1, len(original.encode("utf-8")))))
    text = original * copies
    num_bytes = len(text.encode("utf-8"))

    tokenizers: list[Tokenizer] = []

    def encode_ours() -> list[int]:
        tokenizers.append(Tokenizer(vocab, merges, special_tokens))  # a cold cache every run
        return tokenizers[-1].encode(text)

    ours, ids = timed(encode_ours, args.repeats)
    theirs, reference_ids = timed(lambda: reference.encode(text, allowed_special="all"), args.repeats)
    if ids != reference_ids:
        first = next(i for i, (a, b) in enumerate(zip(ids, reference_ids, strict=False)) if a != b)
        raise SystemExit(f"ids differ from tiktoken at position {first}")
    cache = tokenizers[-1].cache_info()
    for stats in (ours, theirs):
        stats["best_mb_per_s"] = num_bytes / 1e6 / stats["best_s"]
        stats["median_mb_per_s"] = num_bytes / 1e6 / stats["median_s"]
    ours["cache_hit_rate"] = cache.hits / max(1, cache.hits + cache.misses)
    result = {
        "benchmark": "tokenizer_throughput",
        "text": {
            "file": os.path.basename(args.text),
            "file_bytes": len(original.encode("utf-8")),
            "copies": copies,
            "encoded_bytes": num_bytes,
            "note": "the file concatenated `copies` times to reach --min-mb" if copies > 1 else "the file as is",
        },
        "tokenizer": {**source, "vocab_size": len(vocab), "merges": len(merges), "special_tokens": special_tokens},
        "tokens": len(ids),
        "ids_identical": True,
        "repeats": args.repeats,
        "ours": ours,
        "tiktoken": theirs,
        "ours_over_tiktoken_best": ours["best_mb_per_s"] / theirs["best_mb_per_s"],
        "machine": machine,
    }
    print(f"{num_bytes / 1e6:.1f} MB ({copies} x {os.path.basename(args.text)}), {len(ids)} tokens, ids identical")
    print(f"{'encoder':<10}{'best MB/s':>11}{'median MB/s':>13}")
    for name, stats in (("ours", ours), ("tiktoken", theirs)):
        print(f"{name:<10}{stats['best_mb_per_s']:>11.2f}{stats['median_mb_per_s']:>13.2f}")
    hit_rate = f"{100 * ours['cache_hit_rate']:.1f}%"
    print(f"ours / tiktoken: {result['ours_over_tiktoken_best']:.2f}x (best); our pre-token cache hit rate {hit_rate}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
