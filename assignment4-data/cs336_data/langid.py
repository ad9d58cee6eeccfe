"""Language identification with fastText's lid.176 model: ISO 639 code (label without `__label__`) and score."""

from __future__ import annotations

import os
from collections.abc import Iterable

from cs336_basics.cli_support import UserError
from cs336_data.document import Document, Step
from cs336_data.fasttext_model import load_classifier


def identify_language(text: str, model_path: str | os.PathLike | None = None) -> tuple[str, float]:
    """Top language of the text and its probability in [0, 1]."""
    return load_classifier("lid", model_path).top(text)


class LanguageFilter(Step):
    """Keeps documents whose top language is wanted with at least `min_score`; records the prediction in meta."""

    name = "langid"

    def __init__(self, languages: Iterable[str] = ("en",), min_score: float = 0.65,
                 model_path: str | os.PathLike | None = None) -> None:
        super().__init__()
        self.languages = set(languages)
        self.min_score = min_score
        self.model = load_classifier("lid", model_path)
        known = {label.removeprefix("__label__") for label in self.model.model.get_labels()}
        unknown = sorted(self.languages - known)
        if unknown:  # it would drop every document, silently
            raise UserError(f"--lang {unknown[0]}: not a language code of the language-ID model (such as en, de, zh)")

    def apply(self, doc: Document) -> Document | None:
        lang, score = self.model.top(doc.text)
        doc.meta["lang"], doc.meta["lang_score"] = lang, score
        if lang not in self.languages:
            self.counters[f"other_lang:{lang}"] += 1
            return None
        if score < self.min_score:
            self.counters["low_score"] += 1
            return None
        return doc
