"""Benchmarks: MinHash dedup (ours vs datasketch's MinHashLSH, same corpus, one run) and pipeline MB/s per core.

    uv run python assignment4-data/benchmarks/bench_dedup_pipeline.py --out assignment4-data/benchmarks/results.json

Corpus: families of a random base document (Zipf-distributed words) and copies with a share of their words
replaced (0 to 20 %, so 5-gram Jaccard from 1 down to ~0.3, many near the 0.8 threshold). Words are drawn
independently, so 5-grams shared across families are negligible (the script checks a random sample of
cross-family pairs); the ground truth is the exact Jaccard of every within-family pair.

Scores over document pairs: recall = true pairs (J >= threshold) that end in one cluster; precision = pairs in
one cluster that are true. Clustering is transitive (A~B, B~C puts A, C together even when J(A, C) is below the
threshold), so cluster precision is below 1 for any exact method; datasketch's verified pairs are clustered the
same way for comparison. Our time covers signatures, LSH, exact verification and clustering; datasketch's
covers signatures and LSH insert + query only.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from cs336_basics.cli_support import save_figure
from cs336_data.document import Document
from cs336_data.minhash import MinHasher, band_keys, compute_signatures, find_duplicates, jaccard, word_ngrams
from cs336_data.pipeline import FilterConfig, run_filter
from cs336_data.warc_io import write_warc_responses, write_wet

EDIT_RATES = [0.0, 0.01, 0.015, 0.02, 0.025, 0.03, 0.05, 0.1, 0.2]  # 5-gram Jaccard ~1 .. 0.5


class ListCorpus:
    def __init__(self, texts: list[str]) -> None:
        self.texts = texts

    def __len__(self) -> int:
        return len(self.texts)

    def __iter__(self):
        return iter(self.texts)

    def text(self, i: int) -> str:
        return self.texts[i]


def make_corpus(n_families: int, length: int, seed: int) -> tuple[list[str], list[int]]:
    rng = np.random.default_rng(seed)
    vocab = np.array([f"w{i}" for i in range(50_000)])
    probs = 1.0 / np.arange(1, vocab.size + 1) ** 1.1
    probs /= probs.sum()
    texts, family = [], []
    for f in range(n_families):
        base = rng.choice(vocab, size=length, p=probs)
        texts.append(" ".join(base))
        family.append(f)
        for rate in rng.choice(EDIT_RATES, size=int(rng.integers(0, 3)), replace=False):
            copy = base.copy()
            idx = rng.choice(length, size=int(rate * length), replace=False)
            copy[idx] = rng.choice(vocab, size=idx.size, p=probs)
            texts.append(" ".join(copy))
            family.append(f)
    order = rng.permutation(len(texts))
    return [texts[i] for i in order], [family[i] for i in order]


def ground_truth(texts: list[str], family: list[int], ngrams: int, threshold: float, seed: int) -> dict:
    grams = [word_ngrams(t, ngrams) for t in texts]
    members: dict[int, list[int]] = {}
    for i, f in enumerate(family):
        members.setdefault(f, []).append(i)
    true = {(a, b) for m in members.values() for a, b in itertools.combinations(sorted(m), 2)
            if jaccard(grams[a], grams[b]) >= threshold}
    rng = random.Random(seed)
    sample, worst = 0, 0.0
    while sample < 2000:
        a, b = rng.sample(range(len(texts)), 2)
        if family[a] != family[b]:
            worst = max(worst, jaccard(grams[a], grams[b]))
            sample += 1
    return {"pairs": true, "grams": grams, "max_cross_family_jaccard_sampled": worst}


def score(found: set[tuple[int, int]], true: set[tuple[int, int]]) -> dict[str, float]:
    tp = len(found & true)
    return {"recall": tp / len(true) if true else 1.0, "precision": tp / len(found) if found else 1.0,
            "found_pairs": len(found)}


def bench_ours(texts, num_hashes, num_bands, ngrams, threshold, workers):
    start = time.perf_counter()
    result = find_duplicates(ListCorpus(texts), num_hashes, num_bands, ngrams, threshold, workers=workers)
    seconds = time.perf_counter() - start
    found = {(a, b) for c in result.clusters for a, b in itertools.combinations(c, 2)}
    return seconds, found, dict(result.stats)


def bench_datasketch(texts, grams, num_hashes, num_bands, threshold):
    from datasketch import MinHash, MinHashLSH

    start = time.perf_counter()
    lsh = MinHashLSH(num_perm=num_hashes, params=(num_bands, num_hashes // num_bands))
    sigs = []
    for i, t in enumerate(texts):
        m = MinHash(num_perm=num_hashes, seed=1)
        m.update_batch([g.encode() for g in word_ngrams(t, 5)])
        lsh.insert(i, m)
        sigs.append(m)
    candidates = {(min(i, j), max(i, j)) for i, m in enumerate(sigs) for j in lsh.query(m) if j != i}
    seconds = time.perf_counter() - start
    verified = {(a, b) for a, b in candidates if jaccard(grams[a], grams[b]) >= threshold}
    return seconds, candidates, verified


def cluster_pairs(n: int, pairs: set[tuple[int, int]]) -> set[tuple[int, int]]:
    """All pairs inside the connected components of `pairs` (the transitive clustering of a dedup run)."""
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in pairs:
        parent[find(a)] = find(b)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(find(i), []).append(i)
    return {(a, b) for g in groups.values() for a, b in itertools.combinations(g, 2)}


def s_curve(texts, family, grams, num_hashes, num_bands, fig_path: str | None) -> list[dict]:
    """Empirical share of within-family pairs that share a band, by Jaccard bin, against 1 - (1 - J^r)^b."""
    sigs = compute_signatures(ListCorpus(texts), MinHasher(num_hashes, 5, seed=0))
    keys = band_keys(sigs, num_bands, seed=0)
    members: dict[int, list[int]] = {}
    for i, f in enumerate(family):
        members.setdefault(f, []).append(i)
    js, hits = [], []
    for m in members.values():
        for a, b in itertools.combinations(m, 2):
            js.append(jaccard(grams[a], grams[b]))
            hits.append(bool((keys[a] == keys[b]).any()))
    js_arr, hits_arr = np.array(js), np.array(hits)
    r = num_hashes // num_bands
    rows = []
    for lo in np.arange(0.0, 1.0, 0.05):
        sel = (js_arr >= lo) & (js_arr < lo + 0.05 if lo < 0.95 else js_arr <= 1.0)
        if sel.sum():
            mid = float(js_arr[sel].mean())
            rows.append({"jaccard_bin": [round(float(lo), 2), round(float(lo) + 0.05, 2)], "pairs": int(sel.sum()),
                         "mean_jaccard": mid, "candidate_rate": float(hits_arr[sel].mean()),
                         "theory_at_mean": 1 - (1 - mid**r) ** num_bands})
    if fig_path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        grid = np.linspace(0, 1, 200)
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(grid, 1 - (1 - grid**r) ** num_bands, label=f"theory 1-(1-J^{r})^{num_bands}")
        ax.scatter([x["mean_jaccard"] for x in rows], [x["candidate_rate"] for x in rows],
                   s=[8 + x["pairs"] ** 0.5 * 4 for x in rows], color="C1", label="measured (area ~ pairs)", zorder=3)
        ax.axvline(0.8, color="grey", ls=":", label="threshold 0.8")
        ax.set_xlabel("exact 5-gram Jaccard of a near-duplicate pair")
        ax.set_ylabel("share of pairs that share a band")
        ax.set_title(f"MinHash LSH, {num_hashes} hashes in {num_bands} bands")
        ax.legend(loc="upper left", fontsize=8)
        fig.tight_layout()
        save_figure(fig, fig_path)
    return rows


def bench_pipeline(tmp: Path, mb_per_file: float, files: int, workers_list: list[int]) -> dict:
    """Offline steps only (min length, Gopher, PII; language ID and harmful when their models are present)."""
    rng = random.Random(0)
    words = ["the", "of", "and", "to", "in", "is", "was", "for", "on", "that", "with", "as", "by", "at", "from",
             "his", "her", "this", "which", "river", "history", "science", "village", "library", "garden",
             "morning", "market", "bridge", "forest", "community", "research", "government", "education"]
    wet_paths = []
    for f in range(files):
        docs, size = [], 0
        while size < mb_per_file * 1e6:
            n = rng.randrange(50, 1500)
            text = " ".join(rng.choice(words) for _ in range(n)) + f". Reach me at user{size}@example.com."
            docs.append(Document(text, url=f"http://example.org/{f}/{len(docs)}"))
            size += len(text)
        path = tmp / f"bench{f}.warc.wet.gz"
        write_wet(path, docs)
        wet_paths.append(str(path))
    from cs336_data.assets import asset_path

    have = {n: asset_path(n).is_file() for n in ("lid", "nsfw", "toxic")}
    config = FilterConfig(min_chars=100, lang_threshold=0.65 if have["lid"] else None,
                          nsfw_threshold=0.5 if have["nsfw"] and have["toxic"] else None)
    out = {"steps": [], "models_present": have, "files": files}
    for w in workers_list:
        rep = run_filter(wet_paths, str(tmp / f"out{w}"), config, workers=w, progress=False)["summary"]
        out["steps"] = list(rep["steps"])
        out[f"workers_{w}"] = {"compressed_mb": rep["input_mb"], "text_mb": rep["text_mb"],
                               "wall_seconds": rep["wall_seconds"],
                               "compressed_mb_per_second_per_core": rep["mb_per_second_per_worker"],
                               "text_mb_per_second_per_core": rep["text_mb"] / rep["wall_seconds"] / w,
                               "documents": rep["documents_read"], "kept": rep["documents_kept"],
                               "docs_per_second": rep["documents_read"] / rep["wall_seconds"]}
    # extraction from WARC HTML responses, single core
    pages = []
    for i in range(2000):
        body = "".join(f"<p>{' '.join(rng.choice(words) for _ in range(60))}</p>" for _ in range(rng.randrange(3, 20)))
        html = (f"<html><head><title>t{i}</title><script>var x={i};</script></head>"
                f"<body><nav>menu</nav>{body}</body></html>")
        pages.append((f"http://example.org/p{i}", html.encode(), "text/html; charset=utf-8"))
    write_warc_responses(tmp / "pages.warc.gz", pages)
    html_mb = sum(len(p[1]) for p in pages) / 1e6
    config = FilterConfig(input_kind="response", min_chars=100, lang_threshold=None, nsfw_threshold=None)
    rep = run_filter([str(tmp / "pages.warc.gz")], str(tmp / "outwarc"), config, workers=1, progress=False)["summary"]
    out["warc_extract_1_core"] = {"html_mb": html_mb, "wall_seconds": rep["wall_seconds"],
                                  "html_mb_per_second": html_mb / rep["wall_seconds"],
                                  "pages_per_second": rep["documents_read"] / rep["wall_seconds"]}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", type=int, default=3000)
    p.add_argument("--length", type=int, default=300)
    p.add_argument("--num-hashes", type=int, default=100)
    p.add_argument("--num-bands", type=int, default=20)
    p.add_argument("--threshold", type=float, default=0.8)
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--pipeline-mb", type=float, default=4.0, help="uncompressed MB per generated WET file")
    p.add_argument("--out", default=None)
    p.add_argument("--fig", default=None, help="PNG of the measured LSH S-curve (e.g. fig/a4_lsh_scurve.png)")
    args = p.parse_args()

    texts, family = make_corpus(args.families, args.length, seed=0)
    truth = ground_truth(texts, family, 5, args.threshold, seed=0)
    true = truth["pairs"]
    results = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0], "platform": platform.platform(),
                           "load_average_at_start": os.getloadavg()},
               "corpus": {"documents": len(texts), "families": args.families, "words_per_doc": args.length,
                          "true_pairs": len(true), "ngrams": 5, "threshold": args.threshold,
                          "max_cross_family_jaccard_sampled": truth["max_cross_family_jaccard_sampled"]},
               "params": {"num_hashes": args.num_hashes, "num_bands": args.num_bands}}
    for workers in sorted({1, args.workers}):
        sec, found, stats = bench_ours(texts, args.num_hashes, args.num_bands, 5, args.threshold, workers)
        results[f"ours_workers_{workers}"] = {"seconds": sec, "docs_per_second": len(texts) / sec,
                                             **score(found, true), "stats": stats}
        print(f"ours ({workers} proc): {len(texts) / sec:,.0f} docs/s", results[f"ours_workers_{workers}"])
    sec, candidates, verified = bench_datasketch(texts, truth["grams"], args.num_hashes, args.num_bands,
                                                 args.threshold)
    results["datasketch"] = {"seconds_signature_and_lsh": sec, "docs_per_second": len(texts) / sec,
                             "candidates": score(candidates, true), "after_exact_jaccard": score(verified, true),
                             "clustered_after_exact_jaccard": score(cluster_pairs(len(texts), verified), true)}
    results["true_pairs_clustered"] = score(cluster_pairs(len(texts), true), true)
    print(f"datasketch: {len(texts) / sec:,.0f} docs/s", results["datasketch"])
    results["lsh_s_curve"] = s_curve(texts, family, truth["grams"], args.num_hashes, args.num_bands, args.fig)
    with tempfile.TemporaryDirectory() as tmp:
        results["pipeline"] = bench_pipeline(Path(tmp), args.pipeline_mb, files=4,
                                             workers_list=sorted({1, args.workers}))
    print(json.dumps(results["pipeline"], indent=1))
    results["machine"]["load_average_at_end"] = os.getloadavg()
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
