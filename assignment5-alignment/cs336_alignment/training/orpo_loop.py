"""ORPO: SFT on the chosen response plus λ times the odds-ratio preference loss, no reference model."""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from cs336_alignment.orpo import orpo_batch
from cs336_alignment.training.pairwise import PairwiseConfig, run_pairwise
from cs336_basics.cli_support import StopRequest, bounded


@dataclass
class ORPOConfig(PairwiseConfig):
    """The paper's λ is 0.1 for its Mistral runs (learning rate 5e-6 to 8e-6)."""

    orpo_lambda: float = bounded(0.1, ge=0)
    learning_rate: float = bounded(8e-6, gt=0)


def run_orpo(
    policy: nn.Module,
    tokenizer: Any,
    train_pairs: Sequence[dict[str, str]],
    config: ORPOConfig,
    eval_pairs: Sequence[dict[str, str]] | None = None,
    out_dir: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    stop: StopRequest | None = None,
) -> list[dict[str, Any]]:
    """Logs the loss, its SFT part (`nll`, mean token NLL of the chosen response), the odds-ratio part and
    accuracy: the fraction of pairs whose chosen response has the larger odds."""

    def batch_fn(model: nn.Module, pairs: Sequence[dict[str, str]]):
        losses, parts = orpo_batch(model, tokenizer, pairs, config.orpo_lambda)
        return losses, parts["log_odds_ratio"] > 0, parts

    return run_pairwise("orpo", policy, train_pairs, config, batch_fn, eval_pairs, out_dir, resume, overwrite, stop)
