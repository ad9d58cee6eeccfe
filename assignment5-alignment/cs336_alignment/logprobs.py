"""Per-token log-probabilities and entropies of a causal LM's next-token distributions."""

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn


def _upcast(logits: Tensor) -> Tensor:
    # bf16/fp16 logsumexp over a 150k vocabulary loses too much precision; compute in at least float32.
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def compute_entropy(logits: Float[Tensor, "... vocab"]) -> Float[Tensor, "..."]:
    """H = logsumexp(z) - sum softmax(z) * z on max-shifted logits (shift-invariant, so no overflow and no
    cancellation between two huge terms); -inf logits contribute 0."""
    logits = _upcast(logits)
    logits = logits - logits.max(dim=-1, keepdim=True).values.detach()
    log_z = torch.logsumexp(logits, dim=-1, keepdim=True)
    probs = torch.exp(logits - log_z)
    weighted = torch.where(probs > 0, probs * logits, torch.zeros((), dtype=logits.dtype, device=logits.device))
    return log_z.squeeze(-1) - weighted.sum(dim=-1)


def label_log_probs(logits: Float[Tensor, "... vocab"], labels: Int[Tensor, "..."]) -> Float[Tensor, "..."]:
    """log softmax(logits)[label] without materialising the full log-softmax tensor."""
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)}")
    logits = _upcast(logits)
    picked = logits.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def get_response_log_probs(
    model: nn.Module,
    input_ids: Int[Tensor, "batch seq"],
    labels: Int[Tensor, "batch seq"],
    return_token_entropy: bool = False,
    attention_mask: Int[Tensor, "batch seq"] | None = None,
) -> dict[str, Tensor]:
    """log p(labels[t] | input_ids[:t+1]) for every position (prompt and padding are masked later).

    `model(input_ids).logits` is all that is asked of the model, so any HF causal LM or `BasicsCausalLM` works.
    """
    if input_ids.shape != labels.shape:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and labels {tuple(labels.shape)} differ in shape")
    kwargs = {} if attention_mask is None else {"attention_mask": attention_mask}
    logits = model(input_ids, **kwargs).logits
    out = {"log_probs": label_log_probs(logits, labels)}
    if return_token_entropy:
        out["token_entropy"] = compute_entropy(logits)
    return out
