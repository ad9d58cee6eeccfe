"""Multi-head latent attention (DeepSeek-V2/V3) and its latent KV cache.

Keys and values come from one low-rank latent c = RMSNorm(W_DKV x) (kv_lora_rank numbers per token):
k_nope = W_UK c and v = W_UV c per head. Position enters through a separate rotary key of qk_rope_head_dim
numbers shared by all heads, paired with a rotary part of each query. Queries may be low-rank too.
"""

import math

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from cs336_basics.attention import scaled_dot_product_attention
from cs336_basics.kv_cache import ExternalKVCache
from cs336_basics.layers import Linear, RMSNorm, RotaryPositionalEmbedding

# DeepSeek's reference code and HF's DeepseekV3Attention normalise the q and kv latents with eps 1e-6 whatever
# the model's rms_norm_eps; we do the same so exported models match HF exactly.
LATENT_NORM_EPS = 1e-6


class LatentKVCache:
    """Per token only [normalised latent c | roped shared key]: kv_lora_rank + qk_rope_head_dim numbers,
    against 2·heads·head_dim for a plain KV cache. One buffer, so keys and values are slices of it."""

    def __init__(self, batch: int, max_len: int, kv_lora_rank: int, rope_dim: int, *, device=None, dtype=None):
        self.latent = torch.empty(batch, max_len, kv_lora_rank + rope_dim, device=device, dtype=dtype)
        self.kv_lora_rank = kv_lora_rank
        self.length = 0

    @property
    def bytes_per_token(self) -> int:
        return self.latent.shape[-1] * self.latent.element_size()

    def append(self, c: Tensor, k_rope: Tensor) -> Float[Tensor, "batch keys latent_plus_rope"]:
        new_length = self.length + c.shape[-2]
        if new_length > self.latent.shape[1]:
            raise ValueError(f"latent KV cache holds {self.latent.shape[1]} positions; {new_length} requested")
        self.latent[:, self.length : new_length, : self.kv_lora_rank] = c
        self.latent[:, self.length : new_length, self.kv_lora_rank :] = k_rope
        self.length = new_length
        return self.latent[:, :new_length]


def _attention_mask(
    num_queries: int, num_keys: int, offset: int, key_mask: Bool[Tensor, "batch keys"] | None, device
) -> Bool[Tensor, "... queries keys"]:
    """Causal in index space (query i sits at offset + i); key_mask hides left padding, but each query keeps
    its own key so a padded row never becomes all -inf (as in attention.py)."""
    query_index = torch.arange(offset, offset + num_queries, device=device)
    key_index = torch.arange(num_keys, device=device)
    mask = key_index <= query_index[:, None]
    if key_mask is not None:
        mask = mask & (key_mask[:, None, None, :] | (key_index == query_index[:, None]))
    return mask


