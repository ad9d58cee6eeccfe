"""Fuzzy document deduplication with MinHash signatures and LSH banding, verified by exact n-gram Jaccard.

1. Normalise (NFD, drop accents and punctuation, lowercase, collapse whitespace) and take word n-grams.
2. Signature: each word gets a 64-bit MurmurHash3; an n-gram's hash is mix64(sum_j word_{i+j} * P_j) (odd
   constants P_j, wrapping, so all n-grams of a document are hashed in a few NumPy operations); then for each of
   `num_hashes` functions h_i(x) = mix64(x XOR s_i) (mix64: the SplitMix64 finaliser, s_i random seeds) the
   minimum over the distinct n-gram hashes, kept as its high 32 bits.
   Signatures are the only per-document state of the streaming pass; above `memmap_bytes` they go to a
   disk-backed array.
3. LSH: split each signature into `num_bands` bands of r = num_hashes / num_bands rows; documents whose band
   values agree in any band are candidates (grouped by sorting a 64-bit key per band, one band at a time, no
   Python dict of buckets).
4. Each candidate pair not already in one cluster is checked against the exact Jaccard similarity of its n-gram
   sets (re-read from the corpus, bounded LRU cache); pairs at or above the threshold are joined (union-find).
5. In every cluster one document, chosen at random (seeded), survives.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import re
import tempfile
import unicodedata
from collections import Counter, OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import mmh3
import numpy as np
from tqdm import tqdm

from cs336_basics.cli_support import UserError, bounded, check_ranges

_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S32 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(32)
EMPTY = np.uint32(0xFFFFFFFF)
_NON_WORD = re.compile(r"[^\w\s]")


class Corpus(Protocol):
    def __len__(self) -> int: ...
    def __iter__(self) -> Iterator[str]: ...
    def text(self, i: int) -> str: ...


def normalize_text(text: str) -> str:
    """NFD, lowercase, strip punctuation and combining accents (neither is a word character), collapse spaces.

    Underscores (word characters to the regex) become spaces.
    """
    text = unicodedata.normalize("NFD", text).lower()
    return " ".join(_NON_WORD.sub("", text.replace("_", " ")).split())


def word_ngrams(text: str, n: int) -> set[str]:
    """Set of word n-grams of the normalised text; a document shorter than n words is its own single n-gram."""
    if n < 1:
        raise ValueError(f"ngrams must be >= 1, got {n}")
    words = normalize_text(text).split()
    if not words:
        return set()
    if len(words) < n:
        return {" ".join(words)}
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


def jaccard(a: set[str], b: set[str]) -> float:
    """|A ∩ B| / |A ∪ B|; two empty sets score 0 (empty documents are never called duplicates)."""
    if not a or not b:
        return 0.0
    inter = len(a & b)
    return inter / (len(a) + len(b) - inter)


def mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser, elementwise on uint64 (wrapping multiplication is intended)."""
    with np.errstate(over="ignore"):
        z = (z ^ (z >> _S30)) * _M1
        z = (z ^ (z >> _S27)) * _M2
        return z ^ (z >> _S31)


class MinHasher:
    """`num_hashes` hash functions: each XORs a random 64-bit seed into the n-gram hash and mixes the result.

    (A linear family a·x + b mod p with small a keeps x's order for small x and correlates the functions; mixing
    every bit avoids that, and the signature agreement then tracks the Jaccard similarity, see the tests.)
    """

    def __init__(self, num_hashes: int, ngrams: int, seed: int = 0, block: int = 2048) -> None:
        if num_hashes < 1:
            raise ValueError(f"num_hashes must be >= 1, got {num_hashes}")
        rng = np.random.default_rng(seed)
        self.num_hashes, self.ngrams, self.block = num_hashes, ngrams, block
        self.seeds = rng.integers(0, np.iinfo(np.uint64).max, size=num_hashes, dtype=np.uint64, endpoint=True)
        self.positions = rng.integers(0, 1 << 63, size=ngrams, dtype=np.uint64) * np.uint64(2) + np.uint64(1)

    def gram_hashes(self, text: str) -> np.ndarray:
        """Distinct 64-bit hashes of the document's word n-grams (same n-gram definition as `word_ngrams`)."""
        words = normalize_text(text).split()
        if not words:
            return np.empty(0, dtype=np.uint64)
        w = np.fromiter((mmh3.hash64(t, signed=False)[0] for t in words), dtype=np.uint64, count=len(words))
        n = min(self.ngrams, len(words))  # a document shorter than n words is one n-gram
        m = len(words) - n + 1
        acc = np.full(m, np.uint64(n), dtype=np.uint64)
        with np.errstate(over="ignore"):
            for j in range(n):
                acc += w[j : j + m] * self.positions[j]
        return np.unique(mix64(acc))

    def signature_of_hashes(self, x: np.ndarray) -> np.ndarray:
        if x.size == 0:
            return np.full(self.num_hashes, EMPTY, dtype=np.uint32)
        mins = np.full(self.num_hashes, np.iinfo(np.uint64).max, dtype=np.uint64)
        for s in range(0, x.size, self.block):
            v = mix64(x[s : s + self.block, None] ^ self.seeds[None, :])
            np.minimum(mins, v.min(axis=0), out=mins)
        return (mins >> _S32).astype(np.uint32)

    def signature(self, text: str) -> np.ndarray:
        return self.signature_of_hashes(self.gram_hashes(text))


