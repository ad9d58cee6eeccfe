"""NSFW and toxic-speech classification with Dolma's Jigsaw fastText bigram models.

Labels are the models' own: `nsfw` / `non-nsfw` and `toxic` / `non-toxic`; the score is the probability of the
returned label.
"""

from __future__ import annotations

import os

from cs336_data.document import Document, Step
from cs336_data.fasttext_model import load_classifier


def classify_nsfw(text: str, model_path: str | os.PathLike | None = None) -> tuple[str, float]:
    return load_classifier("nsfw", model_path).top(text)


def classify_toxic_speech(text: str, model_path: str | os.PathLike | None = None) -> tuple[str, float]:
    return load_classifier("toxic", model_path).top(text)


def harmful_probability(label: str, score: float, harmful_label: str) -> float:
    """Probability that the text is harmful, from a binary classifier's top label and its score."""
    return score if label == harmful_label else 1.0 - score


class HarmfulFilter(Step):
    """Drops a document when P(nsfw) or P(toxic) reaches its threshold."""

    name = "harmful"

    def __init__(self, nsfw_threshold: float = 0.5, toxic_threshold: float = 0.5,
                 nsfw_model: str | os.PathLike | None = None, toxic_model: str | os.PathLike | None = None) -> None:
        super().__init__()
        self.nsfw_threshold, self.toxic_threshold = nsfw_threshold, toxic_threshold
        self.nsfw = load_classifier("nsfw", nsfw_model)
        self.toxic = load_classifier("toxic", toxic_model)

    def apply(self, doc: Document) -> Document | None:
        p_nsfw = harmful_probability(*self.nsfw.top(doc.text), "nsfw")
        p_toxic = harmful_probability(*self.toxic.top(doc.text), "toxic")
        doc.meta["p_nsfw"], doc.meta["p_toxic"] = p_nsfw, p_toxic
        if p_nsfw >= self.nsfw_threshold:
            self.counters["nsfw"] += 1
            return None
        if p_toxic >= self.toxic_threshold:
            self.counters["toxic"] += 1
            return None
        return doc
