"""Next tokens for a batch of rows with mixed parameters: greedy rows by argmax, the rest by temperature +
nucleus (top-p) sampling in one batched pass. Rows of a seeded request draw from that request's own
generator, so a seeded request gives the same text whatever else shares its batch."""

import torch
from jaxtyping import Float
from torch import Tensor

from cs336_basics.decoding import top_p_filter


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
        index = torch.tensor(sampled, device=logits.device)
        temperature = torch.tensor([temperatures[i] for i in sampled], device=logits.device)
        probs = torch.softmax(logits[index].float() / temperature[:, None], dim=-1)
        top_p = torch.tensor([top_ps[i] for i in sampled], device=logits.device)
        if any(p < 1 for p in top_ps):
            probs = top_p_filter(probs, top_p)
        shared = [j for j, i in enumerate(sampled) if generators[i] is None]
        if shared:
            picks = torch.multinomial(probs[shared], 1, generator=default_generator).squeeze(-1)
            choice[index[shared]] = picks
        for j, i in enumerate(sampled):
            if generators[i] is not None:
                choice[i] = torch.multinomial(probs[j], 1, generator=generators[i])[0]
    return choice
