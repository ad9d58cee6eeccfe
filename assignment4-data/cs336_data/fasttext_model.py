"""A thin, quiet wrapper over a fastText classifier: load once, top-k labels without `__label__`, float scores."""

from __future__ import annotations

import os
from functools import lru_cache

import fasttext

from cs336_data.assets import require_asset

fasttext.FastText.eprint = lambda *args, **kwargs: None  # silence the load_model deprecation notice


class FastTextClassifier:
    """Wraps `fasttext.load_model`; predicts through the C++ binding to avoid the NumPy 2 `copy=False` bug."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = str(path)
        self.model = fasttext.load_model(self.path)

    def predict(self, text: str, k: int = 1) -> list[tuple[str, float]]:
        """Top-k (label, probability) pairs; fastText reads one line, so newlines become spaces."""
        line = " ".join(text.split()) + "\n"
        pairs = self.model.f.predict(line, k, 0.0, "replace")
        return [(label.removeprefix("__label__"), min(1.0, max(0.0, float(prob)))) for prob, label in pairs]

    def top(self, text: str) -> tuple[str, float]:
        pairs = self.predict(text, 1)
        if not pairs:
            raise ValueError("fastText returned no label")
        return pairs[0]


@lru_cache(maxsize=8)
def _load(path: str) -> FastTextClassifier:
    return FastTextClassifier(path)


def load_classifier(asset: str, override: str | os.PathLike | None = None) -> FastTextClassifier:
    """The classifier for an asset name, loaded once per process; MissingModelError if its file is absent."""
    return _load(str(require_asset(asset, override)))
