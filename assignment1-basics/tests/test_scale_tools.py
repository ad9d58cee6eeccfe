"""The scale benchmarks' tools: the seeded corpus generator (benchmarks/scale_corpus.py) and the encoder paths
the measurements changed (ids in batches; .npy assembled from part files in blocks; one tokenizer per worker)."""

import importlib.util
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from cs336_basics.encode import encode_file
from cs336_basics.tokenizer import Tokenizer, train_bpe
from cs336_basics.tokenizer.pretokenize import PRETOKEN_RE

EOT = "<|endoftext|>"
BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    scale = _load("scale_corpus")
    root = tmp_path_factory.mktemp("scale")
    a, b = root / "a.txt", root / "b.txt"
    summary = scale.write_corpus(str(a), 3_000_000, seed=1, words=30_000, progress=False, block_words=1 << 16)
    scale.write_corpus(str(b), 3_000_000, seed=1, words=30_000, progress=False, block_words=1 << 16)
    return a, b, summary


def test_corpus_is_seeded_sized_and_web_like(corpus):
    a, b, summary = corpus
    data = a.read_bytes()
    assert data == b.read_bytes()  # same seed, same bytes
    assert 3_000_000 <= len(data) == summary["bytes"] < 3_000_000 + 100_000 and data.endswith((EOT + "\n").encode())
    text = data.decode("utf-8")
    docs = text.split(EOT)
    assert len(docs) > 1000 and all(d.strip() for d in docs[:-1])
    counts = Counter(PRETOKEN_RE.findall(text.replace(EOT, " ")))
    assert len(counts) > 30_000  # words x (leading space, capitalised) x punctuation
    top = [w for w, _ in counts.most_common(5)]
    assert " the" in top
    # Zipf-like: the 10th commonest word is several times rarer than the first, and many types are rare
    ranked = [c for w, c in counts.most_common() if re.fullmatch(r" [a-z]+", w)]
    assert 2.5 < ranked[0] / ranked[9] < 30 and sum(c <= 5 for c in ranked) > len(ranked) / 3
    assert re.search(r" \d+,\d{3}", text) and re.search(r" \d+\.\d+", text)
    assert re.search(r"[а-я]{2,}", text) and re.search(r"[\u4e00-\u9fa5]", text) and re.search(r"[éüñçø]", text)
    assert all(p in text for p in (", ", ". ", "? ", "! ", "'s", "n't", "\n"))


def test_encode_batches_and_parallel_file_encoding(corpus, tmp_path):
    a, _, _ = corpus
    small = tmp_path / "small.txt"
    small.write_bytes(a.read_bytes()[:200_000].rsplit((EOT + "\n").encode(), 1)[0] + (EOT + "\n").encode())
    vocab, merges = train_bpe(small, 400, [EOT])
    tokenizer = Tokenizer(vocab, merges, [EOT], cache_size=16)
    text = small.read_text(encoding="utf-8")
    expected = tokenizer.encode(text)
    pieces = [text[i : i + 777] for i in range(0, len(text), 777)]
    assert [i for ids in tokenizer.encode_batches(pieces) for i in ids] == expected
    for workers in (1, 2):
        out = tmp_path / f"w{workers}.npy"
        assert encode_file(tokenizer, str(small), str(out), num_workers=workers) == len(expected)
        tokens = np.load(out, mmap_mode="r")
        assert tokens.dtype == np.uint16 and tokens.tolist() == expected
    assert tokenizer.cache_size == 16  # the caller's tokenizer is not changed; workers get a larger cache
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no parts left behind


@pytest.mark.parametrize("keep_text", [True, False])
def test_prepare_encoded_corpus_decodes_back_to_the_generated_stories(tmp_path, keep_text):
    """The benchmarks' offline corpus: each split's .npy decodes with the saved tokenizer to exactly the text
    `write_corpus` makes for that split's seed and size."""
    from cs336_basics.artifacts import DEFAULT_SPECIAL, load_tokenizer
    from cs336_basics.corpus import prepare_encoded_corpus, write_corpus

    info = prepare_encoded_corpus(str(tmp_path / "data"), num_stories=200, vocab_size=400, workers=1,
                                  keep_text=keep_text)
    tokenizer = load_tokenizer(str(tmp_path / "data" / "tokenizer"), [DEFAULT_SPECIAL])
    assert info["bpe_vocab"] == len(tokenizer.vocab) <= 400 and info["bpe_vocab_requested"] == 400
    for split, stories, seed in (("train", 200, 0), ("val", 50, 1)):
        write_corpus(str(tmp_path / f"{split}.ref"), num_stories=stories, seed=seed)
        tokens = np.load(info[f"{split}_data"])
        assert len(tokens) == info[f"{split}_tokens"]
        assert tokenizer.decode(tokens.tolist()) == (tmp_path / f"{split}.ref").read_text()
        assert (tmp_path / "data" / f"{split}.txt").exists() == keep_text
