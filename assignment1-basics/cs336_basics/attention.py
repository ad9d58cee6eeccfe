"""Scaled dot-product attention and causal multi-head self-attention (with an optional KV cache)."""

import math

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from cs336_basics.layers import Linear, RotaryPositionalEmbedding
from cs336_basics.nn_utils import softmax


def scaled_dot_product_attention(
    q: Float[Tensor, "... queries d_k"],
    k: Float[Tensor, "... keys d_k"],
    v: Float[Tensor, "... keys d_v"],
    mask: Bool[Tensor, "... queries keys"] | None = None,
) -> Float[Tensor, "... queries d_v"]:
    """softmax(q kᵀ / √d_k) v, where mask[i, j] = True lets query i attend to key j."""
    scores = einsum(q, k, "... q d, ... k d -> ... q k") / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return einsum(softmax(scores, dim=-1), v, "... q k, ... k d -> ... q d")


class KVCache:
    """Pre-allocated keys and values of one layer, so each decoded token costs O(context), not a copy."""

    def __init__(self, batch: int, num_heads: int, max_len: int, d_head: int, *, device=None, dtype=None):
        shape = (batch, num_heads, max_len, d_head)
        self.keys = torch.empty(shape, device=device, dtype=dtype)
        self.values = torch.empty(shape, device=device, dtype=dtype)
        self.length = 0

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.keys.shape[1] * self.keys.shape[3] * self.keys.element_size()

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        new_length = self.length + k.shape[-2]
        if new_length > self.keys.shape[-2]:
            raise ValueError(f"KV cache holds {self.keys.shape[-2]} positions; {new_length} requested")
        self.keys[..., self.length : new_length, :] = k
        self.values[..., self.length : new_length, :] = v
        self.length = new_length
        return self.keys[..., :new_length, :], self.values[..., :new_length, :]


class MultiHeadSelfAttention(nn.Module):
    """Causal multi-head self-attention; heads are contiguous row blocks of the q/k/v projections.

    `use_torch_sdpa` swaps our attention for `F.scaled_dot_product_attention` (FlashAttention on GPUs);
    both compute the same function (tested).
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        rope: RotaryPositionalEmbedding | None = None,
        use_torch_sdpa: bool = False,
        device=None,
        dtype=None,
        num_kv_heads: int | None = None,
        alibi: bool = False,
        sliding_window: int | None = None,
    ):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model={d_model} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.d_head = d_model // num_heads
        self.rope = rope
        self.use_torch_sdpa = use_torch_sdpa
        self.q_proj = Linear(d_model, d_model, device=device, dtype=dtype)
        self.k_proj = Linear(d_model, d_model, device=device, dtype=dtype)
        self.v_proj = Linear(d_model, d_model, device=device, dtype=dtype)
        self.output_proj = Linear(d_model, d_model, device=device, dtype=dtype)

    def forward(
        self,
        x: Float[Tensor, "... seq d_model"],
        token_positions: Int[Tensor, "... seq"] | None = None,
        kv_cache: KVCache | None = None,
        key_mask: Bool[Tensor, "batch keys"] | None = None,
    ) -> Float[Tensor, "... seq d_model"]:
        """`key_mask` (True = real token) hides left-padding from batched decoding."""
        seq_len = x.shape[-2]
        offset = kv_cache.length if kv_cache is not None else 0
        # One GEMM for the three projections (weights concatenated on the fly; keys stay q/k/v_proj).
        qkv_weight = torch.cat((self.q_proj.weight, self.k_proj.weight, self.v_proj.weight))
        qkv = rearrange(
            x @ qkv_weight.mT, "... seq (three heads d) -> three ... heads seq d", three=3, heads=self.num_heads
        )
        q, k, v = qkv.unbind(0)
        if self.rope is not None:
            if token_positions is not None:
                token_positions = token_positions.unsqueeze(-2)  # broadcast over the heads axis
            q, k = self.rope(qkv[:2], token_positions, offset).unbind(0)  # q and k rotated in one pass
        if kv_cache is not None:
            k, v = kv_cache.append(k, v)
        if self.use_torch_sdpa and offset == 0 and key_mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # no mask tensor: flash kernels
        else:
            # Query i sits at absolute index offset + i and sees every key at or before it.
            query_index = torch.arange(offset, offset + seq_len, device=x.device)
            key_index = torch.arange(k.shape[-2], device=x.device)
            mask = key_index <= query_index[:, None]
            if key_mask is not None:
                # Each query keeps its own key, so padded rows never become all -inf (NaNs would then leak
                # into later layers through those rows' values).
                mask = mask & (key_mask[:, None, None, :] | (key_index == query_index[:, None]))
            if self.use_torch_sdpa:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            else:
                out = scaled_dot_product_attention(q, k, v, mask)
        return self.output_proj(rearrange(out, "... heads seq d -> ... seq (heads d)"))

    def new_cache(self, batch: int, max_len: int, device=None, dtype=None) -> KVCache:
        return KVCache(batch, self.num_heads, max_len, self.d_head, device=device, dtype=dtype)
