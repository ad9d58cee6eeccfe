"""A decoder-only Transformer language model (pre-norm, RoPE, SwiGLU), the handout's ablations, and the
architecture family of the lectures: GQA/MQA, multi-head latent attention, linear attention, ALiBi, sliding
windows and DeepSeek-style mixture-of-experts feed-forward layers.

The default configuration is exactly the course's model: same modules, same state-dict keys.
"""

from dataclasses import asdict, dataclass, fields, replace
from typing import Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from cs336_basics.attention import MultiHeadSelfAttention
from cs336_basics.kv_cache import LayerCache, ModelCaches
from cs336_basics.layers import Embedding, Linear, RMSNorm, RotaryPositionalEmbedding, SiLUFeedForward, SwiGLU

# The layers are re-exported here because the course's assignment-2 harness imports them from this module.
__all__ = ["Embedding", "Linear", "RMSNorm", "TransformerBlock", "TransformerConfig", "TransformerLM"]

CHOICES = {
    "norm": ("pre", "post", "none"),
    "position": ("rope", "none", "alibi"),
    "ffn": ("swiglu", "silu", "moe"),
    "attention": ("mha", "mla", "linear"),
    "moe_router": ("softmax", "sigmoid"),
}


class ConfigError(ValueError):
    """A configuration that cannot describe a model; the message names the offending field."""


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
    position: Literal["rope", "none", "alibi"] = "rope"
    ffn: Literal["swiglu", "silu", "moe"] = "swiglu"
    use_torch_sdpa: bool = False
    rmsnorm_eps: float = 1e-5
    # attention family: grouped-query (num_kv_heads < num_heads; 1 = multi-query), latent, linear
    attention: Literal["mha", "mla", "linear"] = "mha"
    num_kv_heads: int | None = None  # None: one KV head per query head (plain multi-head attention)
    sliding_window: int | None = None  # each query sees this many most recent keys, itself included
    # multi-head latent attention (DeepSeek-V2/V3)
    kv_lora_rank: int = 64
    q_lora_rank: int = 0  # 0: queries projected directly from the residual stream
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    # causal linear attention
    linear_chunk_size: int = 64
    # mixture of experts (DeepSeek-V3 style: routed + shared experts, bias-balanced top-k routing)
    num_experts: int = 8
    moe_top_k: int = 2
    num_shared_experts: int = 1
    moe_d_ff: int = 256
    moe_router: Literal["softmax", "sigmoid"] = "sigmoid"
    moe_norm_topk: bool = True  # renormalise the chosen experts' weights to sum to one
    moe_routed_scale: float = 1.0  # DeepSeek's routed_scaling_factor
    moe_dense_layers: int = 0  # the first k layers keep a dense SwiGLU of width d_ff (first_k_dense_replace)
    # which kernel runs plain causal attention (cs336_basics.attention_backends; None: use_torch_sdpa decides).
    # A choice of how, not what: checkpoints record None (see `portable`), so a run trained with a CUDA-only
    # kernel loads anywhere and resumes under any backend.
    attention_backend: str | None = None

    def __post_init__(self):
        for name in ("vocab_size", "context_length", "d_model", "num_layers", "num_heads", "d_ff"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.d_model % self.num_heads:
            raise ConfigError(f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}")
        kv_heads = self.kv_heads
        if kv_heads <= 0 or self.num_heads % kv_heads:
            raise ConfigError(f"num_kv_heads={self.num_kv_heads} must be positive and divide "
                              f"num_heads={self.num_heads}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ConfigError(f"sliding_window must be positive (or None for full causal attention), "
                              f"got {self.sliding_window}")
        if self.attention != "mha":
            if self.num_kv_heads not in (None, self.num_heads):
                raise ConfigError(f"num_kv_heads applies to attention='mha' only, not {self.attention!r}")
            if self.sliding_window is not None:
                raise ConfigError(f"sliding_window applies to attention='mha' only, not {self.attention!r}")
        if self.attention_backend is not None:
            self._check_attention_backend()
        if self.position == "rope" and self.attention == "mha" and self.d_head % 2:
            raise ConfigError(f"rotary embeddings need an even head size; d_model/num_heads is {self.d_head}")
        if self.attention == "mla":
            for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
                if getattr(self, name) <= 0:
                    raise ConfigError(f"{name} must be positive for attention='mla', got {getattr(self, name)}")
            if self.q_lora_rank < 0:
                raise ConfigError(f"q_lora_rank must be >= 0 (0: no query compression), got {self.q_lora_rank}")
            if self.qk_rope_head_dim % 2:
                raise ConfigError(f"qk_rope_head_dim must be even for rotary embeddings, got {self.qk_rope_head_dim}")
            if self.position != "rope":
                raise ConfigError(f"attention='mla' carries position in its decoupled rope key; "
                                  f"position must be 'rope', got {self.position!r}")
        if self.attention == "linear":
            if self.position != "none":
                raise ConfigError(f"attention='linear' takes position='none', got {self.position!r}")
            if self.linear_chunk_size <= 0:
                raise ConfigError(f"linear_chunk_size must be positive, got {self.linear_chunk_size}")
        if self.ffn == "moe":
            for name in ("num_experts", "moe_top_k", "moe_d_ff"):
                if getattr(self, name) <= 0:
                    raise ConfigError(f"{name} must be positive for ffn='moe', got {getattr(self, name)}")
            if self.moe_top_k > self.num_experts:
                raise ConfigError(f"moe_top_k={self.moe_top_k} exceeds num_experts={self.num_experts}")
            if self.num_shared_experts < 0:
                raise ConfigError(f"num_shared_experts must be >= 0, got {self.num_shared_experts}")
            if not 0 <= self.moe_dense_layers <= self.num_layers:
                raise ConfigError(f"moe_dense_layers must lie in [0, num_layers={self.num_layers}], "
                                  f"got {self.moe_dense_layers}")
            if self.moe_routed_scale <= 0:
                raise ConfigError(f"moe_routed_scale must be positive, got {self.moe_routed_scale}")

    @property
    def d_head(self) -> int:
        return self.d_model // self.num_heads

    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    def is_moe_layer(self, layer_index: int) -> bool:
        return self.ffn == "moe" and layer_index >= self.moe_dense_layers

    def _check_attention_backend(self) -> None:
        from cs336_basics.attention_backends import UnknownAttentionBackend, check_attention_backend

        if self.attention != "mha" or self.sliding_window is not None or self.position == "alibi":
            raise ConfigError(f"attention_backend={self.attention_backend!r} runs plain causal MHA/GQA only: it "
                              f"needs attention='mha', no sliding_window and a position other than 'alibi'")
        try:
            check_attention_backend(self.attention_backend)
        except UnknownAttentionBackend as e:
            raise ConfigError(str(e)) from e

    def to_dict(self) -> dict:
        return asdict(self)

    def portable(self) -> "TransformerConfig":
        """The same model with the default attention kernel: what checkpoints record and resumes compare."""
        return replace(self, attention_backend=None)

    @classmethod
    def from_dict(cls, saved: dict) -> "TransformerConfig":
        """Configs saved before a field existed get its default (which is the model they were trained as)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(saved) - known)
        if unknown:
            raise ConfigError(f"unknown model config fields {unknown} (saved by a newer cs336_basics?)")
        return cls(**saved)


def build_attention(config: TransformerConfig, rope: RotaryPositionalEmbedding | None, device=None, dtype=None):
    if config.attention == "mla":
        from cs336_basics.mla import MultiHeadLatentAttention

        return MultiHeadLatentAttention(config, device=device, dtype=dtype)
    if config.attention == "linear":
        from cs336_basics.linear_attention import CausalLinearAttention

        return CausalLinearAttention(config.d_model, config.num_heads, config.linear_chunk_size,
                                     device=device, dtype=dtype)
    return MultiHeadSelfAttention(
        config.d_model, config.num_heads, rope, config.use_torch_sdpa, device=device, dtype=dtype,
        num_kv_heads=config.kv_heads, alibi=config.position == "alibi", sliding_window=config.sliding_window,
        attention_backend=config.attention_backend,
    )


def build_ffn(config: TransformerConfig, layer_index: int, device=None, dtype=None) -> nn.Module:
    if config.is_moe_layer(layer_index):
        from cs336_basics.moe import MoEFeedForward

        return MoEFeedForward(config, device=device, dtype=dtype)
    ffn_cls = SiLUFeedForward if config.ffn == "silu" else SwiGLU
    return ffn_cls(config.d_model, config.d_ff, device=device, dtype=dtype)


class TransformerBlock(nn.Module):
    """Pre-norm: x + Attn(LN(x)), then x + FFN(LN(x)). Post-norm and norm-free variants for ablations."""

    def __init__(
        self,
        config: TransformerConfig,
        rope: RotaryPositionalEmbedding | None,
        device=None,
        dtype=None,
        layer_index: int = 0,
    ):
        super().__init__()
        self.norm = config.norm
        self.attn = build_attention(config, rope, device=device, dtype=dtype)
        self.ffn = build_ffn(config, layer_index, device=device, dtype=dtype)
        if config.norm != "none":
            self.ln1 = RMSNorm(config.d_model, config.rmsnorm_eps, device=device, dtype=dtype)
            self.ln2 = RMSNorm(config.d_model, config.rmsnorm_eps, device=device, dtype=dtype)

    def forward(
        self,
        x: Float[Tensor, "batch seq d_model"],
        token_positions: Int[Tensor, "batch seq"] | None = None,
        kv_cache: LayerCache | None = None,
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
        if config.position == "rope" and config.attention == "mha":
            # One table shared by every layer; it is a non-persistent buffer, so it is not in the state dict.
            rope = RotaryPositionalEmbedding(config.rope_theta, config.d_head, config.context_length, device)
        self.token_embeddings = Embedding(config.vocab_size, config.d_model, device=device, dtype=dtype)
        self.layers = nn.ModuleList(
            TransformerBlock(config, rope, device=device, dtype=dtype, layer_index=i)
            for i in range(config.num_layers)
        )
        self.ln_final = (
            RMSNorm(config.d_model, config.rmsnorm_eps, device=device, dtype=dtype)
            if config.norm != "none"
            else nn.Identity()
        )
        self.lm_head = Linear(config.d_model, config.vocab_size, device=device, dtype=dtype)
        # None: the residual stream has the embedding's dtype (fp32 master weights: fp32, even under autocast);
        # set by training's --residual-dtype bf16, not part of the config (the weights are the same)
        self.residual_dtype: torch.dtype | None = None

    def forward(
        self,
        in_indices: Int[Tensor, "batch seq"],
        token_positions: Int[Tensor, "batch seq"] | None = None,
        kv_caches: list[LayerCache] | None = None,
        key_mask: Tensor | None = None,
        return_hidden: bool = False,
    ) -> Float[Tensor, "batch seq vocab"]:
        """Unnormalised next-token logits for every position.

        `kv_caches` (from `new_kv_caches`) make decoding incremental; `key_mask` (batch, cached + new keys,
        True = real token) hides left-padding when prompts of different lengths share a batch.
        `return_hidden`: the final normalised hidden states (batch, seq, d_model) instead of the logits, for a
        loss that applies `lm_head` itself chunk by chunk (`cs336_basics.chunked_ce`).
        """
        past = kv_caches[0].length if kv_caches else 0
        if past + in_indices.shape[-1] > self.config.context_length:
            raise ValueError(
                f"sequence of {past + in_indices.shape[-1]} tokens exceeds context_length="
                f"{self.config.context_length}"
            )
        x = self.token_embeddings(in_indices)
        if self.residual_dtype is not None:
            x = x.to(self.residual_dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, token_positions, kv_caches[i] if kv_caches else None, key_mask)
        hidden = self.ln_final(x)
        return hidden if return_hidden else self.lm_head(hidden)

    def new_kv_caches(self, batch_size: int, max_len: int | None = None) -> ModelCaches:
        """Empty per-layer caches for incremental decoding on the model's device and dtype.

        Each attention variant brings its own cache (full K/V, grouped K/V, a ring buffer for sliding
        windows, MLA's latent, linear attention's recurrent state); `.bytes_per_token` says what it costs.
        """
        weight = self.lm_head.weight
        max_len = max_len or self.config.context_length
        return ModelCaches(
            layer.attn.new_cache(batch_size, max_len, device=weight.device, dtype=weight.dtype)
            for layer in self.layers
        )

    def moe_layers(self) -> list[nn.Module]:
        return [layer.ffn for layer in self.layers if hasattr(layer.ffn, "router")]

    def num_parameters(self, include_embeddings: bool = True) -> int:
        total = sum(p.numel() for p in self.parameters())
        if not include_embeddings:
            total -= self.token_embeddings.weight.numel() + self.lm_head.weight.numel()
        return total

    def num_active_parameters(self, include_embeddings: bool = True) -> int:
        """Parameters a token actually multiplies: a mixture of experts counts only its top-k routed experts."""
        total = self.num_parameters(include_embeddings)
        for moe in self.moe_layers():
            total -= moe.inactive_parameters_per_token()
        return total

    @torch.no_grad()
    def load_weights(self, weights: dict[str, Tensor]) -> "TransformerLM":
        """Strictly loads a state dict such as the course's reference weights."""
        self.load_state_dict(weights, strict=True)
        return self
