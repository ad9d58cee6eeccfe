"""Evaluation settings shared by the SFT, EI and GRPO loops (R1-Zero-style reward on held-out questions)."""

from dataclasses import dataclass, replace
from typing import Any

from torch import nn

from cs336_alignment.generation import GenerationBackend, SamplingParams
from cs336_alignment.training.common import RewardFn, RunDir, evaluate_reward
from cs336_basics.cli_support import bounded, check_ranges


@dataclass
class QuestionSet:
    """Prompts (already in the R1-Zero template) and their ground-truth answers."""

    prompts: list[str]
    truths: list[str]

    def __post_init__(self):
        if len(self.prompts) != len(self.truths):
            raise ValueError(f"{len(self.prompts)} prompts but {len(self.truths)} answers")

    def __len__(self) -> int:
        return len(self.prompts)

    def head(self, limit: int | None) -> "QuestionSet":
        return self if limit is None else QuestionSet(self.prompts[:limit], self.truths[:limit])


@dataclass
class EvalSettings:
    """How held-out reward is measured: sampling like the handout (temperature 1, stop after </answer>)."""

    eval_every: int = bounded(0, ge=0)  # steps (GRPO/SFT) or rounds (EI) between evaluations; 0: start and end
    eval_limit: int | None = bounded(None, ge=1)  # evaluate on the first N held-out questions
    eval_temperature: float = bounded(1.0, ge=0)
    eval_max_tokens: int = bounded(1024, ge=1)
    eval_seed: int = bounded(1234, ge=0)  # the same sampling noise at every evaluation
    log_generations: int = bounded(8, ge=0)  # examples per evaluation written to generations.jsonl

    def __post_init__(self) -> None:
        """Every numeric field of this class and its subclasses (the loops' configs) within its declared range:
        a bad flag fails at construction, naming the flag, before any model is loaded."""
        check_ranges(self)

    def sampling(self, stop: tuple[str, ...] = ("</answer>",)) -> SamplingParams:
        return SamplingParams(temperature=self.eval_temperature, max_tokens=self.eval_max_tokens, stop=stop,
                              include_stop_str_in_output=True, seed=self.eval_seed)


def run_eval(
    step: int,
    settings: EvalSettings,
    backend: GenerationBackend,
    policy: nn.Module,
    tokenizer: Any,
    questions: QuestionSet,
    reward_fn: RewardFn,
    run_dir: RunDir,
    stop: tuple[str, ...] = ("</answer>",),
) -> dict[str, Any]:
    """Evaluates, logs an `eval` metrics line plus sample generations, and returns the summary."""
    subset = questions.head(settings.eval_limit)
    records, summary = evaluate_reward(backend, policy, tokenizer, subset.prompts, subset.truths, reward_fn,
                                       settings.sampling(stop))
    run_dir.log({"step": step, "kind": "eval", **{f"eval_{k}": v for k, v in summary.items()}})
    run_dir.log_generations(step, records[: settings.log_generations])
    return summary


def greedy(settings: EvalSettings) -> EvalSettings:
    return replace(settings, eval_temperature=0.0)
