"""Scaled dot-product attention and causal multi-head self-attention (with an optional KV cache), with the
Llama/Mistral family's options: grouped-query (or multi-query) attention, ALiBi and sliding windows."""

import math

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from cs336_basics.alibi import alibi_bias, alibi_slopes
from cs336_basics.attention_backends import get_attention_backend
from cs336_basics.kv_cache import ExternalKVCache
from cs336_basics.layers import Linear, RotaryPositionalEmbedding
from cs336_basics.nn_utils import softmax
from cs336_basics.sliding_window import SlidingWindowCache, window_mask


def scaled_dot_product_attention(
    q: Float[Tensor, "... queries d_k"],
    k: Float[Tensor, "... keys d_k"],
    v: Float[Tensor, "... keys d_v"],
    mask: Bool[Tensor, "... queries keys"] | None = None,
    bias: Float[Tensor, "... queries keys"] | None = None,
) -> Float[Tensor, "... queries d_v"]:
    """softmax(q kᵀ / √d_k + bias) v, where mask[i, j] = True lets query i attend to key j."""
    scores = einsum(q, k, "... q d, ... k d -> ... q k") / math.sqrt(q.shape[-1])
    if bias is not None:
        scores = scores + bias.to(scores.dtype)
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

    `num_kv_heads` < `num_heads` shares each key/value head among num_heads / num_kv_heads consecutive
    query heads (grouped-query attention; 1 = multi-query), as Llama does: query head h reads KV head
    h // group, and the cache holds only the KV heads. `alibi` adds the ALiBi distance penalty to the scores
    (use it without `rope`); `sliding_window` W lets each query see only its W most recent tokens, and the
    decoding cache becomes a ring of W slots.

    `use_torch_sdpa` swaps our attention for `F.scaled_dot_product_attention` (FlashAttention on GPUs);
    both compute the same function (tested). `attention_backend` names a kernel of the registry in
    `cs336_basics.attention_backends` (e.g. our Triton FlashAttention-2, "cs336-fa2") for plain causal
    attention over a whole sequence, i.e. training and prefill; it needs no sliding window and no ALiBi, and
    cached decoding steps and left-padded batches keep the path above, so it only chooses how training runs.
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
        attention_backend: str | None = None,
    ):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model={d_model} is not divisible by num_heads={num_heads}")
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_kv_heads <= 0 or num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads={num_kv_heads} must be positive and divide num_heads={num_heads}")
        if alibi and rope is not None:
            raise ValueError("ALiBi replaces rotary embeddings; pass rope=None with alibi=True")
        if sliding_window is not None and sliding_window <= 0:
            raise ValueError(f"sliding_window must be positive (or None), got {sliding_window}")
        if attention_backend is not None:
            if alibi or sliding_window is not None:
                raise ValueError(f"attention_backend={attention_backend!r} computes plain causal attention; "
                                 "it takes no ALiBi bias and no sliding window")
            get_attention_backend(attention_backend)  # an unknown name fails here, listing the known ones
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.d_head = d_model // num_heads
        self.rope = rope
        self.use_torch_sdpa = use_torch_sdpa
        self.attention_backend = attention_backend  # a name, not a module: the state dict is unchanged
        # set by training's --attention-layout bshd (the weights are the same, so not part of the config)
        self.sequence_major = False
        # set by --rope-layout halves (with sequence_major): q/k features of each head reordered (evens, odds)
        self.rope_halves = False
        # set by --value-proj separate (with sequence_major): v from its own GEMM rather than a slice of q/k/v's
        self.separate_value_proj = False
        self.sliding_window = sliding_window
        # Derived from num_heads alone, so a non-persistent buffer: the state dict keeps the course's keys.
        self.register_buffer("alibi_slopes", alibi_slopes(num_heads, device) if alibi else None, persistent=False)
        kv_dim = num_kv_heads * self.d_head
        self.q_proj = Linear(d_model, d_model, device=device, dtype=dtype)
        self.k_proj = Linear(d_model, kv_dim, device=device, dtype=dtype)
        self.v_proj = Linear(d_model, kv_dim, device=device, dtype=dtype)
        self.output_proj = Linear(d_model, d_model, device=device, dtype=dtype)

    @property
    def grouped(self) -> bool:
        return self.num_kv_heads != self.num_heads

    def forward(
        self,
        x: Float[Tensor, "... seq d_model"],
        token_positions: Int[Tensor, "... seq"] | None = None,
        kv_cache: KVCache | SlidingWindowCache | ExternalKVCache | None = None,
        key_mask: Bool[Tensor, "batch keys"] | None = None,
    ) -> Float[Tensor, "... seq d_model"]:
        """`key_mask` (True = real token) hides left-padding from batched decoding. An `ExternalKVCache` (a
        server's paged pool) takes the new keys/values and, when decoding, computes the attention itself."""
        seq_len = x.shape[-2]
        plain_causal = self.sliding_window is None and self.alibi_slopes is None
        if (self.sequence_major and self.use_torch_sdpa and self.attention_backend is None and plain_causal
                and kv_cache is None and key_mask is None and token_positions is None and x.dim() == 3):
            return self.output_proj(self._sdpa_sequence_major(x))
        offset = kv_cache.length if kv_cache is not None else 0
        q, k, v = self._project(x, token_positions, offset)
        if isinstance(kv_cache, ExternalKVCache):
            kv_cache.store(k, v)
            if kv_cache.decoding:
                out = kv_cache.attend(q, scale=1 / math.sqrt(self.d_head), sliding_window=self.sliding_window,
                                      alibi_slopes=self.alibi_slopes)
                return self.output_proj(rearrange(out, "... heads seq d -> ... seq (heads d)"))
            kv_cache, key_mask = None, None  # a fresh prompt: ordinary causal attention over its own tokens
        key_index = None  # None: the keys are tokens 0, 1, ..., in order
        if isinstance(kv_cache, SlidingWindowCache):
            k, v, key_index = kv_cache.append(k, v)
        elif kv_cache is not None:
            k, v = kv_cache.append(k, v)
        if self.attention_backend is not None and plain_causal and offset == 0 and key_mask is None:
            out = get_attention_backend(self.attention_backend)(q, k, v, causal=True)
        elif self.use_torch_sdpa and plain_causal and offset == 0 and key_mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, **self._gqa)  # no mask tensor: flash kernels
        else:
            # Query i sits at absolute index offset + i and sees every key at or before it.
            query_index = torch.arange(offset, offset + seq_len, device=x.device)
            if key_index is None:
                key_index = torch.arange(k.shape[-2], device=x.device)
            else:
                key_mask = None if key_mask is None else key_mask[:, key_index]  # ring order
            mask = self._mask(query_index, key_index, key_mask)
            bias = None if self.alibi_slopes is None else alibi_bias(self.alibi_slopes, query_index, key_index)
            if self.use_torch_sdpa:
                if bias is not None:  # a float mask: the ALiBi penalty, −inf where masked
                    mask = bias.to(q.dtype).masked_fill(~mask, float("-inf"))
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **self._gqa)
            else:
                out = self._attend(q, k, v, mask, bias)
        return self.output_proj(rearrange(out, "... heads seq d -> ... seq (heads d)"))

    def _fused_qkv(self, x: Float[Tensor, "... seq d_model"], evens_then_odds: bool = False,
                   with_value: bool = True) -> Float[Tensor, "... seq qkv"]:
        """One GEMM for the projections (q, k and, `with_value`, v; weights concatenated on the fly, keys stay
        q/k/v_proj). `evens_then_odds` reorders each q/k head's output features as (0, 2, 4, ..., 1, 3, 5, ...):
        q·k is a sum over features, so the attention is unchanged as long as q and k share the order."""
        w_q, w_k = self.q_proj.weight, self.k_proj.weight
        if evens_then_odds:
            w_q, w_k = (w.unflatten(0, (-1, self.d_head // 2, 2)).transpose(1, 2).flatten(0, 2) for w in (w_q, w_k))
        return x @ torch.cat((w_q, w_k, self.v_proj.weight) if with_value else (w_q, w_k)).mT

    @property
    def _gqa(self) -> dict:
        """SDPA's keyword for fewer key/value heads than query heads."""
        return {"enable_gqa": True} if self.grouped else {}

    def _sdpa_sequence_major(self, x: Float[Tensor, "batch seq d_model"]) -> Float[Tensor, "batch seq d_model"]:
        """Causal SDPA with q, k, v and the output kept (batch, seq, heads, d) in memory and handed over as
        transposed views: no layout copy on either side of the kernel, and RoPE a contiguous elementwise pass
        (--attention-layout bshd; same arithmetic as the heads-major path). With `rope_halves` each q/k head
        comes out of the projection as (even features, odd features), so RoPE's pairs are (i, i + d/2) and
        the rotation reads two contiguous halves instead of swapping neighbours (--rope-layout halves). With
        `separate_value_proj` v comes from its own GEMM: a dense tensor, whose gradient SDPA allocates with v's
        strides, so the projection's backward reads it as it is instead of copying it out of the heads-major
        layout a slice of the fused q/k/v output gets (--value-proj separate)."""
        halves = self.rope_halves and self.rope is not None
        if self.separate_value_proj:  # v dense, so SDPA's value gradient (allocated like v) needs no copy
            qk = self._fused_qkv(x, evens_then_odds=halves, with_value=False).unflatten(-1, (-1, self.d_head))
            v = (x @ self.v_proj.weight.mT).unflatten(-1, (-1, self.d_head))
        else:
            heads = self._fused_qkv(x, evens_then_odds=halves).unflatten(-1, (-1, self.d_head))  # (b, s, h + 2kv, d)
            qk, v = heads.split((self.num_heads + self.num_kv_heads, self.num_kv_heads), dim=-2)
        if self.rope is not None:
            qk = self.rope.rotate_sequence_major(qk, halves=halves)  # q and k rotated in one pass
        q, k = qk.split((self.num_heads, self.num_kv_heads), dim=-2)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=True, **self._gqa)
        return out.transpose(1, 2).flatten(-2)  # a view when the kernel kept its input's layout

    def _project(self, x: Tensor, token_positions: Tensor | None, offset: int) -> tuple[Tensor, Tensor, Tensor]:
        """q (..., heads, seq, d) and k, v (..., kv_heads, seq, d), rotated if RoPE is on."""
        qkv = self._fused_qkv(x)
        if self.rope is not None and token_positions is not None:
            token_positions = token_positions.unsqueeze(-2)  # broadcast over the heads axis
        if not self.grouped:
            qkv = rearrange(qkv, "... seq (three heads d) -> three ... heads seq d", three=3, heads=self.num_heads)
            q, k, v = qkv.unbind(0)
            if self.rope is not None:
                q, k = self.rope(qkv[:2], token_positions, offset).unbind(0)  # q and k rotated in one pass
            return q, k, v
        heads = rearrange(qkv, "... seq (heads d) -> ... heads seq d", d=self.d_head)
        q, k, v = heads.split((self.num_heads, self.num_kv_heads, self.num_kv_heads), dim=-3)
        if self.rope is not None:
            q, k = self.rope(q, token_positions, offset), self.rope(k, token_positions, offset)
        return q, k, v

    def _mask(
        self, query_index: Tensor, key_index: Tensor, key_mask: Bool[Tensor, "batch keys"] | None
    ) -> Bool[Tensor, "... queries keys"]:
        if self.sliding_window is None:
            mask = key_index <= query_index[:, None]
        else:
            mask = window_mask(query_index, key_index, self.sliding_window)
        if key_mask is not None:
            # Each query keeps its own key, so padded rows never become all -inf (NaNs would then leak
            # into later layers through those rows' values).
            mask = mask & (key_mask[:, None, None, :] | (key_index == query_index[:, None]))
        return mask

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor, bias: Tensor | None) -> Tensor:
        """Our attention; grouped heads are folded into a (kv_heads, group) axis pair, so each KV head is
        broadcast over its query heads instead of copied."""
        if not self.grouped:
            return scaled_dot_product_attention(q, k, v, mask, bias)
        group = self.num_heads // self.num_kv_heads
        q = rearrange(q, "... (kv group) seq d -> ... kv group seq d", group=group)
        k, v = k.unsqueeze(-3), v.unsqueeze(-3)
        if mask.dim() == 4:  # (batch, 1, queries, keys): give it the group axis too
            mask = mask.unsqueeze(-3)
        if bias is not None:
            bias = rearrange(bias, "(kv group) q k -> kv group q k", group=group)
        out = scaled_dot_product_attention(q, k, v, mask, bias)
        return rearrange(out, "... kv group seq d -> ... (kv group) seq d")

    def new_cache(self, batch: int, max_len: int, device=None, dtype=None) -> KVCache | SlidingWindowCache:
        """Full keys/values of the KV heads, or a ring of W slots with a sliding window."""
        if self.sliding_window is not None:
            return SlidingWindowCache(batch, self.num_kv_heads, self.sliding_window, max_len, self.d_head,
                                      device=device, dtype=dtype)
        return KVCache(batch, self.num_kv_heads, max_len, self.d_head, device=device, dtype=dtype)
