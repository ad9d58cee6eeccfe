"""SFT on prompt/response pairs (R1-Zero-style reasoning traces) and the supplement's packed instruction tuning."""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from cs336_alignment.lm import model_device
from cs336_alignment.logprobs import get_response_log_probs, label_log_probs
from cs336_alignment.masked import masked_mean
from cs336_alignment.reward import r1_zero_reward
from cs336_alignment.sft import sft_microbatch_train_step
from cs336_alignment.sft_data import iterate_batches
from cs336_alignment.tokenization import tokenize_prompt_and_output
from cs336_alignment.training.common import (
    Deadline,
    RewardFn,
    RunDir,
    announce_stop,
    autocast,
    check_divides,
    chunks,
    clip_and_step,
    epoch_order,
    finish_run,
    make_adamw,
    native_backend,
    record_step,
    set_lr,
    warmup_lr,
)
from cs336_alignment.training.eval_config import EvalSettings, QuestionSet, run_eval
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
class SFTConfig(EvalSettings):
    """SFT on (prompt, response) pairs; the loss is the response tokens' summed NLL / `normalize_constant`."""

    learning_rate: float = bounded(1e-5, gt=0)
    train_batch_size: int = bounded(32, ge=1)  # examples per optimizer step
    gradient_accumulation_steps: int = bounded(16, ge=1)  # micro-batches per step (micro-batch = 2)
    num_steps: int | None = bounded(None, ge=1)  # default: `epochs` passes over the data
    epochs: float = bounded(1.0, gt=0)
    warmup_steps: int = bounded(0, ge=0)
    max_grad_norm: float = bounded(1.0, ge=0)  # 0: no clipping (clip_and_step)
    weight_decay: float = bounded(0.0, ge=0)
    adam_beta1: float = bounded(0.9, ge=0, lt=1)
    adam_beta2: float = bounded(0.95, ge=0, lt=1)
    normalize_constant: float = bounded(1.0, gt=0)
    precision: str = "fp32"  # or bf16 (autocast on CUDA)
    generation_batch_size: int = bounded(64, ge=1)
    checkpoint_every: int = bounded(0, ge=0)  # 0: at the end only
    seed: int = bounded(0, ge=0)
    time_budget_s: float | None = bounded(None, gt=0)

    def validate(self) -> None:
        check_ranges(self)  # again: fields may have been changed since construction
        check_divides("gradient_accumulation_steps", self.gradient_accumulation_steps, "train_batch_size",
                      self.train_batch_size)


def sft_update(
    policy: nn.Module,
    optimizer: torch.optim.Optimizer,
    tokenizer: Any,
    prompts: Sequence[str],
    responses: Sequence[str],
    gradient_accumulation_steps: int,
    max_grad_norm: float | None,
    normalize_constant: float = 1.0,
    precision: str = "fp32",
    dist: Dist | None = None,
) -> dict[str, float]:
    """One optimizer step over a batch split into micro-batches: forward, `sft_microbatch_train_step`, clip.

    With a data-parallel `dist`, `policy` is the DDP-wrapped policy, the batch is the global one and this rank
    trains on its share of the micro-batches; the metrics returned are the whole batch's."""
    dist = dist or single_process()
    device = model_device(policy)
    micro = len(prompts) // gradient_accumulation_steps
    prompts, accumulation = shard(prompts[: gradient_accumulation_steps * micro], gradient_accumulation_steps, dist)
    responses = shard(responses[: gradient_accumulation_steps * micro], gradient_accumulation_steps, dist)[0]
    loss, entropy, tokens = 0.0, 0.0, 0
    for start in range(0, accumulation * micro, micro):
        batch = tokenize_prompt_and_output(prompts[start : start + micro], responses[start : start + micro],
                                           tokenizer)
        mask = batch["response_mask"].to(device)
        with micro_step(policy, last=start + micro == accumulation * micro):
            with autocast(device, precision):
                out = get_response_log_probs(policy, batch["input_ids"].to(device), batch["labels"].to(device),
                                             True)
            scaled, meta = sft_microbatch_train_step(out["log_probs"], mask, accumulation, normalize_constant)
        loss += float(scaled)
        entropy += float(masked_mean(out["token_entropy"].detach(), mask)) / accumulation
        tokens += int(meta["response_tokens"])
    grad_norm = clip_and_step(policy, optimizer, max_grad_norm)
    metrics = reduce_metrics(dist, {"loss": loss, "token_entropy": entropy}, {"response_tokens": tokens})
    return {**metrics, "response_tokens": int(metrics["response_tokens"]), "grad_norm": grad_norm}


