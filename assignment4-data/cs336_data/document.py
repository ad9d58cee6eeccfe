"""The unit every filter passes around, and the small interface that lets filters compose.

A step takes a `Document` and returns it (possibly with new text) or None to drop it. Each step keeps its own
counters so a pipeline can report, per step, how many documents it saw, kept, changed and dropped.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Document:
    """One web page's text plus where it came from; `meta` carries per-step annotations (scores, counts)."""

    text: str
    id: str = ""
    url: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "url": self.url, "text": self.text, "meta": self.meta}


class Step:
    """Base class of a filter step: subclasses implement `apply`; calling the step updates the counters."""

    name: str = "step"

    def __init__(self) -> None:
        self.counters: Counter[str] = Counter()

    def apply(self, doc: Document) -> Document | None:
        raise NotImplementedError

    def __call__(self, doc: Document) -> Document | None:
        self.counters["seen"] += 1
        before = doc.text
        out = self.apply(doc)
        if out is None:
            self.counters["dropped"] += 1
        else:
            self.counters["kept"] += 1
            if out.text != before:
                self.counters["modified"] += 1
        return out


def run_steps(docs: Iterable[Document], steps: list[Step]) -> Iterator[Document]:
    """Pass each document through the steps in order, stopping at the first step that drops it."""
    for doc in docs:
        out: Document | None = doc
        for step in steps:
            out = step(out)
            if out is None:
                break
        if out is not None:
            yield out


def step_report(steps: list[Step]) -> dict[str, dict[str, int]]:
    """Counters of each step by name (a name used twice gets a #k suffix)."""
    report: dict[str, dict[str, int]] = {}
    for step in steps:
        key = step.name
        k = 2
        while key in report:
            key = f"{step.name}#{k}"
            k += 1
        report[key] = dict(step.counters)
    return report
