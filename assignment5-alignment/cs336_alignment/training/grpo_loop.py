"""GRPO: group-normalised rewards on sampled rollouts, policy-gradient steps on- or off-policy.

Defaults are the handout's (`n_grpo_steps` 200, lr 1e-5, rollout batch 256 in groups of 8, temperature 1,
4-1024 new tokens, one epoch per rollout batch, train batch 256 in 128 micro-batches, REINFORCE with baseline,
std normalisation, AdamW with weight decay 0 and betas (0.9, 0.95)).
"""

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from cs336_alignment.generation import GenerationBackend, SamplingParams
from cs336_alignment.grpo import (
    IMPORTANCE_WEIGHTED,
    LOSS_TYPES,
    compute_group_normalized_rewards,
    grpo_microbatch_train_step,
)
from cs336_alignment.lm import model_device
from cs336_alignment.logprobs import get_response_log_probs
from cs336_alignment.masked import masked_mean
from cs336_alignment.reward import r1_zero_reward
from cs336_alignment.rollouts import RolloutBatch, sample_rollouts
from cs336_alignment.tokenization import tokenize_prompt_and_sampled_output
from cs336_alignment.training.common import (
    Deadline,
    RewardFn,
    RunDir,
    autocast,
    check_divides,
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
    RolloutEngine,
    agree_to_stop,
    from_rank_0,
    gather_rows,
    micro_step,
    reduce_metrics,
    shard,
    single_process,
    train_module,
)
from cs336_basics.cli_support import StopRequest, UserError, bounded, check_ranges
from cs336_basics.training.distributed import Dist

LENGTH_NORMALIZATIONS = ("masked_mean", "masked_normalize")


@dataclass
class GRPOConfig(EvalSettings):
    """Every field is a `cs336-align grpo` flag; the defaults are the handout's GRPO experiment."""

    n_grpo_steps: int = bounded(200, ge=1)
    learning_rate: float = bounded(1e-5, gt=0)
    advantage_eps: float = bounded(1e-6, ge=0)
    rollout_batch_size: int = bounded(256, ge=1)
    group_size: int = bounded(8, ge=1)
    sampling_temperature: float = bounded(1.0, ge=0)
    sampling_min_tokens: int = bounded(4, ge=0)  # as in EI: no empty responses
    sampling_max_tokens: int = bounded(1024, ge=1)
    epochs_per_rollout_batch: int = bounded(1, ge=1)  # 1 is on-policy
    train_batch_size: int = bounded(256, ge=1)  # on-policy: one optimizer step per rollout batch
    gradient_accumulation_steps: int = bounded(128, ge=1)  # micro-batch 2
    gpu_memory_utilization: float = bounded(0.85, gt=0, le=1)  # vLLM only
    loss_type: str = "reinforce_with_baseline"
    use_std_normalization: bool = True
    cliprange: float = bounded(0.2, ge=0)
    length_normalization: str = "masked_mean"  # or masked_normalize (Dr. GRPO: sum / sampling_max_tokens)
    max_grad_norm: float = bounded(1.0, ge=0)  # 0: no clipping (clip_and_step)
    skip_steps_without_signal: bool = True  # a train batch whose every advantage is 0 has gradient exactly 0; an
    # Adam step on it would only replay momentum (seen driving a collapsed run further: results/a5_lr_sweep.md)
    warmup_steps: int = bounded(0, ge=0)  # linear LR warm-up over this many optimizer steps (a fresh Adam's
    # first steps are sign steps of the full lr on every weight, however noisy its gradient); 0 = the handout's
    # constant lr
    weight_decay: float = bounded(0.0, ge=0)
    adam_beta1: float = bounded(0.9, ge=0, lt=1)
    adam_beta2: float = bounded(0.95, ge=0, lt=1)
    precision: str = "fp32"
    backend: str = "auto"  # vllm when installed with a GPU and an HF model path (weights pushed each step); else native
    rollout_device: str | None = None  # e.g. cuda:1: the rollout engine's own device, weights pushed every step
    generation_batch_size: int = bounded(256, ge=1)  # native backend rows per decoding batch
    stop: tuple[str, ...] = ("</answer>",)
    checkpoint_every: int = bounded(0, ge=0)
    seed: int = bounded(0, ge=0)
    time_budget_s: float | None = bounded(None, gt=0)

    def validate(self) -> None:
        check_ranges(self)  # again: fields may have been changed since construction
        if self.warmup_steps < 0:
            raise UserError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.loss_type not in LOSS_TYPES:
            raise UserError(f"unknown loss_type {self.loss_type!r}; expected one of {LOSS_TYPES}")
        if self.length_normalization not in LENGTH_NORMALIZATIONS:
            raise UserError(f"unknown length_normalization {self.length_normalization!r}; expected one of "
                             f"{LENGTH_NORMALIZATIONS}")
        if self.backend not in ("auto", "native", "vllm"):
            raise UserError(f"backend must be 'auto', 'native' or 'vllm', got {self.backend!r}")
        check_divides("group_size", self.group_size, "rollout_batch_size", self.rollout_batch_size)
        check_divides("gradient_accumulation_steps", self.gradient_accumulation_steps, "train_batch_size",
                      self.train_batch_size)
        check_divides("train_batch_size", self.train_batch_size, "rollout_batch_size", self.rollout_batch_size)
        if self.train_batch_size < self.group_size:
            raise UserError(f"train_batch_size ({self.train_batch_size}) must be >= group_size ({self.group_size})")
        off_policy = self.epochs_per_rollout_batch > 1 or self.train_batch_size < self.rollout_batch_size
        if off_policy and self.loss_type in ("no_baseline", "reinforce_with_baseline"):
            raise UserError(f"off-policy training (several optimizer steps per rollout batch) needs an importance-"
                             f"weighted loss (grpo_clip, grpo_no_clip or gspo), not {self.loss_type}")
        if self.loss_type == "gspo" and self.length_normalization != "masked_mean":
            raise UserError("--loss-type gspo is sequence-level: it needs --length-normalization masked_mean")

    @property
    def needs_old_log_probs(self) -> bool:
        return self.loss_type in IMPORTANCE_WEIGHTED

    def rollout_params(self, seed: int) -> SamplingParams:
        return SamplingParams(temperature=self.sampling_temperature, max_tokens=self.sampling_max_tokens,
                              min_tokens=self.sampling_min_tokens, stop=self.stop, include_stop_str_in_output=True,
                              seed=seed)


