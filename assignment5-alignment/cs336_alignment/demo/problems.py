"""Arithmetic word problems with step-by-step reasoning, generated from a seed (the demo's stand-in for MATH).

A problem is a chain of 1-4 operations on a starting amount (buy, give away, double, share equally...). Its
reasoning trace writes one equation per step ("23 + 17 = 40."), then `</think> <answer>N</answer>`. With
`error_rate` > 0 some traces carry a slip in one step (a wrong result that the rest of the chain then uses),
as noisy human-written or web solutions do; the ground truth stays the correct answer. Splits are decided by
a hash of the question text, so train and held-out problems never coincide.
"""

import hashlib
import random
from dataclasses import dataclass

from cs336_alignment.prompts import format_prompt

NAMES = ("Ann", "Ben", "Cara", "Dan", "Eve", "Finn", "Gus", "Hana", "Ivy", "Jack", "Kim", "Leo", "Mia", "Noah")
ITEMS = ("apples", "books", "coins", "marbles", "stickers", "pencils", "cards", "shells", "stamps", "beads")


@dataclass(frozen=True)
class Problem:
    question: str
    steps: tuple[tuple[int, str, int, int], ...]  # (left, op, right, result) per equation
    answer: int

    def reasoning(self, slip: tuple[int, int] | None = None) -> tuple[str, int]:
        """The equation chain; `slip` = (step index, offset) makes that step's result wrong and propagates it."""
        value, parts = self.steps[0][0], []
        for i, (_, op, right, _) in enumerate(self.steps):
            result = _apply(value, op, right)
            if slip is not None and slip[0] == i:
                result = max(0, result + slip[1])
            parts.append(f"{value} {op} {right} = {result}.")
            value = result
        return " ".join(parts), value

    def r1_prompt(self) -> str:
        return format_prompt("r1_zero", question=self.question)

    def r1_response(self, slip: tuple[int, int] | None = None) -> str:
        """The SFT target after the prompt's "<think>": reasoning, then the tagged answer."""
        text, value = self.reasoning(slip)
        return f" {text} </think> <answer>{value}</answer>"

    def plain_text(self, slip: tuple[int, int] | None = None) -> str:
        """The pretraining form: question, worked equations, "The answer is N." (no R1 tags)."""
        text, value = self.reasoning(slip)
        return f"{self.question} {text} The answer is {value}."


def _apply(value: int, op: str, right: int) -> int:
    return {"+": value + right, "-": value - right, "*": value * right, "/": value // right}[op]


def _pronoun(name: str) -> str:
    return "She" if name in ("Ann", "Cara", "Eve", "Hana", "Ivy", "Kim", "Mia") else "He"


def make_problem(rng: random.Random, min_steps: int = 1, max_steps: int = 4, max_value: int = 999) -> Problem:
    """One random chain of operations whose every intermediate value stays in [0, max_value]."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    he = _pronoun(name)
    value = rng.randint(2, 99)
    sentences = [f"{name} has {value} {item}."]
    steps = []
    for _ in range(rng.randint(min_steps, max_steps)):
        options = []
        if value + 10 <= max_value:
            b = rng.randint(2, min(99, max_value - value))
            options += [("+", b, f"{he} buys {b} more."), ("+", b, f"{he} finds {b} more.")]
        if value >= 4:
            b = rng.randint(1, min(99, value - 1))
            options += [("-", b, f"{he} gives away {b}."), ("-", b, f"{he} loses {b}.")]
        if 2 * value <= max_value:
            k = rng.randint(2, max(2, min(9, max_value // max(value, 1))))
            word = {2: "doubles", 3: "triples"}.get(k)
            options.append(("*", k, f"{he} {word} them." if word else f"{he} makes it {k} times as many."))
        divisors = [d for d in range(2, 10) if value % d == 0 and value // d >= 1]
        if divisors:
            d = rng.choice(divisors)
            options.append(("/", d, f"{he} shares them equally among {d} friends and keeps one share."))
        op, right, sentence = rng.choice(options)
        result = _apply(value, op, right)
        steps.append((value, op, right, result))
        sentences.append(sentence if len(steps) == 1 else "Then " + sentence[0].lower() + sentence[1:])
        value = result
    sentences.append(f"How many {item} does {name} have now?")
    return Problem(" ".join(sentences), tuple(steps), value)


def is_held_out(problem: Problem, held_out_percent: int = 10) -> bool:
    digest = hashlib.md5(problem.question.encode("utf-8")).digest()
    return digest[0] * 100 // 256 < held_out_percent


def generate(n: int, seed: int, held_out: bool, max_steps: int = 4, held_out_percent: int = 10) -> list[Problem]:
    """`n` distinct problems from `seed`, all from the train split or all from the held-out split."""
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[Problem] = []
    while len(out) < n:
        p = make_problem(rng, max_steps=max_steps)
        if is_held_out(p, held_out_percent) == held_out and p.question not in seen:
            seen.add(p.question)
            out.append(p)
    return out


def maybe_slip(problem: Problem, rng: random.Random, error_rate: float) -> tuple[int, int] | None:
    """With probability `error_rate`, one step's result is off by a small nonzero amount."""
    if rng.random() >= error_rate:
        return None
    return rng.randrange(len(problem.steps)), rng.choice([-1, 1]) * rng.randint(1, 10)
