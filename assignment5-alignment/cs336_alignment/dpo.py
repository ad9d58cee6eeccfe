"""The per-instance DPO loss on the Alpaca template (supplement section 5.3)."""

from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Int
from torch import Tensor, nn

from cs336_alignment.logprobs import label_log_probs
from cs336_alignment.prompts import format_prompt
from cs336_alignment.text_tokenizer import encode, eos_token_id


def preference_sequence(tokenizer: Any, prompt: str, response: str) -> list[int]:
    """Alpaca-formatted prompt+response token ids with the end-of-sequence id appended."""
    text = format_prompt("alpaca_sft", instruction=prompt, response=response)
    return [*encode(tokenizer, text, add_special_tokens=True), eos_token_id(tokenizer)]


def sequence_log_prob(model: nn.Module, ids: Int[Tensor, " seq"]) -> Tensor:
    """log p(ids[1:] | ids[0]) summed: the unconditional sequence log-likelihood the DPO margin needs."""
    if ids.numel() < 2:
        raise ValueError("a sequence needs at least two tokens to be scored")
    ids = ids.unsqueeze(0)
    logits = model(ids[:, :-1]).logits
    return label_log_probs(logits, ids[:, 1:]).sum()


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def dpo_loss_from_log_probs(
    policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, beta: float
) -> Tensor:
    """-log sigmoid(beta * ((pi_w - ref_w) - (pi_l - ref_l))) elementwise; works for batches too."""
    margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    return -F.logsigmoid(beta * margin)


def per_instance_dpo_loss(
    lm: nn.Module,
    lm_ref: nn.Module,
    tokenizer: Any,
    beta: float,
    prompt: str,
    response_chosen: str,
    response_rejected: str,
) -> Tensor:
    """DPO loss of one preference pair; gradients flow into `lm` only, and the result lives on `lm`'s device.

    The prompt's log-probability cancels in the margin (same prefix under the same model), so whole-sequence
    log-likelihoods are compared, as the supplement suggests.
    """
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    chosen = torch.tensor(preference_sequence(tokenizer, prompt, response_chosen), dtype=torch.long)
    rejected = torch.tensor(preference_sequence(tokenizer, prompt, response_rejected), dtype=torch.long)
    device, ref_device = _model_device(lm), _model_device(lm_ref)
    policy_w = sequence_log_prob(lm, chosen.to(device))
    policy_l = sequence_log_prob(lm, rejected.to(device))
    with torch.no_grad():
        ref_w = sequence_log_prob(lm_ref, chosen.to(ref_device)).to(device)
        ref_l = sequence_log_prob(lm_ref, rejected.to(ref_device)).to(device)
    return dpo_loss_from_log_probs(policy_w, policy_l, ref_w, ref_l, beta)
