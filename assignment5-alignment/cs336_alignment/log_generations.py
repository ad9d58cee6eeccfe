"""In-the-loop generation logging for SFT/EI/GRPO: prompts, responses, rewards, entropy and lengths."""

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from cs336_alignment.generation import GenerationBackend, SamplingParams
from cs336_alignment.logprobs import get_response_log_probs
from cs336_alignment.masked import masked_mean
from cs336_alignment.tokenization import tokenize_prompt_and_output


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


@torch.no_grad()
def response_entropies(
    policy: nn.Module, tokenizer: Any, prompts: Sequence[str], responses: Sequence[str]
) -> list[float]:
    """Mean next-token entropy over each response's tokens, scored by `policy` (one batch)."""
    batch = tokenize_prompt_and_output(prompts, responses, tokenizer)
    device = next(policy.parameters()).device
    out = get_response_log_probs(policy, batch["input_ids"].to(device), batch["labels"].to(device), True)
    per_example = masked_mean(out["token_entropy"], batch["response_mask"].to(device), dim=-1)
    return [float(v) for v in per_example.cpu()]


def log_generations(
    backend: GenerationBackend,
    prompts: Sequence[str],
    ground_truths: Sequence[str],
    reward_fn: Callable[[str, str], dict[str, float]],
    params: SamplingParams,
    policy: nn.Module | None = None,
    tokenizer: Any = None,
) -> tuple[list[dict[str, Any]], dict[str, float | None]]:
    """Generates one response per prompt and returns per-example records plus summary statistics.

    Records hold prompt, response, ground truth, the three rewards, response length in tokens and (when a
    policy and tokenizer are given) the mean token entropy. The summary has mean rewards, mean entropy, and
    mean response length over all, correct and incorrect responses.
    """
    if len(prompts) != len(ground_truths):
        raise ValueError(f"{len(prompts)} prompts but {len(ground_truths)} ground truths")
    if params.n != 1:
        raise ValueError("log_generations samples one response per prompt; use n=1")
    completions = backend.generate(list(prompts), params)
    responses = [c.text for c in completions]
    entropies: list[float | None] = [None] * len(responses)
    if policy is not None and tokenizer is not None and responses:
        entropies = list(response_entropies(policy, tokenizer, prompts, responses))
    records = []
    for prompt, truth, completion, entropy in zip(prompts, ground_truths, completions, entropies, strict=True):
        records.append({"prompt": prompt, "response": completion.text, "ground_truth": truth,
                        **reward_fn(completion.text, truth), "response_tokens": len(completion.token_ids),
                        "mean_token_entropy": entropy})
    correct = [r["response_tokens"] for r in records if r["reward"] > 0]
    wrong = [r["response_tokens"] for r in records if r["reward"] <= 0]
    summary = {
        "reward": _mean([r["reward"] for r in records]),
        "format_reward": _mean([r.get("format_reward", 0.0) for r in records]),
        "answer_reward": _mean([r.get("answer_reward", 0.0) for r in records]),
        "mean_token_entropy": _mean([e for e in entropies if e is not None]),
        "response_length": _mean(correct + wrong),
        "response_length_correct": _mean(correct),
        "response_length_incorrect": _mean(wrong),
    }
    return records, summary
