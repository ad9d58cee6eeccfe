"""Sliding-window attention (Mistral): query i sees keys j with i − W < j ≤ i, i.e. its W most recent
tokens, itself included. This is Hugging Face's convention (transformers/masking_utils.py,
`sliding_window_overlay`: kv_idx > q_idx − sliding_window, combined with the causal kv_idx ≤ q_idx).

Decoding needs only the last W keys and values, so the cache is a ring of W slots: memory O(W), not
O(context)."""

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor


def window_mask(
    query_index: Int[Tensor, " queries"], key_index: Int[Tensor, " keys"], window: int
) -> Bool[Tensor, "queries keys"]:
    """True where query i may see key j: i − W < j ≤ i (absolute token indices)."""
    distance = query_index[:, None] - key_index[None, :]
    return (distance >= 0) & (distance < window)


class SlidingWindowCache:
    """Keys and values of the last W tokens. Token t lives in slot t mod W, and each slot remembers the
    absolute index of the token it holds, so masks (window, causality, padding, ALiBi distances) stay
    in index space even though the ring is not in token order."""

    def __init__(
        self, batch: int, num_kv_heads: int, window: int, max_len: int, d_head: int, *, device=None, dtype=None
    ):
        if window <= 0:
            raise ValueError(f"window must be positive, got {window}")
        self.window = window
        self.max_len = max_len
        slots = min(window, max_len)  # a sequence shorter than the window never wraps around
        # Zeros, not empty: a never-written slot must not hold NaN garbage (it is never read, but be safe).
        self.keys = torch.zeros(batch, num_kv_heads, slots, d_head, device=device, dtype=dtype)
        self.values = torch.zeros_like(self.keys)
        self.slot_index = torch.full((slots,), -1, dtype=torch.long, device=device)
        self.length = 0

    @property
    def slots(self) -> int:
        return self.keys.shape[-2]

    @property
    def bytes_per_token(self) -> int:
        """What one more token in the window costs (the ring holds at most W of them)."""
        return 2 * self.keys.shape[1] * self.keys.shape[3] * self.keys.element_size()

    def append(
        self, k: Float[Tensor, "batch kv_heads new d"], v: Float[Tensor, "batch kv_heads new d"]
    ) -> tuple[Tensor, Tensor, Int[Tensor, " keys"]]:
        """Stores the new tokens and returns every key/value this call's queries may need (the ring's
        tokens, then the new ones) with their absolute indices; the caller masks by the window."""
        new = k.shape[-2]
        start, end = self.length, self.length + new
        if end > self.max_len:
            raise ValueError(f"sliding-window cache was sized for {self.max_len} positions; {end} requested")
        held = min(start, self.slots)  # before wrapping, tokens 0..start-1 sit in slots 0..start-1
        new_index = torch.arange(start, end, device=self.slot_index.device)
        keys = torch.cat((self.keys[..., :held, :], k), dim=-2)
        values = torch.cat((self.values[..., :held, :], v), dim=-2)
        key_index = torch.cat((self.slot_index[:held], new_index))
        kept = min(new, self.slots)  # only the most recent W tokens can be seen by later queries
        slot = new_index[new - kept :] % self.slots
        self.keys[..., slot, :] = k[..., new - kept :, :]
        self.values[..., slot, :] = v[..., new - kept :, :]
        self.slot_index[slot] = new_index[new - kept :]
        self.length = end
        return keys, values, key_index
