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
