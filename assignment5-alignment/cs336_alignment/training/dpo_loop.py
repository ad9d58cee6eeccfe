"""DPO (supplement section 5): a frozen reference copy, the per-instance loss batched, preference accuracy."""

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from cs336_alignment.dpo import dpo_loss_from_log_probs, preference_sequence
from cs336_alignment.lm import model_device
from cs336_alignment.logprobs import label_log_probs
from cs336_alignment.text_tokenizer import pad_token_id
from cs336_alignment.training.common import (
    Deadline,
    RunDir,
    autocast,
    check_divides,
    chunks,
    clip_and_step,
    epoch_order,
    finish_run,
    record_step,
)
from cs336_alignment.training.parallel import (
    agree_to_stop,
    micro_step,
    reduce_metrics,
    shard,
    single_process,
    train_module,
)
from cs336_basics.cli_support import StopRequest, UserError, bounded, check_ranges
from cs336_basics.training.distributed import Dist


@dataclass
class DPOConfig:
    """The supplement's settings: beta 0.1, RMSprop at lr 1e-6, 64 pairs per step via accumulation."""

    beta: float = bounded(0.1, gt=0)
    learning_rate: float = bounded(1e-6, gt=0)
    optimizer: str = "rmsprop"  # or adamw
    train_batch_size: int = bounded(64, ge=1)
    gradient_accumulation_steps: int = bounded(64, ge=1)
    num_steps: int | None = bounded(None, ge=1)  # default: one epoch
    epochs: float = bounded(1.0, gt=0)
    max_grad_norm: float | None = bounded(None, ge=0)  # None or 0: no clipping (clip_and_step)
    eval_every: int = bounded(0, ge=0)
    eval_batch_size: int = bounded(8, ge=1)
    precision: str = "fp32"
    reference_device: str | None = None  # e.g. cuda:1 (the supplement puts the reference on its own GPU)
    checkpoint_every: int = bounded(0, ge=0)
    seed: int = bounded(0, ge=0)
    time_budget_s: float | None = bounded(None, gt=0)

    def __post_init__(self) -> None:
        check_ranges(self)

    def validate(self) -> None:
        check_ranges(self)  # again: fields may have been changed since construction
        check_divides("gradient_accumulation_steps", self.gradient_accumulation_steps, "train_batch_size",
                      self.train_batch_size)
        if self.optimizer not in ("rmsprop", "adamw"):
            raise UserError(f"optimizer must be 'rmsprop' or 'adamw', got {self.optimizer!r}")


def frozen_reference(policy: nn.Module, device: str | torch.device | None = None) -> nn.Module:
    """A deep copy of the policy with gradients off, in eval mode (optionally on another device)."""
    ref = copy.deepcopy(policy)
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref.to(device if device is not None else model_device(policy)).eval()


def batched_sequence_log_probs(model: nn.Module, sequences: Sequence[list[int]], pad: int) -> Tensor:
    """Σ log p(ids[t] | ids[<t]) for t >= 1 per sequence, one right-padded forward (padding comes after every
    real token, so a causal model's real positions are unaffected and only the label mask is needed)."""
    device = model_device(model)
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    valid = torch.zeros((len(sequences), width), dtype=torch.bool)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq)
        valid[row, : len(seq)] = True
    ids, valid = ids.to(device), valid.to(device)
    logits = model(ids[:, :-1]).logits
    per_token = label_log_probs(logits, ids[:, 1:])
    return torch.where(valid[:, 1:], per_token, torch.zeros_like(per_token)).sum(dim=-1)


def dpo_batch(
    policy: nn.Module, reference: nn.Module, tokenizer: Any, pairs: Sequence[dict[str, str]], beta: float,
    precision: str = "fp32",
) -> tuple[Tensor, Tensor]:
    """Per-pair DPO losses (batched forward: chosen and rejected together) and the implicit-reward margins."""
    sequences = [preference_sequence(tokenizer, p["prompt"], p[key]) for key in ("chosen", "rejected") for p in pairs]
    pad = pad_token_id(tokenizer)
    n = len(pairs)
    with autocast(model_device(policy), precision):
        policy_lp = batched_sequence_log_probs(policy, sequences, pad)
    with torch.no_grad(), autocast(model_device(reference), precision):
        ref_lp = batched_sequence_log_probs(reference, sequences, pad).to(policy_lp.device)
    losses = dpo_loss_from_log_probs(policy_lp[:n], policy_lp[n:], ref_lp[:n], ref_lp[n:], beta)
    margins = (policy_lp[:n] - ref_lp[:n]) - (policy_lp[n:] - ref_lp[n:])
    return losses, margins.detach()