@torch.no_grad()
def old_log_probs(policy: nn.Module, batch: dict[str, torch.Tensor], micro: int, precision: str,
                  rows: range | None = None) -> torch.Tensor:
    """log pi_old of every label (or of `rows`), computed once per rollout batch before any update (in
    micro-batches)."""
    device = model_device(policy)
    parts = []
    rows = rows if rows is not None else range(batch["input_ids"].shape[0])
    for start in range(rows.start, rows.stop, micro):
        stop = min(start + micro, rows.stop)
        with autocast(device, precision):
            out = get_response_log_probs(policy, batch["input_ids"][start:stop].to(device),
                                         batch["labels"][start:stop].to(device))
        parts.append(out["log_probs"].float())
    return torch.cat(parts)


def grpo_train_on_rollouts(
    policy: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, torch.Tensor],
    advantages: torch.Tensor,
    raw_rewards: torch.Tensor,
    config: GRPOConfig,
    seed: int,
    steps_before: int = 0,
    dist: Dist | None = None,
) -> list[dict[str, float]]:
    """`epochs_per_rollout_batch` passes over one rollout batch in train batches of `train_batch_size`, each an
    optimizer step accumulated over micro-batches; returns one metrics dict per optimizer step.

    `steps_before` counts the optimizer steps already taken (it places these steps on the LR warm-up). With a
    data-parallel `dist`, `policy` is the DDP-wrapped policy, every rank holds the whole rollout batch and
    trains on its share of each train batch; old log-probs are computed by shares and gathered."""
    dist = dist or single_process()
    device = model_device(policy)
    n = batch["input_ids"].shape[0]
    micro = config.train_batch_size // config.gradient_accumulation_steps
    old = None
    if config.needs_old_log_probs:
        old = gather_rows(dist, n, lambda a, b: old_log_probs(policy, batch, micro, config.precision, range(a, b)))
    constant = config.sampling_max_tokens if config.length_normalization == "masked_normalize" else None
    steps_per_epoch = n // config.train_batch_size
    out: list[dict[str, float]] = []
    policy.train()
    for update in range(config.epochs_per_rollout_batch * steps_per_epoch):
        # Shuffled per epoch (seeded) when the rollout batch spans several optimizer steps.
        rows = epoch_order(n, update, config.train_batch_size, seed) if steps_per_epoch > 1 or \
            config.epochs_per_rollout_batch > 1 else list(range(n))
        lr = warmup_lr(config.learning_rate, steps_before + update, config.warmup_steps)
        set_lr(optimizer, lr)
        totals = {"loss": 0.0, "token_entropy": 0.0, "clip_fraction": 0.0, "ratio_mean": 0.0}
        local, accumulation = shard(rows[: config.train_batch_size], config.gradient_accumulation_steps, dist)
        for start in range(0, len(local), micro):
            idx = torch.tensor(local[start : start + micro])
            mask = batch["response_mask"][idx].to(device)
            with micro_step(policy, last=start + micro >= len(local)):
                with autocast(device, config.precision):
                    result = get_response_log_probs(policy, batch["input_ids"][idx].to(device),
                                                    batch["labels"][idx].to(device), True)
                loss, meta = grpo_microbatch_train_step(
                    result["log_probs"], mask, accumulation, config.loss_type,
                    raw_rewards=raw_rewards[idx].unsqueeze(-1).to(device),
                    advantages=advantages[idx].unsqueeze(-1).to(device),
                    old_log_probs=None if old is None else old[idx.to(old.device)],
                    cliprange=config.cliprange, normalize_constant=constant,
                )
            share = 1.0 / accumulation
            totals["loss"] += float(loss)
            totals["token_entropy"] += float(masked_mean(result["token_entropy"].detach(), mask)) * share
            totals["clip_fraction"] += float(meta.get("clip_fraction", 0.0)) * share
            totals["ratio_mean"] += float(meta.get("ratio_mean", 1.0)) * share
        totals = {**reduce_metrics(dist, totals), "lr": lr}
        weights = raw_rewards if config.loss_type == "no_baseline" else advantages
        if config.skip_steps_without_signal and not bool((weights[rows] != 0).any()):
            optimizer.zero_grad(set_to_none=True)
            totals["grad_norm"], totals["skipped_step"] = 0.0, 1.0
        else:
            totals["grad_norm"], totals["skipped_step"] = clip_and_step(policy, optimizer, config.max_grad_norm), 0.0
        out.append(totals)
    return out


