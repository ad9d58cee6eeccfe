"""The handout's model sizes (§1.1.2, Table 1) as `cs336_basics` configs, plus a tiny one for CPU runs and tests,
and the parameter / optimizer-state byte counts the memory benchmarks compare against."""

from __future__ import annotations

from cs336_basics.model import TransformerConfig

# name -> (d_model, d_ff, num_layers, num_heads)
MODEL_SIZES: dict[str, tuple[int, int, int, int]] = {
    "tiny": (64, 256, 2, 4),
    "small": (768, 3072, 12, 12),
    "medium": (1024, 4096, 24, 16),
    "large": (1280, 5120, 36, 20),
    "xl": (1600, 6400, 48, 25),
    "2.7B": (2560, 10240, 32, 32),
}
HANDOUT_SIZES = ["small", "medium", "large", "xl", "2.7B"]
VOCAB_SIZE = 10_000


def model_config(size: str, context_length: int, vocab_size: int = VOCAB_SIZE) -> TransformerConfig:
    """The LM of one named size at a context length (the RoPE table is sized to it)."""
    if size not in MODEL_SIZES:
        raise ValueError(f"unknown model size {size!r}; choose from {list(MODEL_SIZES)}")
    d_model, d_ff, num_layers, num_heads = MODEL_SIZES[size]
    return TransformerConfig(
        vocab_size=vocab_size, context_length=context_length, d_model=d_model,
        num_layers=num_layers, num_heads=num_heads, d_ff=d_ff,
    )


def parameter_count(config: TransformerConfig) -> int:
    """Closed form for the pre-norm SwiGLU LM (untied embedding and head), so reports need not build it."""
    d, f, v = config.d_model, config.d_ff, config.vocab_size
    per_layer = 4 * d * d + 3 * d * f + 2 * d
    return config.num_layers * per_layer + 2 * v * d + d


def theoretical_bytes(n_params: int, world_size: int, sharding: str, bytes_per_elem: int = 4) -> dict[str, float]:
    """Per-rank bytes of parameters, gradients and AdamW state (two moments) under a sharding scheme.

    "none": everything replicated (plain DDP); "zero1": optimizer state / world; "fsdp": all three / world
    (the gathered full-size compute copies of one layer at a time are extra and not counted here).
    """
    params = grads = n_params * bytes_per_elem
    state = 2 * n_params * bytes_per_elem
    if sharding == "zero1":
        state /= world_size
    elif sharding == "fsdp":
        params, grads, state = params / world_size, grads / world_size, state / world_size
    elif sharding != "none":
        raise ValueError(f"unknown sharding {sharding!r}")
    return {"params": float(params), "grads": float(grads), "optimizer_state": float(state),
            "total": float(params + grads + state)}
