"""Attention backends by name: which kernel computes softmax(q kᵀ · scale) v in the model's plain causal attention.

A backend is a function `fn(q, k, v, *, causal, scale) -> out` on (batch, heads, seq, head_dim) tensors. The
registry adapts the inputs to what each backend declares it can take, so backends stay minimal:

- `supports` "gqa": the backend takes k/v with fewer heads than q (query head h reads KV head h // group);
  otherwise the registry repeats each KV head over its group first.
- `supports` "scale": the backend honours any `scale`; otherwise it must use 1/√head_dim, and the registry
  multiplies q by scale·√head_dim so the result is the same function.
- `devices`: the device types it runs on (None: any); other devices fail with a message naming the backend.

`causal` masks top-left aligned (query i sees keys 0..i), as SDPA's `is_causal` and our FlashAttention do.

Other packages add backends without this package importing them (cs336_basics must not depend on
cs336_systems): a function that calls `register_attention_backend`, declared under the entry-point group
"cs336_basics.attention_backends" once per backend name it registers ("module:function"). It is called the
first time one of its names is looked up. This module imports no torch, so the CLI can check a name before
torch loads.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

ENTRY_POINT_GROUP = "cs336_basics.attention_backends"
# Tried when a name is neither registered nor an installed entry point: on a machine that uses the packages
# through PYTHONPATH alone (the GPU box) no package metadata exists, so entry points find nothing there.
# Each module's `register()` is called, as its entry point would be.
FALLBACK_MODULES = ("cs336_systems.attention_backend",)
FEATURES = frozenset({"gqa", "scale"})

BackendFn = Callable[..., Any]


class UnknownAttentionBackend(ValueError):
    """A backend name nobody registered; the message lists the available ones."""


@dataclass(frozen=True)
class AttentionBackend:
    name: str
    fn: BackendFn
    supports: frozenset[str]
    devices: tuple[str, ...] | None

    def __call__(self, q, k, v, *, causal: bool = False, scale: float | None = None):
        """out = softmax(q kᵀ · scale [+ causal mask]) v; scale None means 1/√head_dim."""
        if self.devices is not None and q.device.type not in self.devices:
            raise RuntimeError(f"attention backend {self.name!r} runs on {'/'.join(self.devices)} tensors only; "
                               f"got {q.device.type}")
        q, k, v = _common_dtype(q, k, v)
        default_scale = 1 / math.sqrt(q.shape[-1])
        scale = default_scale if scale is None else scale
        if "scale" not in self.supports and scale != default_scale:
            q, scale = q * (scale / default_scale), default_scale
        if "gqa" not in self.supports and k.shape[-3] != q.shape[-3]:
            if q.shape[-3] % k.shape[-3]:
                raise ValueError(f"{q.shape[-3]} query heads cannot share {k.shape[-3]} KV heads evenly")
            group = q.shape[-3] // k.shape[-3]
            k, v = k.repeat_interleave(group, dim=-3), v.repeat_interleave(group, dim=-3)
        return self.fn(q, k, v, causal=causal, scale=scale)


_REGISTRY: dict[str, AttentionBackend] = {}


def register_attention_backend(
    name: str, fn: BackendFn, *, supports: Iterable[str] = (), devices: Iterable[str] | None = None
) -> AttentionBackend:
    """Adds (or replaces) backend `name`; `supports` ⊆ {"gqa", "scale"}, `devices` e.g. ("cuda",)."""
    supports = frozenset(supports)
    if not supports <= FEATURES:
        raise ValueError(f"unknown backend features {sorted(supports - FEATURES)}; known: {sorted(FEATURES)}")
    backend = AttentionBackend(name, fn, supports, None if devices is None else tuple(devices))
    _REGISTRY[name] = backend
    return backend


def _plugin_entry_points() -> list:
    return list(entry_points(group=ENTRY_POINT_GROUP))


def _load_plugins(name: str) -> None:
    """Calls the plugin function that declares `name`, else (no metadata) the fallback modules' `register`."""
    for ep in _plugin_entry_points():
        if ep.name == name:
            ep.load()()
    if name in _REGISTRY:
        return
    for module in FALLBACK_MODULES:
        try:
            importlib.import_module(module).register()
        except ModuleNotFoundError as e:  # that package is not on the path; a broken import inside it still raises
            if e.name is None or not (module == e.name or module.startswith(e.name + ".")):
                raise


def available_attention_backends() -> list[str]:
    """Every name get_attention_backend accepts here (plugins listed by their entry points, not imported)."""
    return sorted(set(_REGISTRY) | {ep.name for ep in _plugin_entry_points()})


def get_attention_backend(name: str) -> AttentionBackend:
    if name not in _REGISTRY:
        _load_plugins(name)
    if name not in _REGISTRY:
        raise UnknownAttentionBackend(f"unknown attention backend {name!r}; available: "
                                      f"{', '.join(available_attention_backends())}")
    return _REGISTRY[name]


def check_attention_backend(name: str) -> None:
    """Raises UnknownAttentionBackend unless `name` resolves (runs its plugin's `register`, which loads no torch)."""
    get_attention_backend(name)


def _common_dtype(q, k, v):
    """Under autocast the backend gets the autocast dtype (as SDPA does); mixed inputs meet in their promotion."""
    import torch

    device = q.device.type
    if torch.is_autocast_enabled(device) and q.is_floating_point():
        dtype = torch.get_autocast_dtype(device)
    else:
        dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    return q.to(dtype), k.to(dtype), v.to(dtype)


# ------------------------------------------------------------------------------------------ built-in backends
def _ours(q, k, v, *, causal: bool, scale: float):
    """The course's einsum attention (materialises the scores): the reference every backend is tested against."""
    import torch

    from cs336_basics.attention import scaled_dot_product_attention

    mask = None
    if causal:
        mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
    return scaled_dot_product_attention(q, k, v, mask)


def _sdpa(sdpa_backend: str | None) -> BackendFn:
    """F.scaled_dot_product_attention, with torch's choice of kernel or forced to one (an error if it can't run)."""

    def attend(q, k, v, *, causal: bool, scale: float):
        import contextlib

        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel

        gqa = {"enable_gqa": True} if k.shape[-3] != q.shape[-3] else {}
        forced = sdpa_kernel(getattr(SDPBackend, sdpa_backend)) if sdpa_backend else contextlib.nullcontext()
        with forced:
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, **gqa)

    return attend


register_attention_backend("ours", _ours)
register_attention_backend("sdpa", _sdpa(None), supports=("gqa", "scale"))
register_attention_backend("sdpa-flash", _sdpa("FLASH_ATTENTION"), supports=("gqa", "scale"))
register_attention_backend("sdpa-math", _sdpa("MATH"), supports=("gqa", "scale"))
# Neither takes grouped KV heads (torch would fall through to no kernel at all), so the registry expands them.
register_attention_backend("sdpa-efficient", _sdpa("EFFICIENT_ATTENTION"), supports=("scale",), devices=("cuda",))
register_attention_backend("sdpa-cudnn", _sdpa("CUDNN_ATTENTION"), supports=("scale",), devices=("cuda",))
