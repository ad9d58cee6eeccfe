"""Prompt templates shipped as files in `cs336_alignment/prompts/`, filled with `str.format`-style fields.

`alpaca_sft` is the public Stanford Alpaca instruction format, kept verbatim because the SFT/DPO data and its
expected token ids depend on it; `mmlu` and `gsm8k` follow the answer formats the supplement asks for; the
R1-Zero-style, system and safety-judge prompts are our own wording.
"""

import string
from functools import cache
from importlib import resources

PROMPT_NAMES = ("r1_zero", "question_only", "alpaca_sft", "zero_shot_system", "mmlu", "gsm8k", "safety_judge")


@cache
def load_prompt(name: str) -> str:
    """The raw template text of a packaged prompt."""
    if name not in PROMPT_NAMES:
        raise ValueError(f"unknown prompt {name!r}; expected one of {PROMPT_NAMES}")
    return resources.files("cs336_alignment").joinpath("prompts", f"{name}.prompt").read_text(encoding="utf-8")


def template_fields(template: str) -> set[str]:
    return {field for _, field, _, _ in string.Formatter().parse(template) if field}


def render(template: str, **fields: str) -> str:
    """Fills a template, failing with the missing field's name rather than a bare KeyError."""
    missing = template_fields(template) - fields.keys()
    if missing:
        raise ValueError(f"prompt template needs field(s) {sorted(missing)}")
    return template.format(**fields)


def format_prompt(name: str, **fields: str) -> str:
    return render(load_prompt(name), **fields)


def alpaca_prefix(instruction: str) -> str:
    """The Alpaca template up to (not including) the response: the conditioning part of SFT/DPO examples."""
    return format_prompt("alpaca_sft", instruction=instruction, response="")
