import pytest

from cs336_alignment.evaluation.safety import looks_like_refusal, parse_verdict
from cs336_alignment.parsing import gsm8k_gold_answer, numbers_equal, parse_gsm8k_response, parse_mmlu_response

EXAMPLE = {"subject": "virology", "question": "How many?", "options": ["100", "1", "10", "unknown"], "answer": "A"}


@pytest.mark.parametrize(("output", "letter"), [
    ("The correct answer is B. There is only one.", "B"),
    ("The correct answer is (C)", "C"),
    ("Answer: D", "D"),
    ("the answer is **A**.", "A"),
    ("B", "B"),
    ("(C) 10", "C"),
    ("The correct answer is unknown.", "D"),  # quotes exactly one option's text
    ("The correct answer is 10000 polyomaviruses.", None),
    ("A virus is a small infectious agent.", None),  # the article "A" is not an answer
    ("I think the answer is a mystery.", None),
    ("", None),
])
def test_mmlu_letters(output, letter):
    assert parse_mmlu_response(EXAMPLE, output) == letter


@pytest.mark.parametrize(("output", "number"), [
    ("Natalia sold 48/2 = 24 clips in May. Natalia sold 48+24 = 72 clips altogether.", "72"),
    ("It costs $1,234.50 in total.", "1234.50"),
    ("The temperature fell to -3 degrees.", "-3"),
    ("The answer is 18.", "18"),
    ("So 10-3 = 7, and 7-3", "3"),
    ("The change is (-4).", "-4"),
    ("seventy-two clips", None),
])
def test_gsm8k_last_number(output, number):
    assert parse_gsm8k_response(output) == number


def test_gsm8k_gold_and_numeric_equality():
    assert gsm8k_gold_answer("She makes 9 * 2 = $<<9*2=18>>18.\n#### 1,018") == "1018"
    assert numbers_equal("72.0", "72") and not numbers_equal("71", "72") and not numbers_equal(None, "1")
    with pytest.raises(ValueError, match="####"):
        gsm8k_gold_answer("no marker")


def test_safety_verdicts_and_refusal_heuristic():
    assert parse_verdict(" Safe.") is True and parse_verdict("unsafe - it explains how") is False
    assert parse_verdict("The reply is not safe") is False
    assert parse_verdict("I cannot tell") is None
    assert looks_like_refusal("I'm sorry, but I can't help with that. Please reach out to a crisis line.")
    assert looks_like_refusal("I cannot assist with evading taxes.")
    assert not looks_like_refusal("Sure! Here are five famous Broadway actors.")
