"""The Gopher quality rules (Rae et al. 2021, appendix A) subset from the handout.

Words come from a regex tokenizer (no data download): runs of word characters, with inner hyphens and
apostrophes kept, and runs of punctuation as their own tokens, as NLTK's `word_tokenize` would split them.
Length bounds and the mean word length count only tokens with a letter or digit; the alphabetic-share rule
counts every token, so symbol-heavy pages fail it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cs336_data.document import Document, Step

TOKEN_RE = re.compile(r"\w+(?:[-'’]\w+)*|[^\w\s]+")
_ALNUM = re.compile(r"[^\W_]")
_ALPHA = re.compile(r"[^\W\d_]")


def tokenize_words(text: str) -> list[str]:
    return TOKEN_RE.findall(text)


@dataclass(frozen=True)
class GopherRules:
    min_words: int = 50
    max_words: int = 100_000
    min_mean_word_length: float = 3.0
    max_mean_word_length: float = 10.0
    max_ellipsis_line_fraction: float = 0.3
    min_alpha_word_fraction: float = 0.8

    def failures(self, text: str) -> list[str]:
        """Names of the rules the text breaks (empty when it passes)."""
        tokens = tokenize_words(text)
        words = [t for t in tokens if _ALNUM.search(t)]
        failed = []
        if not self.min_words <= len(words) <= self.max_words:
            failed.append("word_count")
        mean_len = sum(map(len, words)) / len(words) if words else 0.0
        if not self.min_mean_word_length <= mean_len <= self.max_mean_word_length:
            failed.append("mean_word_length")
        lines = [ln.rstrip() for ln in text.splitlines() if ln.strip()]
        ellipsis = sum(1 for ln in lines if ln.endswith(("...", "…")))
        if lines and ellipsis / len(lines) > self.max_ellipsis_line_fraction:
            failed.append("ellipsis_lines")
        alpha = sum(1 for t in tokens if _ALPHA.search(t))
        if not tokens or alpha / len(tokens) < self.min_alpha_word_fraction:
            failed.append("alphabetic_words")
        return failed


def gopher_quality_filter(text: str, rules: GopherRules | None = None) -> bool:
    """True when the text passes every rule."""
    return not (rules or GopherRules()).failures(text)


class GopherFilter(Step):
    """Drops documents breaking any Gopher rule; counts each broken rule separately."""

    name = "gopher"

    def __init__(self, rules: GopherRules | None = None) -> None:
        super().__init__()
        self.rules = rules or GopherRules()

    def apply(self, doc: Document) -> Document | None:
        failed = self.rules.failures(doc.text)
        for rule in failed:
            self.counters[f"fail_{rule}"] += 1
        return None if failed else doc