def resolve_backend(kind: str, model_path: str | None) -> str:
    """"auto" means vLLM where it can run (installed, a GPU, a Hugging Face model directory), else native."""
    if kind != "auto":
        return kind
    import importlib.util

    usable = model_path is not None and torch.cuda.is_available() and importlib.util.find_spec("vllm") is not None
    return "vllm" if usable else "native"


def _vllm_backend(config: GRPOConfig, model_path: str | None) -> GenerationBackend:
    from cs336_alignment.generation import make_backend

    if not model_path:
        raise UserError("--backend vllm needs the policy's Hugging Face directory (--model)")
    import contextlib
    from unittest import mock

    import torch.distributed

    device = {"device": config.rollout_device} if config.rollout_device else {}
    # Rank 0 of a torchrun job builds a one-GPU engine: vLLM must not take the job's world size for its own (the
    # handout's init_vllm patches it the same way). Not yet run on a GPU.
    one_gpu = mock.patch("torch.distributed.get_world_size", return_value=1) if torch.distributed.is_initialized() \
        else contextlib.nullcontext()
    with one_gpu:
        return make_backend("vllm", model_path, gpu_memory_utilization=config.gpu_memory_utilization,
                            seed=config.seed, **device)


def run_grpo(
    policy: nn.Module,
    tokenizer: Any,
    train_questions: QuestionSet,
    config: GRPOConfig,
    eval_questions: QuestionSet | None = None,
    out_dir: str | None = None,
    resume: bool = False,
    reward_fn: RewardFn = r1_zero_reward,
    backend: GenerationBackend | None = None,
    model_path: str | None = None,
    overwrite: bool = False,
    stop: StopRequest | None = None,
    dist: Dist | None = None,
) -> list[dict[str, Any]]:
    """`n_grpo_steps` rollout batches: sample groups, score, normalise, train; log and checkpoint.

    Rollouts go through the generation interface: the native backend samples from the live policy; an engine
    with its own weights (vLLM, or the native `RolloutEngine` on `rollout_device`) gets the policy's weights
    pushed (`load_policy_weights`) at the start and after every step's optimizer updates. With a
    data-parallel `dist` every rank calls this; rank 0 alone holds the engine, samples, evaluates and writes.
    """
    config.validate()
    if not len(train_questions):
        raise UserError("GRPO needs at least one training question")
    dist = dist or single_process()
    run_dir = RunDir(out_dir, config, resume, overwrite, writer=dist.is_main)
    optimizer = make_adamw(policy, config.learning_rate, config.weight_decay, config.adam_beta1, config.adam_beta2)
    start = run_dir.resume(policy, optimizer)[0] if resume else 0
    trained = train_module(policy, dist)
    kind = resolve_backend(config.backend, model_path)
    if backend is None and dist.is_main:
        if kind == "vllm":
            backend = _vllm_backend(config, model_path)
        elif config.rollout_device is not None:
            backend = RolloutEngine(policy, tokenizer, config.rollout_device, config.generation_batch_size)
        else:
            backend = native_backend(policy, tokenizer, config.generation_batch_size)
    own_weights = kind == "vllm" or isinstance(backend, RolloutEngine)
    eval_backend = backend if own_weights else native_backend(policy, tokenizer, config.generation_batch_size)
    deadline = Deadline(config.time_budget_s)
    questions_per_step = config.rollout_batch_size // config.group_size
    history: list[dict[str, Any]] = []

    def push() -> None:
        if dist.is_main and hasattr(backend, "load_policy_weights"):
            backend.load_policy_weights(policy)

    def evaluate(step: int) -> None:
        if eval_questions is not None and len(eval_questions) and dist.is_main:
            summary = run_eval(step, config, eval_backend, policy, tokenizer, eval_questions, reward_fn, run_dir,
                               config.stop)
            history.append({"step": step, "kind": "eval", **summary})

    push()
    if start == 0:
        evaluate(0)
    step = start
    for step in tqdm(range(start, config.n_grpo_steps), desc="grpo", initial=start, total=config.n_grpo_steps,
                     leave=False, disable=not dist.is_main):
        if agree_to_stop(dist, deadline.passed(), RunDir.stopped(stop)):
            break
        record = grpo_step(trained, optimizer, tokenizer, backend, train_questions, config, step, questions_per_step,
                           reward_fn, dist)
        push()
        record_step(run_dir, history, record, policy, optimizer, step + 1, config.n_grpo_steps, config.checkpoint_every,
                    config.eval_every, evaluate)
        step += 1
    finish_run(run_dir, policy, optimizer, step, stop, evaluate)
    return history


