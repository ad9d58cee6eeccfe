"""Exact line dedup by hand, and MinHash + LSH against brute-force Jaccard on generated near-duplicates."""

import gzip
import itertools
import random

import numpy as np
import pytest

from cs336_data.corpus import FileCorpus, JsonlCorpus
from cs336_data.dedup_exact import exact_line_deduplicate
from cs336_data.minhash import (
    MinHasher,
    band_keys,
    find_duplicates,
    jaccard,
    minhash_deduplicate,
    minhash_deduplicate_files,
    normalize_text,
    word_ngrams,
)

# ---------------------------------------------------------------- exact line dedup


def test_exact_line_dedup_by_hand(tmp_path):
    a, b = tmp_path / "in" / "a.txt", tmp_path / "in" / "b.txt"
    a.parent.mkdir()
    a.write_bytes(b"header\nunique a\r\nrepeated in a\nrepeated in a\nfooter")  # no final newline
    b.write_bytes(b"header\r\nunique b\nfooter\nlast b\n")
    stats = exact_line_deduplicate([a, b], tmp_path / "out")
    # "header" and "footer" repeat across files (line endings ignored), "repeated in a" repeats within a file
    assert (tmp_path / "out" / "a.txt").read_bytes() == b"unique a\r\n"
    assert (tmp_path / "out" / "b.txt").read_bytes() == b"unique b\nlast b\n"
    assert stats == {"lines": 9, "kept": 3}


def test_exact_line_dedup_gzip_and_empty(tmp_path):
    gz = tmp_path / "c.txt.gz"
    gz.write_bytes(gzip.compress("é one\nshared\n".encode()))
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    other = tmp_path / "d.txt"
    other.write_text("shared\ntwo\n")
    exact_line_deduplicate([gz, empty, other], tmp_path / "out")
    assert gzip.decompress((tmp_path / "out" / "c.txt.gz").read_bytes()) == "é one\n".encode()
    assert (tmp_path / "out" / "empty.txt").read_bytes() == b""
    assert (tmp_path / "out" / "d.txt").read_text() == "two\n"


