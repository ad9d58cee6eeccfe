"""R1-Zero-style rewards: format (closed reasoning, answer in tags) and answer correctness, as a dict.

Both functions follow the `reward_fn(response, ground_truth) -> {"reward", "format_reward", "answer_reward"}`
convention that `compute_group_normalized_rewards` and the evaluation commands use.
"""

import re

from cs336_alignment.answers import answers_match, last_boxed

# The prompt ends with "<think>", so a response is "... </think> <answer> ... </answer>".
_TAGGED = re.compile(r"</think>\s*<answer>(.*?)</answer>", re.DOTALL)


def extract_tagged_answer(response: str) -> str | None:
    """The text inside the last <answer>...</answer> that directly follows a closing </think>; else None."""
    matches = _TAGGED.findall(response)
    return matches[-1].strip() if matches else None


def _scores(format_ok: bool, correct: bool) -> dict[str, float]:
    return {
        "format_reward": float(format_ok),
        "answer_reward": float(format_ok and correct),
        "reward": float(format_ok and correct),
    }


def r1_zero_reward(response: str, ground_truth: str | list[str]) -> dict[str, float]:
    """1 only when the response is well formed and its tagged answer matches (any of) the ground truth(s).

    A malformed response scores 0 everywhere: without the tags there is no answer to grade.
    """
    answer = extract_tagged_answer(response)
    if answer is None:
        return _scores(False, False)
    truths = [ground_truth] if isinstance(ground_truth, str) else list(ground_truth)
    return _scores(True, any(answers_match(answer, t) for t in truths))


def question_only_reward(response: str, ground_truth: str | list[str]) -> dict[str, float]:
    """For the bare-question prompt: the answer is the last \\boxed{...}; format means one exists."""
    answer = last_boxed(response)
    if answer is None:
        return _scores(False, False)
    truths = [ground_truth] if isinstance(ground_truth, str) else list(ground_truth)
    return _scores(True, any(answers_match(answer, t) for t in truths))
