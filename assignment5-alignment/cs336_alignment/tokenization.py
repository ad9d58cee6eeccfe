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
    return _concatenate_and_pad(prompts, outputs, tokenizer)


def _concatenate_and_pad(prompts: list[list[int]], outputs: list[list[int]], tokenizer: Any) -> dict[str, Tensor]:
    width = max(len(p) + len(o) for p, o in zip(prompts, outputs, strict=True))
    if width < 2:
        raise ValueError("every prompt+output is shorter than two tokens; nothing to predict")
    ids: Int[Tensor, "batch width"] = torch.full((len(prompts), width), pad_token_id(tokenizer), dtype=torch.long)
    is_output: Bool[Tensor, "batch width"] = torch.zeros((len(prompts), width), dtype=torch.bool)
    for row, (p, o) in enumerate(zip(prompts, outputs, strict=True)):
        ids[row, : len(p) + len(o)] = torch.tensor(p + o, dtype=torch.long)
        is_output[row, len(p) : len(p) + len(o)] = True
    return {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "response_mask": is_output[:, 1:]}


def sampled_output_ids(tokenizer: Any, token_ids: Sequence[int], text: str) -> list[int] | None:
    """The sampled tokens behind a completion's `text`, or None when `token_ids` do not decode to `text`
    followed by anything.

    Drops what a backend returns past the text: trailing special tokens (vLLM's EOS id), then trailing tokens
    while the rest still spells the text and they add characters (those of a stop string cut from the text).
    Keeps a last token that runs past the text's end (a stop string ending inside it) and tokens that add no
    character of their own (bytes of one multi-byte character): the policy sampled them.
    """
    ids = list(token_ids)

    def decode(prefix: list[int]) -> str:
        return tokenizer.decode(prefix, skip_special_tokens=True)

    while ids and decode(ids[-1:]) == "":
        ids.pop()
    spelled = decode(ids)
    if not spelled.startswith(text):
        return None
    while ids and (shorter := decode(ids[:-1])).startswith(text) and shorter != spelled:
        ids.pop()
        spelled = shorter
    return ids


def tokenize_prompt_and_sampled_output(
    prompt_strs: Sequence[str],
    output_strs: Sequence[str],
    output_token_ids: Sequence[Sequence[int] | None],
    tokenizer: Any,
) -> dict[str, Tensor]:
    """`tokenize_prompt_and_output` for sampled completions, on the output tokens the policy sampled.

    Re-encoding a sampled text need not give the sampled tokens back (BPE encodes canonically, a policy may
    sample any split; bytes of a broken UTF-8 character decode to U+FFFD), and then log-probs and gradients
    would be those of tokens the policy never chose. Each row's output is `sampled_output_ids` of its ids;
    a row whose ids are None or do not decode to its text is re-encoded from the text. Besides the three
    tensors, `sampled` marks the rows built from sampled ids and `noncanonical` those among them whose
    sampled ids differ from the text's encoding (both of shape (batch,)).
    """
    if not len(prompt_strs) == len(output_strs) == len(output_token_ids):
        raise ValueError(f"{len(prompt_strs)} prompts, {len(output_strs)} outputs and {len(output_token_ids)} "
                         f"token id lists")
    if not prompt_strs:
        raise ValueError("need at least one prompt/output pair")
    prompts = [encode(tokenizer, p, add_special_tokens=True) for p in prompt_strs]
    encoded = [encode(tokenizer, o, add_special_tokens=False) for o in output_strs]
    sampled = [None if ids is None else sampled_output_ids(tokenizer, ids, text)
               for ids, text in zip(output_token_ids, output_strs, strict=True)]
    outputs = [enc if ids is None else ids for ids, enc in zip(sampled, encoded, strict=True)]
    batch = _concatenate_and_pad(prompts, outputs, tokenizer)
    batch["sampled"] = torch.tensor([ids is not None for ids in sampled])
    batch["noncanonical"] = torch.tensor([ids is not None and ids != enc for ids, enc in zip(sampled, encoded,
                                                                                              strict=True)])
    return batch
