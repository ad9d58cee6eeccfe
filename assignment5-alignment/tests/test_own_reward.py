import pytest

from cs336_alignment.answers import answers_match, last_boxed, normalize_answer
from cs336_alignment.reward import extract_tagged_answer, question_only_reward, r1_zero_reward


def wrap(answer: str) -> str:
    return f" some reasoning </think> <answer>{answer}</answer>"


@pytest.mark.parametrize(("predicted", "gold"), [
    ("1/2", "\\frac{1}{2}"),
    ("0.5", "\\frac12"),
    ("\\dfrac{3}{4}", "0.75"),
    ("-\\frac{1}{3}", "-1/3"),
    ("5 cm", "5"),
    ("5\\text{ cm}", "5"),
    ("12 \\text{ square units}", "12"),
    ("1,000", "1000"),
    ("\\$1,000.00", "1000"),
    ("$\\boxed{42}$", "42"),
    ("x = 3", "3"),
    ("90^\\circ", "90"),
    ("50\\%", "50"),
    ("\\left( 3, 4 \\right)", "(3,4)"),
    ("\\sqrt{8}/2", "\\sqrt{2}"),  # only SymPy (math-verify) sees this one
    ("\\frac{\\pi}{2}", "\\pi/2"),
    ("72 clips", "72"),
    ("3.0", "3"),
])
def test_equivalent_answers_match(predicted, gold):
    assert answers_match(predicted, gold)
    assert r1_zero_reward(wrap(predicted), gold) == {"format_reward": 1.0, "answer_reward": 1.0, "reward": 1.0}


@pytest.mark.parametrize(("predicted", "gold"), [
    ("2", "3"),
    ("1,2", "12"),  # a pair, not a thousands separator
    ("\\frac{1}{3}", "0.33"),
    ("She sold 15 clips.", "72"),
    ("", "0"),
    ("(1, 2)", "(2, 1)"),
])
def test_different_answers_do_not_match(predicted, gold):
    assert not answers_match(predicted, gold)
    scores = r1_zero_reward(wrap(predicted), gold)
    assert scores["format_reward"] == 1.0 and scores["answer_reward"] == 0.0 and scores["reward"] == 0.0


@pytest.mark.parametrize("response", [
    " reasoning <answer>72</answer>",  # reasoning never closed
    " reasoning </think> 72",  # no answer tags
    " reasoning </think> <answer>72",  # answer never closed
    " reasoning </think> so <answer>72</answer>",  # text between the closed reasoning and the answer
    "72",
])
def test_wrong_format_scores_zero_even_when_the_number_is_right(response):
    assert r1_zero_reward(response, "72") == {"format_reward": 0.0, "answer_reward": 0.0, "reward": 0.0}


def test_tag_extraction_and_multiple_ground_truths():
    assert extract_tagged_answer("a </think>\n<answer> 4x + 10 </answer>") == "4x + 10"
    assert extract_tagged_answer("</think> <answer>1</answer> more </think> <answer>2</answer>") == "2"
    assert r1_zero_reward(wrap("\\frac{1}{2}"), ["0.4", "0.5"])["reward"] == 1.0


def test_boxed_helpers_and_question_only_reward():
    assert last_boxed("first \\boxed{1} then \\boxed{\\frac{a}{b}}") == "\\frac{a}{b}"
    assert last_boxed("no box") is None
    assert normalize_answer("\\boxed{\\text{(A)}}") == "(A)"
    assert normalize_answer("\\text{ Yes }") == "yes"  # plain words compare case-insensitively
    assert question_only_reward("so the result is \\boxed{0.5}.", "\\frac{1}{2}")["reward"] == 1.0
    assert question_only_reward("the result is 0.5", "\\frac{1}{2}")["format_reward"] == 0.0