@torch.no_grad()
def preference_accuracy(
    policy: nn.Module, reference: nn.Module, tokenizer: Any, pairs: Sequence[dict[str, str]], beta: float,
    batch_size: int = 8,
) -> dict[str, float]:
    """Fraction of pairs whose implicit reward prefers `chosen` (margin > 0), and the mean DPO loss."""
    correct, loss, n = 0, 0.0, 0
    for chunk in chunks(pairs, batch_size):
        losses, margins = dpo_batch(policy, reference, tokenizer, chunk, beta)
        correct += int((margins > 0).sum())
        loss += float(losses.sum())
        n += len(chunk)
    return {"preference_accuracy": correct / max(n, 1), "loss": loss / max(n, 1)}


def run_dpo(
    policy: nn.Module,
    tokenizer: Any,
    train_pairs: Sequence[dict[str, str]],
    config: DPOConfig,
    eval_pairs: Sequence[dict[str, str]] | None = None,
    out_dir: str | None = None,
    resume: bool = False,
    reference: nn.Module | None = None,
    overwrite: bool = False,
    stop: StopRequest | None = None,
    dist: Dist | None = None,
) -> list[dict[str, Any]]:
    """DPO over seeded epochs of {"prompt", "chosen", "rejected"} pairs; the reference starts as the policy.

    With a data-parallel `dist` every rank calls this (each with its own reference copy, on its device) and
    trains on its share of each batch; rank 0 alone evaluates and writes."""
    config.validate()
    if not train_pairs:
        raise UserError("DPO needs at least one preference pair")
    dist = dist or single_process()
    if reference is None:
        reference = frozen_reference(policy, config.reference_device)
    run_dir = RunDir(out_dir, config, resume, overwrite, writer=dist.is_main)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer: torch.optim.Optimizer = torch.optim.RMSprop(params, lr=config.learning_rate) \
        if config.optimizer == "rmsprop" else torch.optim.AdamW(params, lr=config.learning_rate)
    steps = config.num_steps or max(1, int(config.epochs * len(train_pairs) / config.train_batch_size))
    start = run_dir.resume(policy, optimizer)[0] if resume else 0
    trained = train_module(policy, dist)
    micro = config.train_batch_size // config.gradient_accumulation_steps
    deadline = Deadline(config.time_budget_s)
    history: list[dict[str, Any]] = []

    def evaluate(step: int) -> None:
        if eval_pairs and dist.is_main:
            policy.eval()
            summary = preference_accuracy(policy, reference, tokenizer, eval_pairs, config.beta,
                                          config.eval_batch_size)
            policy.train()
            record = {"step": step, "kind": "eval", **{f"eval_{k}": v for k, v in summary.items()}}
            run_dir.log(record)
            history.append(record)

    if start == 0:
        evaluate(0)
    policy.train()
    step = start
    for step in tqdm(range(start, steps), desc="dpo", initial=start, total=steps, leave=False,
                     disable=not dist.is_main):
        if agree_to_stop(dist, deadline.passed(), RunDir.stopped(stop)):
            break
        batch = [train_pairs[i] for i in epoch_order(len(train_pairs), step, config.train_batch_size, config.seed)]
        local, accumulation = shard(batch, config.gradient_accumulation_steps, dist)
        loss_sum, correct = 0.0, 0
        parts = list(chunks(local, micro))
        for index, part in enumerate(parts):
            with micro_step(trained, last=index == len(parts) - 1):
                losses, margins = dpo_batch(trained, reference, tokenizer, part, config.beta, config.precision)
                (losses.mean() / accumulation).backward()
            loss_sum += float(losses.detach().mean()) / accumulation
            correct += int((margins > 0).sum())
        grad_norm = clip_and_step(policy, optimizer, config.max_grad_norm)
        metrics = reduce_metrics(dist, {"loss": loss_sum}, {"correct": correct})
        record = {"step": step + 1, "kind": "train", "loss": metrics["loss"],
                  "train_accuracy": metrics["correct"] / len(batch), "grad_norm": grad_norm}
        record_step(run_dir, history, record, policy, optimizer, step + 1, steps, config.checkpoint_every,
                    config.eval_every, evaluate)
        step += 1
    finish_run(run_dir, policy, optimizer, step, stop, evaluate)
    return history
