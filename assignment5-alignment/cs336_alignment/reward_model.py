"""A scalar value head on a causal LM (ours or Hugging Face's): the reward model trained with the
Bradley–Terry pairwise loss, and the per-token value function PPO uses.

The head reads the final hidden state, the input of the LM head (after the final norm), caught by a forward
pre-hook on the output embedding, so every model family works without knowing its internals.
"""

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cs336_alignment.dpo import preference_sequence
from cs336_alignment.lm import BasicsCausalLM, model_device
from cs336_alignment.text_tokenizer import pad_token_id


def output_embedding(model: nn.Module) -> nn.Module:
    """The module that maps the final hidden state to logits."""
    if isinstance(model, BasicsCausalLM):
        return model.model.lm_head
    if hasattr(model, "get_output_embeddings") and model.get_output_embeddings() is not None:
        return model.get_output_embeddings()
    raise TypeError(f"{type(model).__name__} has no output embedding to read hidden states from")


def hidden_size(model: nn.Module) -> int:
    return output_embedding(model).in_features


class _Captured(Exception):
    def __init__(self, hidden: Tensor):
        super().__init__()
        self.hidden = hidden


def final_hidden_states(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """(batch, seq, d_model) final hidden states; the forward stops there (no vocabulary projection)."""

    def stop(_module, args):
        raise _Captured(args[0])

    handle = output_embedding(model).register_forward_pre_hook(stop)
    kwargs = {} if attention_mask is None else {"attention_mask": attention_mask}
    try:
        model(input_ids, **kwargs)
    except _Captured as captured:
        return captured.hidden
    finally:
        handle.remove()
    raise RuntimeError("the model never called its output embedding")


def forward_with_hidden(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None
                        ) -> tuple[Tensor, Tensor]:
    """(logits, final hidden states) of one forward."""
    seen: list[Tensor] = []
    handle = output_embedding(model).register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    kwargs = {} if attention_mask is None else {"attention_mask": attention_mask}
    try:
        logits = model(input_ids, **kwargs).logits
    finally:
        handle.remove()
    return logits, seen[-1]


class ValueHead(nn.Module):
    """h ↦ w·h + b in fp32; w ~ N(0, 1/(d+1)), b = 0 (the init of OpenAI's summarisation reward models)."""

    def __init__(self, d_model: int, device: torch.device | str | None = None):
        super().__init__()
        self.proj = nn.Linear(d_model, 1, device=device, dtype=torch.float32)
        nn.init.normal_(self.proj.weight, std=1.0 / (d_model + 1) ** 0.5)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.proj(hidden.float()).squeeze(-1)


def last_index(lengths: Tensor) -> Tensor:
    return (lengths - 1).clamp(min=0)


class RewardModel(nn.Module):
    """A causal LM trunk with a `ValueHead`: `forward(ids)` gives a value per position, `score` the value at
    each sequence's last real token (the reward of the whole sequence)."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.value_head = ValueHead(hidden_size(backbone), device=model_device(backbone))

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.value_head(final_hidden_states(self.backbone, input_ids, attention_mask))

    def score(self, input_ids: Tensor, lengths: Tensor) -> Tensor:
        """Rewards of right-padded sequences of the given lengths (padding after the real tokens does not
        reach them through a causal model, so no attention mask is needed)."""
        values = self(input_ids)
        return values.gather(1, last_index(lengths).to(values.device)[:, None]).squeeze(1)


def bradley_terry_loss(chosen: Tensor, rejected: Tensor) -> Tensor:
    """-log σ(r_chosen - r_rejected) = -log P(chosen ≻ rejected) under the Bradley–Terry model, elementwise."""
    return -F.logsigmoid(chosen - rejected)


def pad_sequences(sequences: Sequence[list[int]], pad: int) -> tuple[Tensor, Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    return ids, torch.tensor([len(s) for s in sequences])


def score_texts(reward_model: RewardModel, tokenizer: Any, prompts: Sequence[str], responses: Sequence[str]
                ) -> Tensor:
    """Rewards of (prompt, response) pairs in the preference format the DPO loop uses (Alpaca template + EOS)."""
    sequences = [preference_sequence(tokenizer, p, r) for p, r in zip(prompts, responses, strict=True)]
    ids, lengths = pad_sequences(sequences, pad_token_id(tokenizer))
    return reward_model.score(ids.to(model_device(reward_model)), lengths)


def reward_model_batch(reward_model: RewardModel, tokenizer: Any, pairs: Sequence[dict[str, str]]
                       ) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair Bradley–Terry losses and the chosen and rejected rewards (one forward for both)."""
    prompts = [p["prompt"] for p in pairs] * 2
    responses = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
    rewards = score_texts(reward_model, tokenizer, prompts, responses)
    chosen, rejected = rewards[: len(pairs)], rewards[len(pairs):]
    return bradley_terry_loss(chosen, rejected), chosen, rejected
