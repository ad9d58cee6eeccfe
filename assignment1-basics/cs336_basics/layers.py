"""The Transformer's building blocks, written from scratch (no torch.nn layers beyond Module/Parameter).

Parameter names match the course's reference state dict so its weights load with `load_state_dict`.
"""

import math

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from cs336_basics.nn_utils import silu


def _capturing(t: Tensor) -> bool:
    """True while a CUDA graph is being captured, when a host sync (`int(t.max())`) would break the capture."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def _trunc_normal_(weight: Tensor, std: float) -> Tensor:
    return nn.init.trunc_normal_(weight, mean=0.0, std=std, a=-3 * std, b=3 * std)


class Linear(nn.Module):
    """y = x Wᵀ without bias; W is (d_out, d_in) as in torch, initialised with σ² = 2 / (d_in + d_out)."""

    def __init__(self, in_features: int, out_features: int, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        _trunc_normal_(self.weight, std=math.sqrt(2.0 / (in_features + out_features)))

    def forward(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_out"]:
        return x @ self.weight.mT  # = einsum("... i, o i -> ... o"), via one GEMM with no extra copies

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class Embedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int, device=None, dtype=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim, device=device, dtype=dtype))
        _trunc_normal_(self.weight, std=1.0)

    def forward(self, token_ids: Int[Tensor, "..."]) -> Float[Tensor, "... d_model"]:
        return self.weight[token_ids]

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


class RMSNorm(nn.Module):
    """x / rms(x) · g, computed in float32 so that bf16 activations do not lose the normaliser."""

    def __init__(self, d_model: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model, device=device, dtype=dtype))

    def forward(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        x32 = x.float()
        inv_rms = torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (x32 * inv_rms * self.weight.float()).to(x.dtype)


class SwiGLU(nn.Module):
    """W2 (SiLU(W1 x) ⊙ W3 x): the gated feed-forward network of LLaMA-style models."""

    def __init__(self, d_model: int, d_ff: int, device=None, dtype=None):
        super().__init__()
        self.w1 = Linear(d_model, d_ff, device=device, dtype=dtype)
        self.w2 = Linear(d_ff, d_model, device=device, dtype=dtype)
        self.w3 = Linear(d_model, d_ff, device=device, dtype=dtype)

    def forward(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        # W1 and W3 as one GEMM (their weights concatenated): half the launches, same parameters and keys.
        gate, up = (x @ torch.cat((self.w1.weight, self.w3.weight)).mT).chunk(2, dim=-1)
        return self.w2(silu(gate) * up)


class SiLUFeedForward(nn.Module):
    """W2 SiLU(W1 x): the ungated ablation baseline (use d_ff = 4·d_model to match SwiGLU's parameters)."""

    def __init__(self, d_model: int, d_ff: int, device=None, dtype=None):
        super().__init__()
        self.w1 = Linear(d_model, d_ff, device=device, dtype=dtype)
        self.w2 = Linear(d_ff, d_model, device=device, dtype=dtype)

    def forward(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        return self.w2(silu(self.w1(x)))


class RotaryPositionalEmbedding(nn.Module):
    """Rotates each adjacent pair (x[2i], x[2i+1]) by the angle pos · θ^(-2i/d_k).

    The cos/sin tables are non-persistent buffers: they are derived from (θ, d_k), so they stay out of
    the state dict and checkpoints remain compatible with the reference weights.
    """

    # The range check costs a host sync per call; a caller that validates positions itself (a server) turns it off.
    check_positions: bool = True

    def __init__(self, theta: float, d_k: int, max_seq_len: int, device=None):
        super().__init__()
        if d_k % 2:
            raise ValueError(f"RoPE needs an even head dimension, got d_k={d_k}")
        self.max_seq_len = max_seq_len
        inv_freq = theta ** (-torch.arange(0, d_k, 2, device=device, dtype=torch.float64) / d_k)
        angles = torch.outer(torch.arange(max_seq_len, device=device, dtype=torch.float64), inv_freq)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)
        # the same per element, as `_rotate` multiplies: cos twice per pair, and (−sin, sin)
        self.register_buffer("cos_pairs", self.cos.repeat_interleave(2, dim=-1), persistent=False)
        self.register_buffer("signed_sin", torch.stack((-self.sin, self.sin), dim=-1).flatten(-2), persistent=False)

    def forward(
        self, x: Float[Tensor, "... seq d_k"], token_positions: Int[Tensor, "... seq"] | None = None, offset: int = 0
    ) -> Float[Tensor, "... seq d_k"]:
        """Rotates x at `token_positions`, or at offset, offset+1, ... when none are given (a cheap slice)."""
        seq_len = x.shape[-2]
        if token_positions is None:
            if offset + seq_len > self.max_seq_len:
                raise ValueError(f"positions up to {offset + seq_len - 1} exceed max_seq_len={self.max_seq_len}")
            cos, sin = self.cos_pairs[offset : offset + seq_len], self.signed_sin[offset : offset + seq_len]
        else:
            if (self.check_positions and token_positions.numel()
                    and not (torch.compiler.is_compiling() or _capturing(token_positions))):
                largest = int(token_positions.max())  # a host sync, so only outside compiled graphs
                if largest >= self.max_seq_len:
                    raise ValueError(f"token position {largest} is beyond max_seq_len={self.max_seq_len}")
            cos, sin = self.cos_pairs[token_positions], self.signed_sin[token_positions]  # (..., seq, d_k)
        return self._rotate(x, cos, sin)

    def rotate_sequence_major(self, x: Float[Tensor, "batch seq *heads d_k"], halves: bool = False
                              ) -> Float[Tensor, "batch seq *heads d_k"]:
        """Rotates x at positions 0, 1, ... along dim 1, the tables broadcast over the head axes after it:
        a token's heads next to each other in memory, the layout SDPA's kernels read without a copy.
        `halves`: x's features come as (evens, odds) (see `rotate_halves`)."""
        seq_len = x.shape[1]
        if seq_len > self.max_seq_len:
            raise ValueError(f"positions up to {seq_len - 1} exceed max_seq_len={self.max_seq_len}")
        broadcast = (seq_len, *(1,) * (x.dim() - 3), -1)
        if halves:
            return self.rotate_halves(x, self.cos[:seq_len].view(broadcast), self.sin[:seq_len].view(broadcast))
        return self._rotate(x, self.cos_pairs[:seq_len].view(broadcast), self.signed_sin[:seq_len].view(broadcast))

    @staticmethod
    def rotate_halves(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """RoPE on features stored as (x0, x2, x4, ..., x1, x3, x5, ...): pair i is (x[i], x[i + d/2]). The
        same products and sums as `_rotate` on the interleaved order (bit for bit, permuted), but every load
        and store is of contiguous halves, so a compiled kernel vectorises where the pair swap cannot."""
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        even, odd = x.chunk(2, dim=-1)
        return torch.cat((even * cos + odd * -sin, odd * cos + even * sin), dim=-1)

    @staticmethod
    def _rotate(x: Tensor, cos_pairs: Tensor, signed_sin: Tensor) -> Tensor:
        """(even, odd) ↦ (even·cos − odd·sin, odd·cos + even·sin), written as x·cos + swap(x)·(−sin, sin) with
        swap exchanging each pair's members: the same products and sums (bit for bit), but one elementwise
        expression, whose compiled backward is one pass instead of an even/odd `stack` taken apart again."""
        # Float32 inputs rotate in float32; bf16 activations rotate in bf16, as in common LLaMA code.
        swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
        return x * cos_pairs.to(x.dtype) + swapped * signed_sin.to(x.dtype)