def rollout_training_batch(rollouts: RolloutBatch, tokenizer: Any) -> dict[str, torch.Tensor]:
    """Prompt + response token ids, labels and response mask to train on: each response as the tokens the
    backend sampled (so log-probs, ratios and gradients are those of the sampled actions), re-encoded from its
    text only where the backend gave no ids that decode to it."""
    ids = rollouts.response_token_ids or [None] * len(rollouts.responses)
    return tokenize_prompt_and_sampled_output(rollouts.prompts, rollouts.responses, ids, tokenizer)


def grpo_step(
    policy: nn.Module,
    optimizer: torch.optim.Optimizer,
    tokenizer: Any,
    backend: GenerationBackend,
    train_questions: QuestionSet,
    config: GRPOConfig,
    step: int,
    questions_per_step: int,
    reward_fn: RewardFn,
    dist: Dist | None = None,
) -> dict[str, Any]:
    """One rollout batch and its optimizer step(s); every random choice is seeded by (seed, step).

    The backend must hold the policy's current weights (`run_grpo` pushes them after every step). With a
    data-parallel `dist`, rank 0 samples and grades, every rank gets the batch and trains on its share."""
    dist = dist or single_process()
    rows = epoch_order(len(train_questions), step, questions_per_step, config.seed)
    prompts: Sequence[str] = [train_questions.prompts[i] for i in rows]
    truths: Sequence[str] = [train_questions.truths[i] for i in rows]

    def sample_and_grade() -> tuple[RolloutBatch, float, torch.Tensor, torch.Tensor, dict[str, Any]]:
        started = time.perf_counter()
        rollouts = sample_rollouts(backend, prompts, truths, config.group_size,
                                   config.rollout_params(config.seed * 7919 + step))
        seconds = time.perf_counter() - started
        advantages, raw, meta = compute_group_normalized_rewards(
            reward_fn, rollouts.responses, rollouts.ground_truths, config.group_size, config.advantage_eps,
            config.use_std_normalization)
        return rollouts, seconds, advantages, raw, meta

    rollouts, rollout_seconds, advantages, raw, reward_meta = from_rank_0(dist, sample_and_grade)
    batch = rollout_training_batch(rollouts, tokenizer)
    lengths = batch["response_mask"].sum(dim=-1).float()
    updates_per_batch = config.epochs_per_rollout_batch * (config.rollout_batch_size // config.train_batch_size)
    updates = grpo_train_on_rollouts(policy, optimizer, batch, advantages, raw, config, config.seed * 104729 + step,
                                     steps_before=step * updates_per_batch, dist=dist)
    generated = int(lengths.sum())
    record: dict[str, Any] = {
        "step": step + 1,
        "kind": "train",
        **reward_meta,
        "response_length": float(lengths.mean()),
        # Rows trained on the sampled token ids, and among all rows those whose text re-encodes differently.
        "sampled_ids_fraction": float(batch["sampled"].float().mean()),
        "noncanonical_fraction": float(batch["noncanonical"].float().mean()),
        "rollout_seconds": rollout_seconds,
        "rollout_tokens_per_s": generated / rollout_seconds if rollout_seconds > 0 else None,
        "optimizer_steps": len(updates),
    }
    for key in updates[0]:
        record[key] = sum(u[key] for u in updates) / len(updates)
    record["grad_norm_last"] = updates[-1]["grad_norm"]
    return record