class MultiHeadLatentAttention(nn.Module):
    """Causal MLA. Training and prefill use the expanded form: K and V are materialised per head from the
    latent and attended with (flash) SDPA, cheapest when there are as many queries as keys. Decoding against a
    cache uses the absorbed form: W_UK is folded into the query (q_nope·W_UK c = (W_UKᵀ q_nope)·c) and W_UV is
    applied after attending over the latent, so each step reads only the cached latents and never re-expands
    K/V for the whole context (the point of the small cache). Both forms compute the same function (tested).
    """

    def __init__(self, config, device=None, dtype=None):
        super().__init__()
        d, heads = config.d_model, config.num_heads
        self.num_heads = heads
        self.nope, self.rope_dim, self.v_dim = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        self.kv_lora_rank = config.kv_lora_rank
        self.use_torch_sdpa = config.use_torch_sdpa
        q_out = heads * (self.nope + self.rope_dim)
        if config.q_lora_rank == 0:
            self.q_proj = Linear(d, q_out, device=device, dtype=dtype)
        else:
            self.q_down = Linear(d, config.q_lora_rank, device=device, dtype=dtype)
            self.q_norm = RMSNorm(config.q_lora_rank, LATENT_NORM_EPS, device=device, dtype=dtype)
            self.q_up = Linear(config.q_lora_rank, q_out, device=device, dtype=dtype)
        self.kv_down = Linear(d, self.kv_lora_rank + self.rope_dim, device=device, dtype=dtype)
        self.kv_norm = RMSNorm(self.kv_lora_rank, LATENT_NORM_EPS, device=device, dtype=dtype)
        self.kv_up = Linear(self.kv_lora_rank, heads * (self.nope + self.v_dim), device=device, dtype=dtype)
        self.output_proj = Linear(heads * self.v_dim, d, device=device, dtype=dtype)
        self.rope = RotaryPositionalEmbedding(config.rope_theta, self.rope_dim, config.context_length, device)

    def queries(self, x: Float[Tensor, "batch seq d_model"]) -> Float[Tensor, "batch heads seq qk"]:
        q = self.q_proj(x) if hasattr(self, "q_proj") else self.q_up(self.q_norm(self.q_down(x)))
        return rearrange(q, "b s (h d) -> b h s d", h=self.num_heads)

    def forward(
        self,
        x: Float[Tensor, "batch seq d_model"],
        token_positions: Int[Tensor, "batch seq"] | None = None,
        kv_cache: LatentKVCache | None = None,
        key_mask: Bool[Tensor, "batch keys"] | None = None,
    ) -> Float[Tensor, "batch seq d_model"]:
        offset = kv_cache.length if kv_cache is not None else 0
        q_nope, q_rope = self.queries(x).split((self.nope, self.rope_dim), dim=-1)
        c, k_rope = self.kv_down(x).split((self.kv_lora_rank, self.rope_dim), dim=-1)
        c = self.kv_norm(c)
        head_positions = token_positions.unsqueeze(-2) if token_positions is not None else None
        q_rope = self.rope(q_rope, head_positions, offset)
        k_rope = self.rope(k_rope, token_positions, offset)
        if isinstance(kv_cache, ExternalKVCache):
            # One latent "head" per token: [c | k_rope]; values are its first kv_lora_rank numbers.
            kv_cache.store(torch.cat((c, k_rope), dim=-1).unsqueeze(1), None)
            if kv_cache.decoding:
                out = self.absorbed_external(q_nope, q_rope, kv_cache)
                return self.output_proj(rearrange(out, "b h s d -> b s (h d)"))
            kv_cache, key_mask = None, None
        if kv_cache is not None:
            cached = kv_cache.append(c, k_rope)
            if offset > 0:
                out = self.absorbed_attention(q_nope, q_rope, cached, offset, key_mask)
                return self.output_proj(rearrange(out, "b h s d -> b s (h d)"))
        out = self.expanded_attention(q_nope, q_rope, c, k_rope, key_mask)
        return self.output_proj(rearrange(out, "b h s d -> b s (h d)"))

    def expanded_attention(
        self,
        q_nope: Float[Tensor, "b h s nope"],
        q_rope: Float[Tensor, "b h s rope"],
        c: Float[Tensor, "b s latent"],
        k_rope: Float[Tensor, "b s rope"],
        key_mask: Bool[Tensor, "b s"] | None,
    ) -> Float[Tensor, "b h s v"]:
        k_nope, v = rearrange(self.kv_up(c), "b s (h d) -> b h s d", h=self.num_heads).split(
            (self.nope, self.v_dim), dim=-1
        )
        q = torch.cat((q_nope, q_rope), dim=-1)
        k = torch.cat((k_nope, k_rope.unsqueeze(1).expand(-1, self.num_heads, -1, -1)), dim=-1)
        seq_len = q.shape[-2]
        if self.use_torch_sdpa and key_mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)  # scale 1/√(nope + rope)
        mask = _attention_mask(seq_len, seq_len, 0, key_mask, q.device)
        if self.use_torch_sdpa:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return scaled_dot_product_attention(q, k, v, mask)

    def absorbed_attention(
        self,
        q_nope: Float[Tensor, "b h s nope"],
        q_rope: Float[Tensor, "b h s rope"],
        cached: Float[Tensor, "b t latent_plus_rope"],
        offset: int,
        key_mask: Bool[Tensor, "b t"] | None,
    ) -> Float[Tensor, "b h s v"]:
        w_uk, w_uv = rearrange(self.kv_up.weight, "(h d) r -> h d r", h=self.num_heads).split(
            (self.nope, self.v_dim), dim=1
        )
        q_latent = einsum(q_nope, w_uk, "b h s n, h n r -> b h s r")
        # One dot product over [latent | rope key], scaled as the expanded form: 1/√(nope + rope).
        q = torch.cat((q_latent, q_rope), dim=-1)
        scores = einsum(q, cached, "b h s c, b t c -> b h s t") / math.sqrt(self.nope + self.rope_dim)
        mask = _attention_mask(q.shape[-2], cached.shape[1], offset, key_mask, q.device)
        scores = scores.masked_fill(~mask, float("-inf"))
        probs = scores.softmax(dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(q.dtype)
        out_latent = einsum(probs, cached[..., : self.kv_lora_rank], "b h s t, b t r -> b h s r")
        return einsum(out_latent, w_uv, "b h s r, h v r -> b h s v")

    def absorbed_external(
        self, q_nope: Float[Tensor, "b h 1 nope"], q_rope: Float[Tensor, "b h 1 rope"], kv_cache: ExternalKVCache
    ) -> Float[Tensor, "b h 1 v"]:
        """The absorbed form over an external (paged) latent cache: multi-query attention with one latent head."""
        w_uk, w_uv = rearrange(self.kv_up.weight, "(h d) r -> h d r", h=self.num_heads).split(
            (self.nope, self.v_dim), dim=1
        )
        q = torch.cat((einsum(q_nope, w_uk, "b h s n, h n r -> b h s r"), q_rope), dim=-1)
        out_latent = kv_cache.attend(q, scale=1 / math.sqrt(self.nope + self.rope_dim), value_dim=self.kv_lora_rank)
        return einsum(out_latent, w_uv, "b h s r, h v r -> b h s v")

    def new_cache(self, batch: int, max_len: int, device=None, dtype=None) -> LatentKVCache:
        return LatentKVCache(batch, max_len, self.kv_lora_rank, self.rope_dim, device=device, dtype=dtype)
