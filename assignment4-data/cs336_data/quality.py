"""A fastText quality classifier: pages linked from Wikipedia (`wiki`) against random Common Crawl pages (`cc`).

End to end (see the README): sample reference URLs, fetch them as WARC with wget, then `cs336-data quality train
--positives fetched.warc.gz --negatives CC.warc.wet.gz` extracts text, keeps English pages that pass the Gopher
rules on both sides, balances the classes, holds out a validation split, trains, and reports precision and recall.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import fasttext
from tqdm import tqdm
from xopen import xopen

from cs336_basics.cli_support import UserError, atomic_path, atomic_write, reading
from cs336_data.assets import asset_path
from cs336_data.document import Document, Step
from cs336_data.extract import ExtractText
from cs336_data.fasttext_model import FastTextClassifier, load_classifier
from cs336_data.warc_io import read_whole

POSITIVE, NEGATIVE = "wiki", "cc"


def classify_quality(text: str, model_path: str | os.PathLike | None = None) -> tuple[str, float]:
    """`wiki` (high quality) or `cc`, with the probability of that label."""
    return load_classifier("quality", model_path).top(text)


def sample_urls(url_file: str | os.PathLike, n: int, seed: int = 0, progress: bool = True) -> list[str]:
    """A uniform sample of n lines of a (possibly gzipped) URL list, by reservoir sampling in one pass."""
    rng = random.Random(seed)
    sample: list[str] = []
    with reading(url_file), xopen(url_file, "rt", threads=0) as f:
        for i, line in enumerate(tqdm(f, desc="urls", unit=" urls", disable=not progress)):
            url = line.strip()
            if not url:
                continue
            if len(sample) < n:
                sample.append(url)
            else:
                j = rng.randrange(i + 1)
                if j < n:
                    sample[j] = url
    return sample


def iter_texts(paths: Iterable[str | os.PathLike]) -> Iterator[str]:
    """Texts of WARC (responses, extracted from HTML), WET (conversion records) or plain-text files (one per line).

    A damaged, empty or wrong-kind crawl file is a `UserError` naming it (a quality model trained on part of its
    data without a word would be a silent loss)."""
    extract = ExtractText()
    for path in paths:
        name = str(path)
        if name.endswith((".warc", ".warc.gz")) and ".wet" not in name:
            for doc in read_whole(path, "response"):
                out = extract(doc)
                if out is not None:
                    yield out.text
        elif ".wet" in name:
            for doc in read_whole(path, "conversion"):
                yield doc.text
        else:
            with reading(path), xopen(path, "rt", threads=0, encoding="utf-8") as f:
                yield from (line.rstrip("\n") for line in f if line.strip())


def fasttext_line(label: str, text: str) -> str:
    return f"__label__{label} " + " ".join(text.split()) + "\n"


@dataclass
class TrainingSplit:
    train: Path
    valid: Path
    counts: dict[str, int]


def write_training_data(positives: Iterable[str], negatives: Iterable[str], out_dir: str | os.PathLike,
                        steps: list[Step] | None = None, max_per_class: int | None = None,
                        valid_fraction: float = 0.1, seed: int = 0,
                        files: tuple[str | os.PathLike, str | os.PathLike] | None = None) -> TrainingSplit:
    """Filter both sides through `steps`, balance to the smaller class, shuffle, and split into fastText files
    (`out_dir`/quality.train and quality.valid, or the (train, valid) `files` given)."""
    steps = steps or []
    rng = random.Random(seed)

    def kept(texts: Iterable[str]) -> list[str]:
        out = []
        for text in texts:
            doc: Document | None = Document(text=text)
            for step in steps:
                doc = step(doc)
                if doc is None:
                    break
            if doc is not None and doc.text.strip():
                out.append(doc.text)
            if max_per_class and len(out) >= max_per_class:
                break
        return out

    pos, neg = kept(positives), kept(negatives)
    if not pos or not neg:
        raise UserError(f"need documents of both classes after filtering, got {len(pos)} wiki and {len(neg)} cc")
    m = min(len(pos), len(neg))
    rows = [(POSITIVE, t) for t in rng.sample(pos, m)] + [(NEGATIVE, t) for t in rng.sample(neg, m)]
    rng.shuffle(rows)
    n_valid = max(1, int(len(rows) * valid_fraction))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train, valid = (out / "quality.train", out / "quality.valid") if files is None else map(Path, files)
    split = TrainingSplit(train, valid, {"wiki": m, "cc": m, "valid": n_valid})
    for path, part in ((split.valid, rows[:n_valid]), (split.train, rows[n_valid:])):
        with atomic_write(path, encoding="utf-8") as f:
            f.writelines(fasttext_line(label, text) for label, text in part)
    return split


def train_quality_classifier(train_file: str | os.PathLike, model_out: str | os.PathLike | None = None,
                             epoch: int = 10, lr: float = 0.1, word_ngrams: int = 2, dim: int = 100,
                             min_count: int = 1, bucket: int = 2_000_000, seed: int = 0) -> Path:
    """Train fastText on a `__label__wiki|cc text` file and save it (default: the quality asset's path)."""
    model = fasttext.train_supervised(input=str(train_file), epoch=epoch, lr=lr, wordNgrams=word_ngrams, dim=dim,
                                      minCount=min_count, bucket=bucket, seed=seed, thread=1, verbose=0)
    out = Path(model_out) if model_out else asset_path("quality")
    with atomic_path(out) as tmp:
        model.save_model(tmp)
    return out


def evaluate(model_path: str | os.PathLike, valid_file: str | os.PathLike,
             thresholds: Iterable[float] = (0.5, 0.7, 0.9)) -> dict[str, dict[str, float]]:
    """Precision and recall of `wiki` at each threshold on P(wiki), over a fastText-format file."""
    clf = FastTextClassifier(model_path)
    rows = []
    with open(valid_file, encoding="utf-8") as f:
        for line in f:
            label, _, text = line.partition(" ")
            top, score = clf.top(text)
            p_wiki = score if top == POSITIVE else 1.0 - score
            rows.append((label == f"__label__{POSITIVE}", p_wiki))
    report = {}
    for t in thresholds:
        tp = sum(1 for y, p in rows if y and p >= t)
        fp = sum(1 for y, p in rows if not y and p >= t)
        fn = sum(1 for y, p in rows if y and p < t)
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        report[f"{t:g}"] = {"precision": precision, "recall": recall}
    return report


class QualityFilter(Step):
    """Keeps documents whose P(wiki) reaches the threshold."""

    name = "quality"

    def __init__(self, min_score: float = 0.5, model_path: str | os.PathLike | None = None) -> None:
        super().__init__()
        self.min_score = min_score
        self.model = load_classifier("quality", model_path)

    def apply(self, doc: Document) -> Document | None:
        label, score = self.model.top(doc.text)
        p_wiki = score if label == POSITIVE else 1.0 - score
        doc.meta["p_wiki"] = p_wiki
        return doc if p_wiki >= self.min_score else None