def band_multipliers(num_hashes: int, seed: int = 0) -> np.ndarray:
    """Random odd 64-bit multipliers, one per signature row, for the band keys."""
    rng = np.random.default_rng(seed + 1)
    return rng.integers(0, 1 << 63, size=num_hashes, dtype=np.uint64) * np.uint64(2) + np.uint64(1)


def band_key(signatures: np.ndarray, band: int, rows: int, mult: np.ndarray) -> np.ndarray:
    """One band's 64-bit key per document: a linear form of the band's rows with odd multipliers, mod 2^64."""
    cols = np.asarray(signatures[:, band * rows : (band + 1) * rows], dtype=np.uint64)
    with np.errstate(over="ignore"):
        return (cols * mult[band * rows : (band + 1) * rows]).sum(axis=1, dtype=np.uint64) + np.uint64(band)


def band_keys(signatures: np.ndarray, num_bands: int, seed: int = 0) -> np.ndarray:
    """(n, num_bands) keys of all bands at once (the dedup itself makes them one band at a time)."""
    k = signatures.shape[1]
    if num_bands < 1 or k % num_bands:
        raise ValueError(f"num_hashes ({k}) must be divisible by num_bands ({num_bands})")
    mult = band_multipliers(k, seed)
    return np.stack([band_key(signatures, j, k // num_bands, mult) for j in range(num_bands)], axis=1)


def band_groups(keys: np.ndarray) -> Iterator[np.ndarray]:
    """Sorted index groups (size >= 2) of documents sharing a key, found by sorting the keys of one band."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    ends = np.r_[starts[1:], sorted_keys.size]
    for s, e in zip(starts, ends, strict=True):
        if e - s > 1:
            yield np.sort(order[s:e])


def candidate_groups(keys: np.ndarray) -> Iterator[np.ndarray]:
    """For each band (column of `keys`), the groups of documents sharing that band's key."""
    for j in range(keys.shape[1]):
        yield from band_groups(keys[:, j])


class UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = np.arange(n, dtype=np.int64)

    def find(self, x: int) -> int:
        root = x
        while self.parent[root] != root:
            root = int(self.parent[root])
        while self.parent[x] != root:
            self.parent[x], x = root, int(self.parent[x])
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


@dataclass
class DedupResult:
    keep: np.ndarray  # bool per document
    clusters: list[list[int]]  # duplicate clusters (size >= 2), sorted members
    stats: Counter[str] = field(default_factory=Counter)


@dataclass
class MinHashConfig:
    """The dedup's knobs with their valid ranges (field name = CLI flag), checked when built: a threshold of 0
    would call every candidate pair a duplicate, bands must split the signature evenly."""

    num_hashes: int = bounded(100, ge=1)
    num_bands: int = bounded(10, ge=1)
    ngrams: int = bounded(5, ge=1)
    threshold: float = bounded(0.8, gt=0, le=1)
    seed: int = bounded(0, ge=0)
    workers: int = bounded(1, ge=1)

    def __post_init__(self) -> None:
        check_ranges(self)
        if self.num_hashes % self.num_bands:
            raise UserError(f"--num-hashes ({self.num_hashes}) must be divisible by --num-bands ({self.num_bands})")


_FORKED: tuple[Corpus, MinHasher] | None = None  # set before the pool forks, so workers inherit, not unpickle


def _signature_range(start: int, end: int) -> tuple[int, np.ndarray]:
    assert _FORKED is not None
    corpus, hasher = _FORKED
    return start, np.stack([hasher.signature(corpus.text(i)) for i in range(start, end)])


def compute_signatures(corpus: Corpus, hasher: MinHasher, workers: int = 1, progress: bool = False,
                       scratch_dir: str | None = None, memmap_bytes: int = 1 << 30, chunk: int = 512) -> np.ndarray:
    """Signatures of every document, streamed; process-parallel over index ranges when workers > 1.

    With `scratch_dir` set and more than `memmap_bytes` of signatures, they live in a memory-mapped file there.
    """
    n = len(corpus)
    shape = (n, hasher.num_hashes)
    if scratch_dir is not None and n * hasher.num_hashes * 4 > memmap_bytes:
        sigs = np.lib.format.open_memmap(f"{scratch_dir}/signatures.npy", mode="w+", dtype=np.uint32, shape=shape)
    else:
        sigs = np.empty(shape, dtype=np.uint32)
    bar = tqdm(total=n, desc="minhash", unit=" docs", disable=not progress)
    if workers <= 1:
        for i, text in enumerate(corpus):
            sigs[i] = hasher.signature(text)
            bar.update(1)
    else:
        global _FORKED
        _FORKED = (corpus, hasher)
        ctx = multiprocessing.get_context("fork")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            futures = [pool.submit(_signature_range, s, min(n, s + chunk)) for s in range(0, n, chunk)]
            for fut in concurrent.futures.as_completed(futures):
                start, block = fut.result()
                sigs[start : start + len(block)] = block
                bar.update(len(block))
        _FORKED = None
    bar.close()
    return sigs


def find_duplicates(corpus: Corpus, num_hashes: int, num_bands: int, ngrams: int, jaccard_threshold: float,
                    seed: int = 0, workers: int = 1, progress: bool = False, cache_size: int = 4096) -> DedupResult:
    """Cluster near-duplicate documents and pick one survivor per cluster (see the module docstring)."""
    MinHashConfig(num_hashes, num_bands, ngrams, jaccard_threshold, seed, max(1, workers))
    hasher = MinHasher(num_hashes, ngrams, seed)
    n = len(corpus)
    stats: Counter[str] = Counter(documents=n)
    uf = UnionFind(n)
    cache: OrderedDict[int, set[str]] = OrderedDict()

    def grams(i: int) -> set[str]:
        if i in cache:
            cache.move_to_end(i)
            return cache[i]
        g = word_ngrams(corpus.text(i), ngrams)
        cache[i] = g
        if len(cache) > cache_size:
            cache.popitem(last=False)
        return g

    rejected: set[tuple[int, int]] = set()

    def verify(members: list[int]) -> None:
        for x in range(len(members)):
            for y in range(x + 1, len(members)):
                a, b = members[x], members[y]
                if (a, b) in rejected or uf.find(a) == uf.find(b):
                    continue
                stats["candidate_pairs"] += 1
                if jaccard(grams(a), grams(b)) >= jaccard_threshold:
                    uf.union(a, b)
                    stats["duplicate_pairs"] += 1
                else:
                    rejected.add((a, b))

    with tempfile.TemporaryDirectory(prefix="minhash_") as scratch:
        sigs = compute_signatures(corpus, hasher, workers, progress, scratch)
        mult = band_multipliers(num_hashes, seed)
        for band in tqdm(range(num_bands), desc="LSH bands", disable=not progress):
            for group in band_groups(band_key(sigs, band, num_hashes // num_bands, mult)):
                verify([int(i) for i in group])
        del sigs
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(uf.find(i), []).append(i)
    clusters = [members for members in groups.values() if len(members) > 1]
    keep = np.ones(n, dtype=bool)
    rng = np.random.default_rng(seed)
    for members in clusters:
        keep[members] = False
        keep[members[int(rng.integers(len(members)))]] = True
    stats["clusters"] = len(clusters)
    stats["removed"] = int(n - keep.sum())
    return DedupResult(keep, clusters, stats)


def minhash_deduplicate(corpus: Corpus, output_directory: str, num_hashes: int, num_bands: int, ngrams: int,
                        jaccard_threshold: float, **kwargs: object) -> DedupResult:
    """Deduplicate and write the survivors with `corpus.write_kept` (same file names)."""
    result = find_duplicates(corpus, num_hashes, num_bands, ngrams, jaccard_threshold, **kwargs)  # type: ignore[arg-type]
    corpus.write_kept(result.keep, output_directory)  # type: ignore[attr-defined]
    return result


def minhash_deduplicate_files(input_files: Sequence[str], output_directory: str, num_hashes: int, num_bands: int,
                              ngrams: int, jaccard_threshold: float, **kwargs: object) -> DedupResult:
    """One document per file: kept files are copied byte for byte into the output folder."""
    from cs336_data.corpus import FileCorpus

    return minhash_deduplicate(FileCorpus(input_files), output_directory, num_hashes, num_bands, ngrams,
                               jaccard_threshold, **kwargs)
