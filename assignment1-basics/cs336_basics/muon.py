"""Muon: momentum orthogonalised by a Newton–Schulz iteration, for the hidden weight matrices of a network.

Written from K. Jordan, "Muon: An optimizer for hidden layers in neural networks" (2024), with the update
scale of J. Liu et al., "Muon is Scalable for LLM Training" (Moonshot AI, 2025). For a hidden matrix W
(rows × cols) with gradient G:

    B ← μ·B + (1 − μ)·G                        momentum as an exponential average
    M = (1 − μ)·G + μ·B   (Nesterov)   or   M = B
    O ≈ U Vᵀ  where M = U Σ Vᵀ                 five steps of the quintic Newton–Schulz iteration below
    W ← W·(1 − lr·λ) − lr · 0.2·√max(rows, cols) · O

Scale convention (Moonshot's): an orthogonal rows × cols matrix has RMS entry 1/√max(rows, cols), so the
factor 0.2·√max(rows, cols) gives every Muon update an RMS of about 0.2, the typical RMS of an AdamW update;
AdamW's learning rate and weight decay then carry over unchanged (Keller Jordan's original factor is
√max(1, rows/cols) with a learning rate about 0.02). The exponential-average momentum differs from the
blog's B ← μB + G only by the factor (1 − μ), which the normalisation inside Newton–Schulz removes.

Embeddings, the LM head, norm gains, biases and MoE routers are not hidden matrices: their groups
(`use_muon=False`) take the AdamW update. 3-D stacked expert weights (E, rows, cols) are E matrices, each
orthogonalised on its own.
"""

import math
from collections import defaultdict
from collections.abc import Callable

import torch
from jaxtyping import Float
from torch import Tensor, nn

from cs336_basics.optim import adamw_group_step, evaluate_closure

# Coefficients of the quintic p(σ) = aσ + bσ³ + cσ⁵ (Jordan): the slope at 0 is as steep as possible while the
# iterates stay in roughly [0.7, 1.2]; singular values are pushed towards 1 quickly but not exactly onto it.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
UPDATE_RMS = 0.2


def newton_schulz(
    matrix: Float[Tensor, "... rows cols"], steps: int = 5, dtype: torch.dtype | None = None, eps: float = 1e-7
) -> Float[Tensor, "... rows cols"]:
    """An approximation of the polar factor U Vᵀ of each matrix (last two dims), without an SVD.

    X₀ = M / (‖M‖_F + eps) puts every singular value in [0, 1]; each step X ← aX + (bA + cA²)X with A = XXᵀ
    maps each singular value σ to p(σ) and leaves the singular vectors alone. The Gram matrix is taken on the
    smaller side. `dtype` defaults to bfloat16 on CUDA (the iteration tolerates it) and the input's otherwise.
    """
    a, b, c = NS_COEFFICIENTS
    if dtype is None:
        dtype = torch.bfloat16 if matrix.is_cuda else matrix.dtype
    x = matrix.to(dtype)
    transposed = x.shape[-2] > x.shape[-1]
    if transposed:
        x = x.mT
    x = x / (torch.linalg.matrix_norm(x, keepdim=True) + eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if transposed else x


def update_scale(shape: torch.Size) -> float:
    """0.2·√max(rows, cols): the RMS of the orthogonalised update becomes about 0.2 (see the module docstring)."""
    return UPDATE_RMS * math.sqrt(max(shape[-2], shape[-1]))


class Muon(torch.optim.Optimizer):
    """Muon for groups with `use_muon=True` (2-D or stacked 3-D weights), AdamW for the other groups.

    Build the groups with `muon_param_groups(model, ...)`; the defaults below apply to keys a group leaves out.
    """

    def __init__(
        self,
        param_groups,
        lr: float = 1e-3,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
    ):
        if lr < 0 or weight_decay < 0:
            raise ValueError(f"need lr >= 0 and weight_decay >= 0, got lr={lr}, weight_decay={weight_decay}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must lie in [0, 1), got {momentum}")
        if ns_steps < 1:
            raise ValueError(f"ns_steps must be >= 1, got {ns_steps}")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, weight_decay=weight_decay,
                        betas=tuple(betas), eps=eps, use_muon=True)
        super().__init__(param_groups, defaults)
        for group in self.param_groups:
            if group["use_muon"]:
                bad = [tuple(p.shape) for p in group["params"] if p.ndim not in (2, 3)]
                if bad:
                    raise ValueError(f"Muon takes matrices (2-D) or stacks of them (3-D); got shapes {bad}")

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = evaluate_closure(closure)
        for group in self.param_groups:
            if group["use_muon"]:
                self._muon_group_step(group)
            else:
                adamw_group_step(self.state, group)
        return loss

    def _muon_group_step(self, group: dict) -> None:
        lr, mu, weight_decay = group["lr"], group["momentum"], group["weight_decay"]
        by_shape: dict[tuple, list[tuple[Tensor, Tensor]]] = defaultdict(list)
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            buffer = state["momentum_buffer"]
            buffer.lerp_(p.grad, 1.0 - mu)
            update = p.grad.lerp(buffer, mu) if group["nesterov"] else buffer
            by_shape[(tuple(p.shape), p.dtype, p.device)].append((p, update))
        # Matrices of one shape go through Newton–Schulz together: one batched matmul instead of one each.
        for (shape, _, _), items in by_shape.items():
            stacked = torch.stack([update for _, update in items])
            orthogonal = newton_schulz(stacked, group["ns_steps"])
            step_size = -lr * update_scale(torch.Size(shape))
            for (p, _), o in zip(items, orthogonal, strict=True):
                p.mul_(1.0 - lr * weight_decay)
                p.add_(o.to(p.dtype), alpha=step_size)


def is_hidden_matrix(name: str, param: nn.Parameter) -> bool:
    """A weight inside a Transformer block that multiplies activations: not the embeddings or LM head (outside
    the blocks), not a gain or bias (1-D), not an MoE router (its rows are per-expert scores, not features)."""
    return name.startswith("layers.") and param.ndim in (2, 3) and ".router." not in name


def muon_param_groups(model: nn.Module, muon_lr_scale: float = 1.0, **shared) -> list[dict]:
    """Two groups for `Muon`: the hidden matrices (Muon, learning rate × `muon_lr_scale`) and everything else
    (AdamW). `shared` (weight_decay, betas, eps, momentum, ...) goes to both."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    hidden = [p for n, p in named if is_hidden_matrix(n, p)]
    other = [p for n, p in named if not is_hidden_matrix(n, p)]
    groups = [dict(params=hidden, use_muon=True, lr_scale=muon_lr_scale, **shared),
              dict(params=other, use_muon=False, lr_scale=1.0, **shared)]
    return [g for g in groups if g["params"]]