def run_sft(
    policy: nn.Module,
    tokenizer: Any,
    examples: Sequence[dict[str, str]],
    config: SFTConfig,
    eval_questions: QuestionSet | None = None,
    out_dir: str | None = None,
    resume: bool = False,
    reward_fn: RewardFn = r1_zero_reward,
    overwrite: bool = False,
    stop: StopRequest | None = None,
    dist: Dist | None = None,
) -> list[dict[str, Any]]:
    """SFT for `num_steps` optimizer steps over seeded epochs of `examples` ({"prompt", "response"} dicts).

    Evaluates held-out reward at the start, every `eval_every` steps and at the end (native backend on the
    live policy), checkpoints atomically, and returns the metric records it logged. With a data-parallel
    `dist` (training/parallel.py) every rank calls this; rank 0 alone evaluates and writes the folder.
    """
    config.validate()
    if not examples:
        raise UserError("SFT needs at least one example")
    dist = dist or single_process()
    run_dir = RunDir(out_dir, config, resume, overwrite, writer=dist.is_main)
    optimizer = make_adamw(policy, config.learning_rate, config.weight_decay, config.adam_beta1, config.adam_beta2)
    steps = config.num_steps or max(1, int(config.epochs * len(examples) / config.train_batch_size))
    start = run_dir.resume(policy, optimizer)[0] if resume else 0
    trained = train_module(policy, dist)
    backend = native_backend(policy, tokenizer, config.generation_batch_size)
    deadline = Deadline(config.time_budget_s)
    history: list[dict[str, Any]] = []

    def evaluate(step: int) -> None:
        if eval_questions is not None and len(eval_questions) and dist.is_main:
            summary = run_eval(step, config, backend, policy, tokenizer, eval_questions, reward_fn, run_dir)
            history.append({"step": step, "kind": "eval", **summary})

    if start == 0:
        evaluate(0)
    policy.train()
    step = start
    for step in tqdm(range(start, steps), desc="sft", initial=start, total=steps, leave=False,
                     disable=not dist.is_main):
        if agree_to_stop(dist, deadline.passed(), RunDir.stopped(stop)):
            break
        set_lr(optimizer, warmup_lr(config.learning_rate, step, config.warmup_steps))
        batch = [examples[i] for i in epoch_order(len(examples), step, config.train_batch_size, config.seed)]
        metrics = sft_update(trained, optimizer, tokenizer, [e["prompt"] for e in batch],
                             [e["response"] for e in batch], config.gradient_accumulation_steps,
                             config.max_grad_norm, config.normalize_constant, config.precision, dist)
        record = {"step": step + 1, "kind": "train", "lr": optimizer.param_groups[0]["lr"], **metrics}
        record_step(run_dir, history, record, policy, optimizer, step + 1, steps, config.checkpoint_every,
                    config.eval_every, evaluate)
        step += 1
    finish_run(run_dir, policy, optimizer, step, stop, evaluate)
    return history


@dataclass
class InstructionSFTConfig:
    """The supplement's instruction tuning: Alpaca-format documents packed into `seq_length` chunks, next-token
    cross-entropy on every token, cosine-free linear warm-up then constant LR (lr 2e-5, batch 32)."""

    learning_rate: float = bounded(2e-5, gt=0)
    seq_length: int = bounded(512, ge=1)
    train_batch_size: int = bounded(32, ge=1)
    gradient_accumulation_steps: int = bounded(16, ge=1)
    epochs: int = bounded(1, gt=0)
    num_steps: int | None = bounded(None, ge=1)
    warmup_ratio: float = bounded(0.03, ge=0, lt=1)
    max_grad_norm: float = bounded(1.0, ge=0)
    weight_decay: float = bounded(0.0, ge=0)
    adam_beta1: float = bounded(0.9, ge=0, lt=1)
    adam_beta2: float = bounded(0.95, ge=0, lt=1)
    precision: str = "fp32"
    seed: int = bounded(0, ge=0)
    time_budget_s: float | None = bounded(None, gt=0)

    def __post_init__(self) -> None:
        check_ranges(self)

    def validate(self) -> None:
        check_ranges(self)  # again: fields may have been changed since construction
        check_divides("gradient_accumulation_steps", self.gradient_accumulation_steps, "train_batch_size",
                      self.train_batch_size)


def run_instruction_sft(
    model: nn.Module, dataset: torch.utils.data.Dataset, config: InstructionSFTConfig, out_dir: str | None = None,
    overwrite: bool = False, stop: StopRequest | None = None,
) -> list[dict[str, Any]]:
    """Packed-sequence SFT over a `PackedSFTDataset`: mean token NLL per optimizer step (accumulated)."""
    config.validate()
    run_dir = RunDir(out_dir, config, overwrite=overwrite)
    optimizer = make_adamw(model, config.learning_rate, config.weight_decay, config.adam_beta1, config.adam_beta2)
    device = model_device(model)
    micro = config.train_batch_size // config.gradient_accumulation_steps
    total = config.num_steps or max(1, config.epochs * len(dataset) // config.train_batch_size)
    warmup = int(config.warmup_ratio * total)
    deadline = Deadline(config.time_budget_s)
    history: list[dict[str, Any]] = []
    model.train()
    step, accumulated, loss_sum = 0, 0, 0.0
    progress = tqdm(total=total, desc="instruction-sft", leave=False)
    for epoch in range(max(config.epochs, 1) if config.num_steps is None else 10**9):
        for batch in iterate_batches(dataset, micro, shuffle=True, seed=config.seed + epoch):
            with autocast(device, config.precision):
                logits = model(batch["input_ids"].to(device)).logits
            loss = -label_log_probs(logits, batch["labels"].to(device)).mean()
            (loss / config.gradient_accumulation_steps).backward()
            loss_sum += float(loss.detach()) / config.gradient_accumulation_steps
            accumulated += 1
            if accumulated < config.gradient_accumulation_steps:
                continue
            set_lr(optimizer, warmup_lr(config.learning_rate, step, warmup))
            grad_norm = clip_and_step(model, optimizer, config.max_grad_norm)
            step += 1
            record = {"step": step, "kind": "train", "loss": loss_sum, "grad_norm": grad_norm}
            run_dir.log(record)
            history.append(record)
            progress.update(1)
            accumulated, loss_sum = 0, 0.0
            if step >= total or deadline.passed() or RunDir.stopped(stop):
                break
        if step >= total or deadline.passed() or RunDir.stopped(stop):
            break
    progress.close()
    run_dir.save(model, optimizer, step)
    announce_stop(run_dir, stop, step)
    return history


__all__ = ["InstructionSFTConfig", "SFTConfig", "chunks", "run_instruction_sft", "run_sft", "sft_update"]
