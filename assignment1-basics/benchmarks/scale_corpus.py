"""A seeded, streamed text corpus at the real corpora's size, for measuring tokenizer training and encoding.

    uv run python assignment1-basics/benchmarks/scale_corpus.py --out /tmp/scale/corpus_2.1g.txt --gb 2.1

Pre-token statistics in the spirit of web and story text: a Zipf-like word distribution (exponent `--zipf`) over
`--words` distinct types (the ~180 commonest English function words at the top ranks, then generated
syllable words in lower case and capitalised, accented Latin, Cyrillic, Greek and CJK words, and numbers:
integers, decimals, years, thousands with commas), sentences of 5-35 words ending in . ! ? or a paragraph break,
commas, semicolons, quotes, contractions ('s 't 'll), and `<|endoftext|>` between documents of ~40-600 words
(each document on its own lines, as TinyStories does). The same seed and size give the same bytes.

Memory is one block of `BLOCK_WORDS` words (a few tens of MB) whatever the size; the file is written as it goes
and ends at a document boundary just past the requested size.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

EOT = "<|endoftext|>"
BLOCK_WORDS = 1 << 20

COMMON_WORDS = (
    "the of and to a in is was he she it that for on with as his her they at be this from by had not are but "
    "or have an one all were we when there can your which their said if do will each about how up out them then "
    "many some so these would other into has more two time like no could see him been who its now my than first "
    "did people over down day way did get come made may part after back little only round man year came show "
    "every good me give our under name very through just form much great think say help low line before turn "
    "cause same mean differ move right boy old too does tell sentence set three want air well also play small "
    "end put home read hand port large spell add even land here must big high such follow act why ask men "
    "change went light kind off need house picture try us again animal point mother world near build self earth "
    "father head stand own page should country found answer school grow study still learn plant cover food sun "
    "four thought let keep eye never last door between city tree cross since hard start might story saw far sea"
)
COMMON = COMMON_WORDS.split(" ")
ONSETS = ["", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z", "br",
          "ch", "cl", "cr", "dr", "fl", "fr", "gl", "gr", "pl", "pr", "sc", "sh", "sl", "sm", "sn", "sp", "st",
          "str", "th", "tr", "wh"]
NUCLEI = ["a", "e", "i", "o", "u", "ai", "ea", "ee", "ie", "oo", "ou", "y"]
CODAS = ["", "", "", "n", "r", "s", "t", "l", "m", "nd", "ng", "nt", "rt", "st", "ck", "sh", "th", "x"]
ACCENTED = list("éèêëàâäôöûüùçñåøæßíóúãõ")
CYRILLIC = list("абвгдежзийклмнопрстуфхцчшщыьэюя")
GREEK = list("αβγδεζηθικλμνξοπρστυφχψω")
CJK_FIRST, CJK_LAST = 0x4E00, 0x9FA5


def build_vocabulary(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """`size` distinct word types by Zipf rank (plain form, sentence-initial form), deterministic for the rng."""
    seen: set[str] = set()
    words: list[str] = []

    def add(word: str) -> None:
        if word not in seen:
            seen.add(word)
            words.append(word)

    for word in COMMON:
        add(word)
    n_numbers, n_foreign = size // 25, size // 10
    tail: list[str] = []
    tail_seen = set(seen)
    syllables = [o + n + c for o in ONSETS for n in NUCLEI for c in CODAS]
    while len(tail) < size - len(words) - n_numbers - n_foreign:
        k = int(rng.choice(3, p=(0.3, 0.5, 0.2))) + 1
        word = "".join(syllables[i] for i in rng.integers(0, len(syllables), k))
        if rng.random() < 0.08:
            word = word.capitalize()  # names and proper nouns keep their capital mid-sentence
        if word not in tail_seen:
            tail_seen.add(word)
            tail.append(word)
    foreign: list[str] = []
    while len(foreign) < n_foreign:
        kind = rng.random()
        if kind < 0.4:  # accented Latin: a generated word with one or two letters swapped for accented ones
            word = list("".join(syllables[i] for i in rng.integers(0, len(syllables), int(rng.integers(1, 3)))))
            for _ in range(int(rng.integers(1, 3))):
                word[int(rng.integers(0, len(word)))] = ACCENTED[int(rng.integers(0, len(ACCENTED)))]
            word = "".join(word)
        elif kind < 0.7:
            word = "".join(CYRILLIC[i] for i in rng.integers(0, len(CYRILLIC), int(rng.integers(2, 10))))
        elif kind < 0.85:
            word = "".join(GREEK[i] for i in rng.integers(0, len(GREEK), int(rng.integers(2, 9))))
        else:
            word = "".join(chr(c) for c in rng.integers(CJK_FIRST, CJK_LAST, int(rng.integers(1, 4))))
        if word not in tail_seen:
            tail_seen.add(word)
            foreign.append(word)
    numbers: list[str] = []
    while len(numbers) < n_numbers:
        kind = rng.random()
        if kind < 0.4:
            word = str(int(rng.integers(0, 1000)))
        elif kind < 0.6:
            word = str(int(rng.integers(1700, 2030)))
        elif kind < 0.8:
            word = f"{rng.integers(0, 1000)}.{rng.integers(0, 100)}"
        else:
            word = f"{rng.integers(1, 1000)},{rng.integers(0, 1000):03d}"
        if word not in tail_seen:
            tail_seen.add(word)
            numbers.append(word)
    rest = np.array(tail + foreign + numbers, dtype=object)
    rng.shuffle(rest)  # the kinds are interleaved over the ranks
    plain = np.array(words + list(rest), dtype=object)
    initial = np.array([w[:1].upper() + w[1:] for w in plain], dtype=object)
    return plain, initial


def zipf_cdf(size: int, exponent: float, offset: float = 2.7) -> np.ndarray:
    """Cumulative Zipf-Mandelbrot probabilities p(r) ~ 1 / (r + offset)^exponent over ranks 1..size."""
    weights = 1.0 / (np.arange(1, size + 1) + offset) ** exponent
    cdf = np.cumsum(weights)
    return cdf / cdf[-1]


def generate_blocks(seed: int, words: int, zipf: float, doc_words: float,
                    block_words: int = BLOCK_WORDS) -> tuple[dict, object]:
    """(vocabulary info, an endless iterator of text blocks); every block ends at a document boundary."""
    rng = np.random.default_rng(seed)
    plain, initial = build_vocabulary(rng, words)
    cdf = zipf_cdf(len(plain), zipf)
    info = {"word_types": len(plain), "zipf_exponent": zipf, "seed": seed, "mean_doc_words": doc_words}

    def blocks():
        while True:
            n = block_words
            ids = np.searchsorted(cdf, rng.random(n))
            # sentence ends: lengths 3..30 words; a document ends after a sentence with prob. 1 / sentences/doc
            lengths = rng.integers(5, 36, n // 5 + 8)
            ends = np.cumsum(lengths)
            ends = ends[ends < n] - 1
            ends = np.append(ends, n - 1)
            starts = np.zeros(n, dtype=bool)
            starts[0] = True
            starts[ends[:-1] + 1] = True
            out = np.where(starts, initial[ids], plain[ids])
            # contractions and quotes on a few words
            r = rng.random(n)
            out[r < 0.006] = out[r < 0.006] + "'s"
            mask = (r >= 0.006) & (r < 0.008)
            out[mask] = out[mask] + "n't"
            mask = (r >= 0.008) & (r < 0.009)
            out[mask] = out[mask] + "'ll"
            mask = (r >= 0.009) & (r < 0.014)
            out[mask] = '"' + out[mask]
            sep = np.full(n, " ", dtype=object)
            r = rng.random(n)
            sep[r < 0.045] = ", "
            sep[(r >= 0.045) & (r < 0.05)] = "; "
            sep[(r >= 0.05) & (r < 0.053)] = ": "
            sep[(r >= 0.053) & (r < 0.055)] = " - "
            sep[(r >= 0.055) & (r < 0.058)] = " ("
            r = rng.random(len(ends))
            sentence_sep = np.where(r < 0.8, ". ", np.where(r < 0.86, "! ", np.where(r < 0.92, "? ", ".\n")))
            sentences_per_doc = doc_words / 20.0
            doc_end = rng.random(len(ends)) < 1.0 / sentences_per_doc
            doc_end[-1] = True
            sentence_sep = np.where(doc_end, ".\n" + EOT + "\n", sentence_sep)
            sep[ends] = sentence_sep
            # the word after a document end also starts a sentence (already capitalised); the "(" opener gets
            # its closing bracket on the next separator
            open_paren = np.flatnonzero(sep == " (")
            close = open_paren + 1
            close = close[close < n]
            sep[close] = np.where(sep[close] == " ", ") ", sep[close])
            parts = np.empty(2 * n, dtype=object)
            parts[0::2] = out
            parts[1::2] = sep
            yield "".join(parts.tolist())

    return info, blocks()


def write_corpus(path: str, size_bytes: int, seed: int = 0, words: int = 600_000, zipf: float = 1.07,
                 doc_words: float = 220.0, progress: bool = True, block_words: int = BLOCK_WORDS) -> dict:
    """Writes at least `size_bytes` of UTF-8 text (whole documents) to `path`; returns a summary."""
    info, blocks = generate_blocks(seed, words, zipf, doc_words, block_words)
    start = time.perf_counter()
    written = 0
    tmp = path + ".part"
    with open(tmp, "wb") as f:
        for block in blocks:
            data = block.encode("utf-8")
            if written + len(data) > size_bytes:  # cut the last block at the first document end past the size
                cut = data.find(b"\n" + EOT.encode() + b"\n", size_bytes - written)
                data = data if cut < 0 else data[: cut + len(EOT) + 2]
            f.write(data)
            written += len(data)
            if progress:
                print(f"\r{written / 1e9:.2f} / {size_bytes / 1e9:.2f} GB", end="", file=sys.stderr)
            if written >= size_bytes:
                break
    os.replace(tmp, path)
    if progress:
        print(file=sys.stderr)
    return {**info, "path": path, "bytes": written, "seconds": round(time.perf_counter() - start, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--gb", type=float, required=True, help="size in GB (1e9 bytes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--words", type=int, default=600_000, help="distinct word types")
    p.add_argument("--zipf", type=float, default=1.07, help="Zipf exponent of the word distribution")
    p.add_argument("--doc-words", type=float, default=220.0, help="mean words per document")
    args = p.parse_args(argv)
    summary = write_corpus(args.out, int(args.gb * 1e9), args.seed, args.words, args.zipf, args.doc_words)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
