"""What every attention variant's decoding cache has in common, and the model-level list of them."""

from typing import Protocol, runtime_checkable


@runtime_checkable
class LayerCache(Protocol):
    """One layer's decoding state.

    `length` counts every token seen so far (the absolute index of the next one); `bytes_per_token` is what one
    more token of one sequence costs this layer (0 for a constant-size recurrent state).
    """

    length: int

    @property
    def bytes_per_token(self) -> int: ...


class ModelCaches(list):
    """Per-layer caches, in layer order, with their total cost per token."""

    @property
    def length(self) -> int:
        return self[0].length if self else 0

    @property
    def bytes_per_token(self) -> int:
        return sum(cache.bytes_per_token for cache in self)


class ExternalKVCache:
    """Keys and values kept outside the model, e.g. in a server's paged pool shared by many sequences.

    An attention module handed one stores its new keys/values with `store` (shapes as the module makes them:
    (batch, kv_heads, seq, d)); when `decoding` (one new token per row) it asks `attend` for the output over
    everything stored so far, and otherwise (a fresh prompt) runs its own causal attention over the call's
    tokens. Positions must be passed explicitly: the cache has no single length for all rows.
    """

    decoding: bool = False
    length: int = 0  # the model's context-length check is the server's job: rows have different lengths

    @property
    def bytes_per_token(self) -> int:
        raise NotImplementedError

    def store(self, k, v) -> None:
        raise NotImplementedError

    def attend(self, q, *, scale: float, value_dim: int | None = None, sliding_window: int | None = None,
               alibi_slopes=None):
        """q (batch, heads, 1, d_k) -> (batch, heads, 1, d_v) over each row's stored keys."""
        raise NotImplementedError
