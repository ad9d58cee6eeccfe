"""Prompt/response pairs to model inputs, shifted labels and a response mask (SFT, EI, GRPO all start here)."""

from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from cs336_alignment.text_tokenizer import encode, pad_token_id


def tokenize_prompt_and_output(
    prompt_strs: Sequence[str],
    output_strs: Sequence[str],
    tokenizer: Any,
) -> dict[str, Tensor]:
    """Tokenise prompt and output separately (so the boundary is exact), concatenate and right-pad.

    Returns `input_ids` (all but the last token), `labels` (all but the first) and `response_mask`, true where
    a label is an output token, each of shape (batch, longest prompt+output - 1). The prompt keeps the
    tokenizer's own special tokens (e.g. Llama's BOS); the output gets none.
    """
    if len(prompt_strs) != len(output_strs):
        raise ValueError(f"{len(prompt_strs)} prompts but {len(output_strs)} outputs")
    if not prompt_strs:
        raise ValueError("need at least one prompt/output pair")
    prompts = [encode(tokenizer, p, add_special_tokens=True) for p in prompt_strs]
    outputs = [encode(tokenizer, o, add_special_tokens=False) for o in output_strs]
    width = max(len(p) + len(o) for p, o in zip(prompts, outputs, strict=True))
    if width < 2:
        raise ValueError("every prompt+output is shorter than two tokens; nothing to predict")
    ids: Int[Tensor, "batch width"] = torch.full((len(prompts), width), pad_token_id(tokenizer), dtype=torch.long)
    is_output: Bool[Tensor, "batch width"] = torch.zeros((len(prompts), width), dtype=torch.bool)
    for row, (p, o) in enumerate(zip(prompts, outputs, strict=True)):
        ids[row, : len(p) + len(o)] = torch.tensor(p + o, dtype=torch.long)
        is_output[row, len(p) : len(p) + len(o)] = True
    return {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "response_mask": is_output[:, 1:]}
