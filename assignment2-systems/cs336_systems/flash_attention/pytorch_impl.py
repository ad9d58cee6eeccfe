"""FlashAttention-2 in plain PyTorch: a tiled forward with online softmax and a tiled backward that
recomputes P from Q, K and the saved logsumexp L.

All query tiles are processed together (as the GPU grid would run them in parallel) while key tiles are
visited one at a time, so memory is O(n_queries × key_tile) instead of O(n_queries × n_keys); under a
causal mask the query tiles that cannot see a key tile are skipped. This is the debugging twin of the
Triton version and runs on any device.
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Float
from torch import Tensor

from cs336_systems.flash_attention._common import alloc, check_qkv


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulate in at least float32 (bf16/fp16 inputs are upcast tile by tile)."""
    return torch.promote_types(dtype, torch.float32)


def flash_forward(
    q: Float[Tensor, "... nq d"],
    k: Float[Tensor, "... nk d"],
    v: Float[Tensor, "... nk d"],
    is_causal: bool = False,
    q_tile: int = 64,
    k_tile: int = 64,
) -> tuple[Float[Tensor, "... nq d"], Float[Tensor, "... nq"]]:
    """Algorithm 1 of the handout: returns O (q's dtype) and L = logsumexp of scaled scores (≥ float32)."""
    *lead, n_q, d = q.shape
    n_k = k.shape[-2]
    cd = _compute_dtype(q.dtype)
    scale = 1.0 / math.sqrt(d)
    n_qt = -(-n_q // q_tile)
    pad = n_qt * q_tile - n_q
    qt = torch.nn.functional.pad(q.to(cd), (0, 0, 0, pad)).reshape(*lead, n_qt, q_tile, d)
    q_idx = torch.arange(n_qt * q_tile, device=q.device).reshape(n_qt, q_tile)

    m = torch.full((*lead, n_qt, q_tile), float("-inf"), dtype=cd, device=q.device)
    row_sum = torch.zeros((*lead, n_qt, q_tile), dtype=cd, device=q.device)
    acc = torch.zeros((*lead, n_qt, q_tile, d), dtype=cd, device=q.device)
    for j0 in range(0, n_k, k_tile):
        j1 = min(j0 + k_tile, n_k)
        # under the causal mask query rows < j0 see nothing of this key tile: start at the tile holding row j0
        i0 = min(j0 // q_tile, n_qt) if is_causal else 0
        if i0 >= n_qt:
            break
        kj = k[..., j0:j1, :].to(cd)
        vj = v[..., j0:j1, :].to(cd)
        s = (qt[..., i0:, :, :] @ kj.transpose(-1, -2).unsqueeze(-3)) * scale
        if is_causal:
            keep = q_idx[i0:, :, None] >= torch.arange(j0, j1, device=q.device)
            s = s.masked_fill(~keep, float("-inf"))
        m_old = m[..., i0:, :]
        m_new = torch.maximum(m_old, s.amax(dim=-1))
        p = torch.exp(s - m_new[..., None])
        alpha = torch.exp(m_old - m_new)
        row_sum[..., i0:, :] = alpha * row_sum[..., i0:, :] + p.sum(dim=-1)
        acc[..., i0:, :, :] = alpha[..., None] * acc[..., i0:, :, :] + p @ vj.unsqueeze(-3)
        m[..., i0:, :] = m_new

    o = alloc((*lead, n_q, d), like=q)
    o.copy_((acc / row_sum[..., None]).reshape(*lead, n_qt * q_tile, d)[..., :n_q, :])
    lse = (m + torch.log(row_sum)).reshape(*lead, n_qt * q_tile)[..., :n_q]
    return o, lse.contiguous()


def flash_backward(
    q: Float[Tensor, "... nq d"],
    k: Float[Tensor, "... nk d"],
    v: Float[Tensor, "... nk d"],
    o: Float[Tensor, "... nq d"],
    lse: Float[Tensor, "... nq"],
    grad_o: Float[Tensor, "... nq d"],
    is_causal: bool = False,
    k_tile: int = 128,
) -> tuple[Float[Tensor, "... nq d"], Float[Tensor, "... nk d"], Float[Tensor, "... nk d"]]:
    """Equations 13–19 of the handout, one key tile at a time: P = exp(S − L), D = rowsum(dO ∘ O)."""
    n_q, d = q.shape[-2:]
    n_k = k.shape[-2]
    cd = _compute_dtype(q.dtype)
    scale = 1.0 / math.sqrt(d)
    qc, doc, lse = q.to(cd), grad_o.to(cd), lse.to(cd)
    delta = (doc * o.to(cd)).sum(dim=-1)

    dq = torch.zeros(q.shape, dtype=cd, device=q.device)
    dk = alloc(tuple(k.shape), like=k)
    dv = alloc(tuple(v.shape), like=v)
    for j0 in range(0, n_k, k_tile):
        j1 = min(j0 + k_tile, n_k)
        i0 = j0 if is_causal else 0  # causal: queries before j0 see none of these keys
        if i0 >= n_q:
            dk[..., j0:, :] = 0
            dv[..., j0:, :] = 0
            break
        kj, vj = k[..., j0:j1, :].to(cd), v[..., j0:j1, :].to(cd)
        qi, doi = qc[..., i0:, :], doc[..., i0:, :]
        s = (qi @ kj.transpose(-1, -2)) * scale
        if is_causal:
            keep = torch.arange(i0, n_q, device=q.device)[:, None] >= torch.arange(j0, j1, device=q.device)
            s = s.masked_fill(~keep, float("-inf"))
        p = torch.exp(s - lse[..., i0:, None])
        dv[..., j0:j1, :] = p.transpose(-1, -2) @ doi
        dp = doi @ vj.transpose(-1, -2)
        ds = p * (dp - delta[..., i0:, None])
        dq[..., i0:, :] += (ds @ kj) * scale
        dk[..., j0:j1, :] = (ds.transpose(-1, -2) @ qi) * scale
    return dq.to(q.dtype), dk, dv


class FlashAttentionPytorch(torch.autograd.Function):
    """`FlashAttentionPytorch.apply(q, k, v, is_causal=False)`: saves Q, K, V, O and L (shape q.shape[:-1])."""

    q_tile: int = 64
    k_tile: int = 64
    backward_k_tile: int = 128

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, is_causal: bool = False) -> Tensor:
        check_qkv(q, k, v)
        cls = FlashAttentionPytorch
        o, lse = flash_forward(q, k, v, bool(is_causal), cls.q_tile, cls.k_tile)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.is_causal = bool(is_causal)
        return o

    @staticmethod
    def backward(ctx, grad_o: Tensor):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = flash_backward(q, k, v, o, lse, grad_o, ctx.is_causal, FlashAttentionPytorch.backward_k_tile)
        return dq, dk, dv, None
