"""A decoder-only Transformer language model (pre-norm, RoPE, SwiGLU) plus the handout's ablations."""

from dataclasses import asdict, dataclass
from typing import Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from cs336_basics.attention import KVCache, MultiHeadSelfAttention
from cs336_basics.layers import Embedding, Linear, RMSNorm, RotaryPositionalEmbedding, SiLUFeedForward, SwiGLU

# The layers are re-exported here because the course's assignment-2 harness imports them from this module.
__all__ = ["Embedding", "Linear", "RMSNorm", "TransformerBlock", "TransformerConfig", "TransformerLM"]


@dataclass(frozen=True)
class TransformerConfig:
    vocab_size: int
    context_length: int
    d_model: int
    num_layers: int
    num_heads: int
    d_ff: int
    rope_theta: float = 10_000.0
    norm: Literal["pre", "post", "none"] = "pre"
    position: Literal["rope", "none"] = "rope"
    ffn: Literal["swiglu", "silu"] = "swiglu"
    use_torch_sdpa: bool = False
    rmsnorm_eps: float = 1e-5

    def __post_init__(self):
        for name in ("vocab_size", "context_length", "d_model", "num_layers", "num_heads", "d_ff"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}")
        for name, allowed in (("norm", ("pre", "post", "none")), ("position", ("rope", "none")),
                              ("ffn", ("swiglu", "silu"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")

    @property
    def d_head(self) -> int:
        return self.d_model // self.num_heads

    def to_dict(self) -> dict:
        return asdict(self)


class TransformerBlock(nn.Module):
    """Pre-norm: x + Attn(LN(x)), then x + FFN(LN(x)). Post-norm and norm-free variants for ablations."""

    def __init__(self, config: TransformerConfig, rope: RotaryPositionalEmbedding | None, device=None, dtype=None):
        super().__init__()
        self.norm = config.norm
        self.attn = MultiHeadSelfAttention(
            config.d_model, config.num_heads, rope, config.use_torch_sdpa, device=device, dtype=dtype
        )
        ffn_cls = SwiGLU if config.ffn == "swiglu" else SiLUFeedForward
        self.ffn = ffn_cls(config.d_model, config.d_ff, device=device, dtype=dtype)
        if config.norm != "none":
            self.ln1 = RMSNorm(config.d_model, config.rmsnorm_eps, device=device, dtype=dtype)
            self.ln2 = RMSNorm(config.d_model, config.rmsnorm_eps, device=device, dtype=dtype)

    def forward(
        self,
        x: Float[Tensor, "batch seq d_model"],
        token_positions: Int[Tensor, "batch seq"] | None = None,
        kv_cache: KVCache | None = None,
        key_mask: Tensor | None = None,
    ) -> Float[Tensor, "batch seq d_model"]:
        if self.norm == "pre":
            x = x + self.attn(self.ln1(x), token_positions, kv_cache, key_mask)
            return x + self.ffn(self.ln2(x))
        if self.norm == "post":
            x = self.ln1(x + self.attn(x, token_positions, kv_cache, key_mask))
            return self.ln2(x + self.ffn(x))
        x = x + self.attn(x, token_positions, kv_cache, key_mask)
        return x + self.ffn(x)


class TransformerLM(nn.Module):
    def __init__(self, config: TransformerConfig, device=None, dtype=None):
        super().__init__()
        self.config = config
        rope = None
        if config.position == "rope":
            # One table shared by every layer; it is a non-persistent buffer, so it is not in the state dict.
            rope = RotaryPositionalEmbedding(config.rope_theta, config.d_head, config.context_length, device)
        self.token_embeddings = Embedding(config.vocab_size, config.d_model, device=device, dtype=dtype)
        self.layers = nn.ModuleList(
            TransformerBlock(config, rope, device=device, dtype=dtype) for _ in range(config.num_layers)
        )
        self.ln_final = (
            RMSNorm(config.d_model, config.rmsnorm_eps, device=device, dtype=dtype)
            if config.norm != "none"
            else nn.Identity()
        )
        self.lm_head = Linear(config.d_model, config.vocab_size, device=device, dtype=dtype)

    def forward(
        self,
        in_indices: Int[Tensor, "batch seq"],
        token_positions: Int[Tensor, "batch seq"] | None = None,
        kv_caches: list[KVCache] | None = None,
        key_mask: Tensor | None = None,
    ) -> Float[Tensor, "batch seq vocab"]:
        """Unnormalised next-token logits for every position.

        `kv_caches` (from `new_kv_caches`) make decoding incremental; `key_mask` (batch, cached + new keys,
        True = real token) hides left-padding when prompts of different lengths share a batch.
        """
        past = kv_caches[0].length if kv_caches else 0
        if past + in_indices.shape[-1] > self.config.context_length:
            raise ValueError(
                f"sequence of {past + in_indices.shape[-1]} tokens exceeds context_length="
                f"{self.config.context_length}"
            )
        x = self.token_embeddings(in_indices)
        for i, layer in enumerate(self.layers):
            x = layer(x, token_positions, kv_caches[i] if kv_caches else None, key_mask)
        return self.lm_head(self.ln_final(x))

    def new_kv_caches(self, batch_size: int, max_len: int | None = None) -> list[KVCache]:
        """Empty per-layer caches for incremental decoding on the model's device and dtype."""
        weight = self.lm_head.weight
        max_len = max_len or self.config.context_length
        return [
            KVCache(batch_size, self.config.num_heads, max_len, self.config.d_head,
                    device=weight.device, dtype=weight.dtype)
            for _ in self.layers
        ]

    def num_parameters(self, include_embeddings: bool = True) -> int:
        total = sum(p.numel() for p in self.parameters())
        if not include_embeddings:
            total -= self.token_embeddings.weight.numel() + self.lm_head.weight.numel()
        return total

    @torch.no_grad()
    def load_weights(self, weights: dict[str, Tensor]) -> "TransformerLM":
        """Strictly loads a state dict such as the course's reference weights."""
        self.load_state_dict(weights, strict=True)
        return self
