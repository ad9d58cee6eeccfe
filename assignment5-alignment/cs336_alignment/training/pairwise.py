"""What the preference-pair loops share (reward model, ORPO): seeded epochs of {"prompt", "chosen",
"rejected"} pairs, gradient accumulation, clipping, held-out accuracy, checkpoints and resume, through
`training.common`. A loop supplies only `batch_fn(model, pairs) -> (per-pair losses, per-pair "prefers chosen"
booleans, extra per-pair metrics)`."""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from cs336_alignment.lm import model_device
from cs336_alignment.training.common import (
    Deadline,
    RunDir,
    autocast,
    check_divides,
    chunks,
    clip_and_step,
    epoch_order,
    finish_run,
    make_adamw,
    record_step,
    set_lr,
    warmup_lr,
)
from cs336_basics.cli_support import StopRequest, UserError, bounded, check_ranges

Pairs = Sequence[dict[str, str]]
BatchFn = Callable[[nn.Module, Pairs], tuple[Tensor, Tensor, dict[str, Tensor]]]


@dataclass
class PairwiseConfig:
    """Optimisation settings of a loop over preference pairs (AdamW, constant LR after a linear warm-up)."""

    learning_rate: float = bounded(1e-5, gt=0)
    train_batch_size: int = bounded(64, ge=1)
    gradient_accumulation_steps: int = bounded(32, ge=1)
    num_steps: int | None = bounded(None, ge=1)  # default: `epochs` passes over the pairs
    epochs: float = bounded(1.0, gt=0)
    warmup_steps: int = bounded(0, ge=0)
    max_grad_norm: float = bounded(1.0, ge=0)  # 0: no clipping
    weight_decay: float = bounded(0.0, ge=0)
    adam_beta1: float = bounded(0.9, ge=0, lt=1)
    adam_beta2: float = bounded(0.95, ge=0, lt=1)
    eval_every: int = bounded(0, ge=0)  # 0: at the start and the end only
    eval_batch_size: int = bounded(8, ge=1)
    precision: str = "fp32"
    checkpoint_every: int = bounded(0, ge=0)
    seed: int = bounded(0, ge=0)
    time_budget_s: float | None = bounded(None, gt=0)

    def __post_init__(self) -> None:
        check_ranges(self)

    def validate(self) -> None:
        check_ranges(self)
        check_divides("gradient_accumulation_steps", self.gradient_accumulation_steps, "train_batch_size",
                      self.train_batch_size)


@torch.no_grad()
def evaluate_pairs(model: nn.Module, pairs: Pairs, batch_fn: BatchFn, batch_size: int) -> dict[str, float]:
    """Held-out `accuracy` (fraction of pairs where the model prefers `chosen`), mean `loss` and the mean of every
    extra metric."""
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {"accuracy": 0.0, "loss": 0.0}
    for chunk in chunks(pairs, batch_size):
        losses, correct, extra = batch_fn(model, chunk)
        sums["accuracy"] += float(correct.float().sum())
        sums["loss"] += float(losses.sum())
        for key, value in extra.items():
            sums[key] = sums.get(key, 0.0) + float(value.sum())
    model.train(was_training)
    return {key: value / max(len(pairs), 1) for key, value in sums.items()}


def run_pairwise(
    name: str,
    model: nn.Module,
    train_pairs: Pairs,
    config: PairwiseConfig,
    batch_fn: BatchFn,
    eval_pairs: Pairs | None = None,
    out_dir: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    stop: StopRequest | None = None,
) -> list[dict[str, Any]]:
    """Trains `model` (its parameters with requires_grad) on `batch_fn`'s mean loss; logs a `train` record per
    step (loss, accuracy, grad norm, extra metrics) and `eval` records (`eval_accuracy`, `eval_loss`, ...)."""
    config.validate()
    if not train_pairs:
        raise UserError(f"{name} needs at least one preference pair")
    run_dir = RunDir(out_dir, config, resume, overwrite)
    optimizer = make_adamw(model, config.learning_rate, config.weight_decay, config.adam_beta1, config.adam_beta2)
    steps = config.num_steps or max(1, int(config.epochs * len(train_pairs) / config.train_batch_size))
    start = run_dir.resume(model, optimizer)[0] if resume else 0
    micro = config.train_batch_size // config.gradient_accumulation_steps
    deadline = Deadline(config.time_budget_s)
    history: list[dict[str, Any]] = []
    device = model_device(model)

    def evaluate(step: int) -> None:
        if eval_pairs:
            summary = evaluate_pairs(model, eval_pairs, batch_fn, config.eval_batch_size)
            record = {"step": step, "kind": "eval", **{f"eval_{k}": v for k, v in summary.items()}}
            run_dir.log(record)
            history.append(record)

    if start == 0:
        evaluate(0)
    model.train()
    step = start
    for step in tqdm(range(start, steps), desc=name, initial=start, total=steps, leave=False):
        if deadline.passed() or RunDir.stopped(stop):
            break
        set_lr(optimizer, warmup_lr(config.learning_rate, step, config.warmup_steps))
        batch = [train_pairs[i] for i in epoch_order(len(train_pairs), step, config.train_batch_size, config.seed)]
        totals: dict[str, float] = {"loss": 0.0, "train_accuracy": 0.0}
        for part in chunks(batch, micro):
            with autocast(device, config.precision):
                losses, correct, extra = batch_fn(model, part)
            (losses.mean() / config.gradient_accumulation_steps).backward()
            totals["loss"] += float(losses.detach().mean()) / config.gradient_accumulation_steps
            totals["train_accuracy"] += float(correct.float().sum()) / len(batch)
            for key, value in extra.items():
                totals[key] = totals.get(key, 0.0) + float(value.float().sum()) / len(batch)
        grad_norm = clip_and_step(model, optimizer, config.max_grad_norm)
        record = {"step": step + 1, "kind": "train", "lr": optimizer.param_groups[0]["lr"], **totals,
                  "grad_norm": grad_norm}
        record_step(run_dir, history, record, model, optimizer, step + 1, steps, config.checkpoint_every,
                    config.eval_every, evaluate)
        step += 1
    finish_run(run_dir, model, optimizer, step, stop, evaluate)
    return history