def test_exact_line_dedup_rejects_clashing_names(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    for d in ("x", "y"):
        (tmp_path / d / "same.txt").write_text("a\n")
    with pytest.raises(ValueError, match="distinct names"):
        exact_line_deduplicate([tmp_path / "x" / "same.txt", tmp_path / "y" / "same.txt"], tmp_path / "out")


# ---------------------------------------------------------------- MinHash pieces


def test_normalize_and_ngrams():
    assert normalize_text("  Héllo,  WÖRLD!\n\tIt's   naïve_café…") == "hello world its naive cafe"
    assert word_ngrams("a b c d", 2) == {"a b", "b c", "c d"}
    assert word_ngrams("Short text", 5) == {"short text"}
    assert word_ngrams("!!! ...", 3) == set()
    assert jaccard({"a", "b"}, {"b", "c"}) == pytest.approx(1 / 3)
    assert jaccard(set(), set()) == 0.0


def test_signature_agreement_estimates_jaccard():
    rng = random.Random(1)
    words = [f"w{rng.randrange(5000)}" for _ in range(600)]
    other = list(words)
    for i in rng.sample(range(len(other)), 60):
        other[i] = f"x{i}"
    a, b = " ".join(words), " ".join(other)
    hasher = MinHasher(num_hashes=1000, ngrams=3, seed=3)
    agree = float(np.mean(hasher.signature(a) == hasher.signature(b)))
    true = jaccard(word_ngrams(a, 3), word_ngrams(b, 3))
    assert abs(agree - true) < 0.05  # standard error sqrt(J(1-J)/1000) ~ 0.016
    assert (hasher.signature(a) == hasher.signature(a.upper() + " !!")).all()  # normalisation


@pytest.mark.parametrize("overlap", [0, 40, 70, 85, 100])
def test_lsh_collision_rate_follows_the_s_curve(overlap):
    """Sets with a known Jaccard J: per-row agreement ~ J and band collision ~ 1 - (1 - J^r)^b over many seeds."""
    a = " ".join(f"a{i}" for i in range(100))
    b = " ".join([f"a{i}" for i in range(overlap)] + [f"b{i}" for i in range(100 - overlap)])
    j = overlap / (200 - overlap)
    assert jaccard(word_ngrams(a, 1), word_ngrams(b, 1)) == pytest.approx(j)
    rows, bands, trials = 4, 5, 300
    agree, collide = [], []
    for seed in range(trials):
        hasher = MinHasher(rows * bands, ngrams=1, seed=seed)
        sig = np.stack([hasher.signature(a), hasher.signature(b)])
        agree.append(float(np.mean(sig[0] == sig[1])))
        keys = band_keys(sig, bands, seed)
        collide.append(bool((keys[0] == keys[1]).any()))
    se_row = (j * (1 - j) / (trials * rows * bands)) ** 0.5
    assert abs(np.mean(agree) - j) <= 4 * se_row + 1e-9
    p = 1 - (1 - j**rows) ** bands
    assert abs(np.mean(collide) - p) <= 4 * (p * (1 - p) / trials) ** 0.5 + 1e-9


def test_bands_must_divide_hashes():
    with pytest.raises(ValueError, match="divisible"):
        band_keys(np.zeros((2, 10), dtype=np.uint32), 3)


# ---------------------------------------------------------------- MinHash vs brute force


def _near_duplicate_corpus(seed=0, n_base=40, length=150):
    """Base documents of random words plus edited copies at several edit rates (some above, some below 0.8)."""
    rng = random.Random(seed)
    vocab = [f"tok{i}" for i in range(3000)]
    docs = []
    for _ in range(n_base):
        base = [rng.choice(vocab) for _ in range(length)]
        docs.append(base)
        for rate in rng.sample([0.0, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3], k=rng.randrange(0, 4)):
            copy = list(base)
            for i in rng.sample(range(length), int(rate * length)):
                copy[i] = rng.choice(vocab)
            docs.append(copy)
    rng.shuffle(docs)
    return [" ".join(d) for d in docs]


def _true_pairs(texts, n, threshold):
    grams = [word_ngrams(t, n) for t in texts]
    return {(i, j) for i, j in itertools.combinations(range(len(texts)), 2) if jaccard(grams[i], grams[j]) >= threshold}


def _components(n, pairs):
    parent = list(range(n))

    def find(x):
        while parent[x] != x:
            x = parent[x]
        return x

    for i, j in pairs:
        parent[find(i)] = find(j)
    groups = {}
    for i in range(n):
        groups.setdefault(find(i), set()).add(i)
    return sorted(sorted(g) for g in groups.values() if len(g) > 1)


class _ListCorpus:
    def __init__(self, texts):
        self.texts = texts

    def __len__(self):
        return len(self.texts)

    def __iter__(self):
        return iter(self.texts)

    def text(self, i):
        return self.texts[i]


def test_minhash_matches_brute_force_jaccard():
    texts = _near_duplicate_corpus()
    true = _true_pairs(texts, 5, 0.8)
    assert len(true) >= 20  # the generator made real near-duplicates ...
    below = _true_pairs(texts, 5, 0.3) - true
    assert below  # ... and copies too edited to count
    result = find_duplicates(_ListCorpus(texts), num_hashes=128, num_bands=32, ngrams=5, jaccard_threshold=0.8)
    same_cluster = {(i, j) for c in result.clusters for i, j in itertools.combinations(c, 2)}
    recall = len(true & same_cluster) / len(true)
    # precision: a clustered pair must be linked through verified pairs (every pair of a cluster lies in one
    # connected component of the brute-force graph)
    assert sorted(result.clusters) == _components(len(texts), true)
    assert recall == 1.0
    assert result.stats["duplicate_pairs"] <= len(true)
    # exactly one survivor per cluster
    for cluster in result.clusters:
        assert result.keep[cluster].sum() == 1
    assert result.keep.sum() == len(texts) - sum(len(c) - 1 for c in result.clusters)


def test_fewer_bands_lose_recall_but_never_precision():
    texts = _near_duplicate_corpus(seed=5)
    true = _true_pairs(texts, 5, 0.8)
    result = find_duplicates(_ListCorpus(texts), num_hashes=60, num_bands=2, ngrams=5, jaccard_threshold=0.8)
    same_cluster = {(i, j) for c in result.clusters for i, j in itertools.combinations(c, 2)}
    comps = _components(len(texts), true)
    for cluster in result.clusters:  # never a cluster outside a true component
        assert any(set(cluster) <= set(c) for c in comps)
    assert len(true & same_cluster) <= len(true)


def test_minhash_files_and_jsonl_and_workers(tmp_path):
    texts = _near_duplicate_corpus(seed=2, n_base=15)
    src = tmp_path / "src"
    src.mkdir()
    paths = []
    for i, t in enumerate(texts):
        p = src / f"doc{i:03d}.txt"
        p.write_text(t)
        paths.append(p)
    single = minhash_deduplicate_files(paths, tmp_path / "out1", 100, 20, 5, 0.8, seed=7)
    multi = find_duplicates(FileCorpus(paths), 100, 20, 5, 0.8, seed=7, workers=2)
    assert (single.keep == multi.keep).all()
    written = sorted(p.name for p in (tmp_path / "out1").iterdir())
    assert written == sorted(p.name for p, k in zip(paths, single.keep, strict=True) if k)
    assert all((tmp_path / "out1" / n).read_bytes() == (src / n).read_bytes() for n in written)

    shard_a, shard_b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    half = len(texts) // 2
    import json

    shard_a.write_text("".join(json.dumps({"text": t, "i": i}) + "\n" for i, t in enumerate(texts[:half])))
    rows_b = "".join(json.dumps({"text": t, "i": half + i}) + "\n" for i, t in enumerate(texts[half:]))
    shard_b.write_text("\n" + rows_b)  # a blank line is not a document
    res = minhash_deduplicate(JsonlCorpus([shard_a, shard_b]), tmp_path / "out2", 100, 20, 5, 0.8, seed=7)
    kept_ids = [json.loads(line)["i"] for f in ("a.jsonl", "b.jsonl") for line in (tmp_path / "out2" / f).open()]
    assert kept_ids == [i for i, k in enumerate(res.keep) if k]
    assert (res.keep == single.keep).all()

    with gzip.open(tmp_path / "a.jsonl.gz", "wb") as f:  # compressed shards work the same, output keeps gzip
        f.write(shard_a.read_bytes())
    res_gz = minhash_deduplicate(JsonlCorpus([tmp_path / "a.jsonl.gz", shard_b]), tmp_path / "out3", 100, 20, 5, 0.8,
                                 seed=7)
    assert (res_gz.keep == res.keep).all()
    expected = (tmp_path / "out2" / "a.jsonl").read_bytes()
    assert gzip.decompress((tmp_path / "out3" / "a.jsonl.gz").read_bytes()) == expected


def test_minhash_ignores_empty_documents(tmp_path):
    paths = []
    for i, t in enumerate(["", "   ", "real words in a real document here", "!!!"]):
        p = tmp_path / f"{i}.txt"
        p.write_text(t)
        paths.append(p)
    result = minhash_deduplicate_files(paths, tmp_path / "out", 20, 5, 3, 0.5)
    assert result.clusters == [] and len(list((tmp_path / "out").iterdir())) == 4
