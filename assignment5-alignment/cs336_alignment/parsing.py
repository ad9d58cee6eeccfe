"""Turning free-form model outputs into answers: MMLU option letters and GSM8K final numbers."""

import re
from collections.abc import Mapping
from typing import Any

LETTERS = ("A", "B", "C", "D")

# "The correct answer is B", "answer: (C)", "Answer is **D**" -- the sentence form the MMLU prompt asks for.
_ANSWER_IS = re.compile(r"answer\s*(?:is|:)?\s*[:\-]?\s*[\*\(\[]*\s*([ABCD])\b(?![\w'])", re.IGNORECASE)
# An output that is only a letter, possibly decorated: "B", "(B)", "B.", "B) 10".
_LEADING_LETTER = re.compile(r"^\s*[\*\(\[]*([ABCD])(?:[\)\]\.:\*]|\s*$)")
# A minus sign counts only where it cannot be subtraction ("10-3" ends in 3, "is -3" in -3).
_NUMBER = re.compile(r"(?:(?<![\w).])-)?\d[\d,]*(?:\.\d+)?")


def parse_mmlu_response(mmlu_example: Mapping[str, Any], model_output: str) -> str | None:
    """The option letter the output commits to, or None when it names none.

    The letter must follow "answer (is)" or open the output on its own; a bare capital A elsewhere is the
    English article, not a prediction. If that fails and the output quotes exactly one option's text after
    "answer is", that option counts.
    """
    for match in _ANSWER_IS.finditer(model_output):
        if match.group(1).isupper():
            return match.group(1)
    match = _LEADING_LETTER.match(model_output)
    if match:
        return match.group(1)
    options = list(mmlu_example.get("options", []))
    tail = re.split(r"answer\s*(?:is|:)", model_output, maxsplit=1, flags=re.IGNORECASE)
    if len(options) == len(LETTERS) and len(tail) == 2:
        said = _normalise_words(tail[1].split(".")[0])
        hits = [letter for letter, opt in zip(LETTERS, options, strict=True) if _normalise_words(str(opt)) == said]
        if len(hits) == 1:
            return hits[0]
    return None


def _normalise_words(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def parse_gsm8k_response(model_output: str) -> str | None:
    """The last number in the output, thousands separators removed ("1,234.50" -> "1234.50"); None if none."""
    numbers = _NUMBER.findall(model_output)
    if not numbers:
        return None
    return numbers[-1].replace(",", "").rstrip(".")


def gsm8k_gold_answer(answer_field: str) -> str:
    """GSM8K stores the solution then "#### <answer>"; returns the number after the marker."""
    if "####" not in answer_field:
        raise ValueError("GSM8K answer field has no '####' marker")
    return answer_field.rsplit("####", 1)[1].strip().replace(",", "")


def numbers_equal(predicted: str | None, gold: str) -> bool:
    """Numeric equality with a float fallback, so "72.0" matches "72"."""
    if predicted is None:
        return False
    try:
        return abs(float(predicted) - float(gold)) < 1e-6 * max(1.0, abs(float(gold)))
    except ValueError:
        return predicted.strip() == gold.strip()
