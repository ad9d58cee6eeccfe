"""Numerical parity of our model with its Hugging Face twin: logits and every parameter gradient.

Used by the tests and for the measurements quoted in the README. Gradients of the HF model are mapped
back through `from_hf_state_dict` (the key mapping is linear and orthogonal, so it maps gradients as it maps
weights) and compared with ours parameter by parameter.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cs336_basics.hf.weights import from_hf_state_dict
from cs336_basics.model import TransformerLM


@dataclass
class Parity:
    max_logit_diff: float
    max_grad_diff: float  # max over parameters of max |g_ours − g_hf| / (max |g_ours| + 1e-12)
    worst_parameter: str
    max_logit: float

    def holds(self, logit_tol: float, grad_tol: float) -> bool:
        return self.max_logit_diff <= logit_tol and self.max_grad_diff <= grad_tol


def _loss(logits: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def randomize_(model: nn.Module, generator: torch.Generator, scale: float = 0.1) -> None:
    """Norm gains away from 1 and every routing bias non-zero, so a mis-mapped gain or bias shows."""
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if name.endswith(("ln1.weight", "ln2.weight", "ln_final.weight", "norm.weight")):
                tensor.add_(scale * torch.randn(tensor.shape, generator=generator))
            elif name.endswith("expert_bias"):
                tensor.copy_(scale * torch.randn(tensor.shape, generator=generator))


def compare(ours: TransformerLM, hf_model: nn.Module, ids: Tensor, targets: Tensor) -> Parity:
    """Forward and backward of the same cross-entropy loss through both models (same weights assumed)."""
    ours.zero_grad(set_to_none=True)
    hf_model.zero_grad(set_to_none=True)
    logits = ours(ids)
    hf_logits = hf_model(input_ids=ids, use_cache=False).logits
    _loss(logits, targets).backward()
    _loss(hf_logits, targets).backward()
    hf_grads = {name: p.grad if p.grad is not None else torch.zeros_like(p)
                for name, p in hf_model.named_parameters()}
    hf_grads |= {name: torch.zeros_like(b) for name, b in hf_model.named_buffers()
                 if name.endswith("e_score_correction_bias")}  # a buffer on both sides: no gradient
    mapped = from_hf_state_dict(hf_grads, ours.config)
    worst, worst_name = 0.0, ""
    for name, p in ours.named_parameters():
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        diff = float((grad - mapped[name]).abs().max() / (grad.abs().max() + 1e-12))
        if diff > worst:
            worst, worst_name = diff, name
    return Parity(max_logit_diff=float((logits - hf_logits).detach().abs().max()), max_grad_diff=worst,
                  worst_parameter=worst_name, max_logit=float(logits.detach().abs().max()))
