"""Our FlashAttention-2 as `cs336_basics` attention backends, so `cs336-basics train --attention-backend cs336-fa2`
trains with the Triton kernels.

- "cs336-fa2": the Triton forward and backward kernels (CUDA; float32 runs in tf32 on the tensor cores).
- "cs336-fa2-torch": the tiled PyTorch twin of the same algorithm (any device): slow, for checking on a CPU.
- "cs336-fa3": the Hopper Gluon forward (issue 24) with the Triton backward; other GPUs and inputs it does
  not take fall back to the "cs336-fa2" kernels.

`register()` adds the names and loads neither torch nor Triton (cs336_basics checks a backend name before
torch is imported); the kernels are imported on the first call. cs336_basics calls it through the entry points
declared in pyproject.toml, or by this module's name where the packages are used from PYTHONPATH.
Both take equal numbers of query and KV heads and the default scale 1/√head_dim; the registry adapts the rest.
"""

from __future__ import annotations

from cs336_basics.attention_backends import register_attention_backend


def fa2_triton(q, k, v, *, causal: bool, scale: float):
    from cs336_systems.flash_attention import FlashAttentionTriton

    return FlashAttentionTriton.apply(q, k, v, causal)


def fa2_torch(q, k, v, *, causal: bool, scale: float):
    from cs336_systems.flash_attention import FlashAttentionPytorch

    return FlashAttentionPytorch.apply(q, k, v, causal)


def fa3_hopper(q, k, v, *, causal: bool, scale: float):
    from cs336_systems.flash_attention.hopper_impl import FlashAttentionHopper

    return FlashAttentionHopper.apply(q, k, v, causal)


def register() -> None:
    register_attention_backend("cs336-fa2", fa2_triton, devices=("cuda",))
    register_attention_backend("cs336-fa2-torch", fa2_torch)
    register_attention_backend("cs336-fa3", fa3_hopper, devices=("cuda",))
