"""Makes the cs336_basics Transformer look like a Hugging Face causal LM: `model(input_ids).logits`."""

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from cs336_basics.model import TransformerConfig, TransformerLM


@dataclass
class CausalLMOutput:
    logits: Float[Tensor, "batch seq vocab"]


class BasicsCausalLM(nn.Module):
    """Thin wrapper: forward returns an object with `.logits`, and `attention_mask` (1 = real token) may mark
    left or right padding, which becomes the model's key mask with positions counted from the first real token.
    """

    def __init__(self, model: TransformerLM):
        super().__init__()
        self.model = model

    @classmethod
    def from_config(cls, config: TransformerConfig, **kwargs) -> "BasicsCausalLM":
        return cls(TransformerLM(config, **kwargs))

    @property
    def config(self) -> TransformerConfig:
        return self.model.config

    def forward(
        self,
        input_ids: Int[Tensor, "batch seq"],
        attention_mask: Int[Tensor, "batch seq"] | None = None,
        **_: object,
    ) -> CausalLMOutput:
        if attention_mask is None:
            return CausalLMOutput(self.model(input_ids))
        real = attention_mask.bool()
        positions = (real.long().cumsum(dim=-1) - 1).clamp(min=0)
        return CausalLMOutput(self.model(input_ids, positions, key_mask=real))


def as_causal_lm(model: nn.Module) -> nn.Module:
    """HF models pass through; a bare cs336_basics `TransformerLM` gets the `.logits` wrapper."""
    return BasicsCausalLM(model) if isinstance(model, TransformerLM) else model


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
