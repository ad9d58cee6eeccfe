"""Next tokens for a batch of rows with mixed parameters: greedy rows by argmax, the rest by temperature +
nucleus (top-p) sampling in one batched pass. Rows of a seeded request draw from that request's own
generator, so a seeded request gives the same text whatever else shares its batch."""

import torch
from jaxtyping import Float
from torch import Tensor

from cs336_basics.decoding import top_p_filter


def _upload(values: list, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A small host list on the device without waiting for the device: a blocking upload would make the host
    wait for the decode window in flight (asynchronous scheduling launches the next one behind it)."""
    tensor = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def sample_rows(
    logits: Float[Tensor, "rows vocab"],
    temperatures: list[float],
    top_ps: list[float],
    generators: list[torch.Generator | None],
    default_generator: torch.Generator | None = None,
) -> Tensor:
    """The chosen token of each row, left on the logits' device (no host sync: decode steps chain on it)."""
    choice = logits.argmax(dim=-1)
    sampled = [i for i, t in enumerate(temperatures) if t > 0]
    if sampled:
        index = _upload(sampled, torch.long, logits.device)
        temperature = _upload([temperatures[i] for i in sampled], torch.float32, logits.device)
        probs = torch.softmax(logits[index].float() / temperature[:, None], dim=-1)
        top_p = _upload([top_ps[i] for i in sampled], torch.float32, logits.device)
        if any(p < 1 for p in top_ps):
            probs = top_p_filter(probs, top_p)
        shared = [j for j, i in enumerate(sampled) if generators[i] is None]
        if shared:
            at = None if len(shared) == len(sampled) else _upload(shared, torch.long, logits.device)
            picks = torch.multinomial(probs if at is None else probs[at], 1, generator=default_generator)
            choice[index if at is None else index[at]] = picks.squeeze(-1)
        for j, i in enumerate(sampled):
            if generators[i] is not None:
                choice[i] = torch.multinomial(probs[j], 1, generator=generators[i])[0]
    return choice
