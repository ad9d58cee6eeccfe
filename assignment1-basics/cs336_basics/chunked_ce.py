"""LM head + cross-entropy over chunks of tokens, so the [tokens, vocab] float32 logits never exist at once.

At the leaderboard shape (64 × 512 tokens, 32,000-token vocabulary) the plain path writes bf16 logits
(2.1 GB), upcasts them to float32 (4.2 GB) and keeps several float32 tensors of that size alive for the
backward. Here the loss and its gradient are computed in the same pass, one chunk of tokens at a time: the
chunk's logits, their log-softmax and d(loss)/d(logits) live only while the chunk is processed, and the
gradients w.r.t. the hidden states and the head weight are accumulated right away (no recomputation in the
backward, which only scales them by the incoming gradient).

The arithmetic follows the plain path under autocast: the matmuls run in the autocast dtype (bf16) when
autocast is on, the softmax in float32, d(logits) is rounded to the matmul dtype before the two gradient
matmuls; the head-weight gradient is summed over chunks in float32 (or float64).
"""

from collections.abc import Callable

import torch
from torch import Tensor

DEFAULT_CHUNK_TOKENS = 4096


def chunk_loss_and_grad(logits: Tensor, targets: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Summed NLL of one chunk and scale · d(summed NLL)/d(logits) in the logits' dtype.

    d/dlogits of −log softmax(logits)[target] is softmax(logits) − onehot(target). The softmax runs in
    float32 (float64 for float64 logits)."""
    logp = torch.log_softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))
    picked = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    grad = logp.exp()
    grad.scatter_add_(-1, targets.unsqueeze(-1), torch.full_like(picked, -1.0).unsqueeze(-1))
    return -picked.sum(), (grad * scale).to(logits.dtype)


_compiled_chunk_fn: Callable | None = None


def compiled_chunk_loss_and_grad() -> Callable:
    """`chunk_loss_and_grad` under torch.compile (one fused read of the logits for the loss, one for the
    gradient); built once per process."""
    global _compiled_chunk_fn
    if _compiled_chunk_fn is None:
        _compiled_chunk_fn = torch.compile(chunk_loss_and_grad, dynamic=False)
    return _compiled_chunk_fn


def chunk_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Summed NLL of one chunk, the softmax in float32 (float64 for float64 logits)."""
    logp = torch.log_softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))
    return -logp.gather(-1, targets.unsqueeze(-1)).sum()


def _chunked_loss_only(hidden: Tensor, weight: Tensor, targets: Tensor, chunk_tokens: int,
                       compute_dtype: torch.dtype, loss_fn: Callable = chunk_loss) -> Tensor:
    """The loss alone (evaluation, no_grad): the same per-chunk arithmetic as the training path without the
    softmax gradient and its two matmuls, which would otherwise be computed and thrown away."""
    n = hidden.shape[0]
    w = weight.to(compute_dtype)
    loss = torch.zeros((), dtype=torch.promote_types(compute_dtype, torch.float32), device=hidden.device)
    with torch.autocast(hidden.device.type, enabled=False):
        for start in range(0, n, chunk_tokens):
            logits = hidden[start:start + chunk_tokens].to(compute_dtype) @ w.T
            loss += loss_fn(logits, targets[start:start + chunk_tokens])
    return loss / n


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, chunk_tokens: int,
                compute_dtype: torch.dtype, chunk_fn: Callable) -> Tensor:
        n = hidden.shape[0]
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        w = weight.to(compute_dtype)
        loss = torch.zeros((), dtype=torch.promote_types(compute_dtype, torch.float32), device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        accumulate = torch.promote_types(weight.dtype, torch.float32)  # the head gradient's sum over chunks
        grad_weight = None  # the first chunk's product cast, later ones added (no zero-filled start)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, n, chunk_tokens):
                h = hidden[start:start + chunk_tokens].to(compute_dtype)
                logits = h @ w.T
                summed, grad_logits = chunk_fn(logits, targets[start:start + chunk_tokens], 1.0 / n)
                loss += summed
                if grad_hidden is not None:
                    grad_hidden[start:start + chunk_tokens] = grad_logits @ w
                if ctx.needs_input_grad[1]:
                    chunk_grad = grad_logits.T @ h
                    if grad_weight is None:
                        grad_weight = chunk_grad.to(accumulate)
                    else:
                        grad_weight += chunk_grad
                del logits, grad_logits  # the next chunk's logits may take their memory
        if needs_grad:
            ctx.save_for_backward(grad_hidden, grad_weight)
            ctx.weight_dtype = weight.dtype
        return loss / n

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_loss).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None


def chunked_linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor,
                                 chunk_tokens: int = DEFAULT_CHUNK_TOKENS, compiled: bool = False,
                                 fused: bool = False) -> Tensor:
    """Mean cross-entropy of `hidden @ weight.T` (weight: [vocab, d]) against `targets`, chunk by chunk.

    Equals `cross_entropy(hidden @ weight.T, targets)` (and its gradients) up to rounding; under autocast the
    matmuls use the autocast dtype like the plain path does. `compiled` runs the per-chunk softmax under
    torch.compile; `fused` as one Triton pass that writes the gradient over the logits (`fused_ce.py`, on CUDA;
    elsewhere the eager softmax)."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    if compiled and fused:
        raise ValueError("the per-chunk softmax is either compiled or the fused kernel, not both")
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    else:
        compute_dtype = torch.promote_types(hidden.dtype, weight.dtype)
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    if fused:
        from cs336_basics.fused_ce import fused_chunk_loss, fused_chunk_loss_and_grad

        loss_fn, chunk_fn = fused_chunk_loss, fused_chunk_loss_and_grad
    else:
        loss_fn, chunk_fn = chunk_loss, compiled_chunk_loss_and_grad() if compiled else chunk_loss_and_grad
    if not torch.is_grad_enabled() or not (hidden.requires_grad or weight.requires_grad):
        return _chunked_loss_only(flat_hidden, weight, targets.reshape(-1), chunk_tokens, compute_dtype, loss_fn)
    return _ChunkedLinearCrossEntropy.apply(flat_hidden, weight, targets.reshape(-1), chunk_tokens,
                                            compute_dtype, chunk_fn)
