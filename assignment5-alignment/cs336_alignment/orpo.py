"""ORPO (Hong et al. 2024): SFT on the chosen response plus an odds-ratio preference term, no reference model.

    L = -(1/|y_w|) Σ_t log π(y_w,t | x, y_w,<t)  +  λ · -log σ(log odds(y_w|x) - log odds(y_l|x))

with P(y|x) = exp((1/|y|) Σ_t log π(y_t|x, y_<t)) (the length-normalised likelihood) and
odds(y|x) = P / (1 - P).
"""

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cs336_alignment.lm import model_device
from cs336_alignment.logprobs import get_response_log_probs
from cs336_alignment.masked import masked_mean
from cs336_alignment.prompts import format_prompt
from cs336_alignment.text_tokenizer import encode, eos_token_id
from cs336_alignment.tokenization import _concatenate_and_pad


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, stable at both ends (Mächler 2012: expm1 near 0, log1p further out)."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def log_odds(mean_log_prob: Tensor) -> Tensor:
    """log(P / (1 - P)) for P = exp(mean_log_prob); clamped just below 0 so P = 1 stays finite."""
    tiny = torch.finfo(mean_log_prob.dtype).eps
    x = mean_log_prob.clamp(max=-tiny)
    return x - log1mexp(x)


def orpo_loss_from_log_probs(
    chosen_mean_log_prob: Tensor, rejected_mean_log_prob: Tensor, lam: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-pair ORPO losses from the responses' mean token log-likelihoods, and their parts: `nll` (the SFT
    term), `odds_ratio_loss` (-log σ of the log odds ratio) and `log_odds_ratio`."""
    if lam < 0:
        raise ValueError(f"lambda must be >= 0, got {lam}")
    ratio = log_odds(chosen_mean_log_prob) - log_odds(rejected_mean_log_prob)
    odds_ratio_loss = -F.logsigmoid(ratio)
    nll = -chosen_mean_log_prob
    return nll + lam * odds_ratio_loss, {"nll": nll.detach(), "odds_ratio_loss": odds_ratio_loss.detach(),
                                         "log_odds_ratio": ratio.detach()}


def preference_response_batch(tokenizer: Any, prompts: Sequence[str], responses: Sequence[str]) -> dict[str, Tensor]:
    """Alpaca-formatted prompts (the DPO loop's template) followed by response + EOS, right-padded; the
    response mask covers the response and its EOS, the tokens whose likelihood ORPO compares."""
    prefixes = [encode(tokenizer, format_prompt("alpaca_sft", instruction=p, response=""), add_special_tokens=True)
                for p in prompts]
    eos = eos_token_id(tokenizer)
    outputs = [[*encode(tokenizer, r, add_special_tokens=False), eos] for r in responses]
    return _concatenate_and_pad(prefixes, outputs, tokenizer)


def mean_response_log_probs(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """(1/|y|) Σ_t log π(y_t | ...) per row, over the response mask."""
    device = model_device(model)
    out = get_response_log_probs(model, batch["input_ids"].to(device), batch["labels"].to(device))
    return masked_mean(out["log_probs"], batch["response_mask"].to(device), dim=-1)


def orpo_batch(
    model: nn.Module, tokenizer: Any, pairs: Sequence[dict[str, str]], lam: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-pair ORPO losses of {"prompt", "chosen", "rejected"} pairs (chosen and rejected in one forward)."""
    prompts = [p["prompt"] for p in pairs] * 2
    responses = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
    mean_lp = mean_response_log_probs(model, preference_response_batch(tokenizer, prompts, responses))
    n = len(pairs)
    return orpo_loss_from_log_probs(mean_lp[:n], mean_lp[n:], lam)
