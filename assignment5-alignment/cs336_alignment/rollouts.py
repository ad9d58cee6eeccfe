"""Sampling GRPO/EI rollout groups: G completions per question, laid out the way the reward code expects."""

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from cs336_alignment.generation import GenerationBackend, SamplingParams


@dataclass
class RolloutBatch:
    """Consecutive groups of `group_size` rollouts per question (question-major), each with its prompt/truth
    and the token ids the backend sampled for it (`response_token_ids`, empty when unknown)."""

    prompts: list[str]
    responses: list[str]
    ground_truths: list[str]
    group_size: int
    response_token_ids: list[list[int]] = field(default_factory=list)


def sample_rollouts(
    backend: GenerationBackend,
    prompts: Sequence[str],
    ground_truths: Sequence[str],
    group_size: int,
    params: SamplingParams,
) -> RolloutBatch:
    """`group_size` samples per prompt (overriding `params.n`), ready for `compute_group_normalized_rewards`
    and `tokenize_prompt_and_sampled_output`."""
    if len(prompts) != len(ground_truths):
        raise ValueError(f"{len(prompts)} prompts but {len(ground_truths)} ground truths")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    completions = backend.generate(list(prompts), replace(params, n=group_size))
    if len(completions) != len(prompts) * group_size:
        raise RuntimeError(f"backend returned {len(completions)} completions for {len(prompts)} x {group_size}")
    indices = [c.prompt_index for c in completions]
    if indices != [i for i in range(len(prompts)) for _ in range(group_size)]:
        raise RuntimeError("backend did not return completions grouped by prompt")
    return RolloutBatch(
        prompts=[prompts[i] for i in indices],
        responses=[c.text for c in completions],
        ground_truths=[ground_truths[i] for i in indices],
        group_size=group_size,
        response_token_ids=[list(c.token_ids) for c in completions],
    )
