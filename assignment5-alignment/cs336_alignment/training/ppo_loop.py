"""PPO in the InstructGPT style: rollouts from the live policy, a score per response (the rule reward or a
trained reward model), a KL penalty to a frozen reference in the per-token reward, GAE(λ) advantages from a
value head on the policy's final hidden states, and several epochs of clipped policy + clipped value updates
per rollout batch.

Rollouts, evaluation, checkpoints, seeded data order and the optimizer step are the GRPO loop's and
`training.common`'s; the losses are the pure functions of `cs336_alignment.ppo`.
"""

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from cs336_alignment.generation import GenerationBackend, SamplingParams
from cs336_alignment.lm import model_device
from cs336_alignment.logprobs import compute_entropy, label_log_probs
from cs336_alignment.masked import masked_mean
from cs336_alignment.peft import has_lora, lora_disabled
from cs336_alignment.ppo import gae_advantages, kl_penalized_rewards, ppo_policy_loss, ppo_value_loss, whiten
from cs336_alignment.reward import r1_zero_reward
from cs336_alignment.reward_model import RewardModel, ValueHead, forward_with_hidden, hidden_size, score_texts
from cs336_alignment.rollouts import sample_rollouts
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
    make_adamw,
    native_backend,
    record_step,
    set_lr,
    warmup_lr,
)
from cs336_alignment.training.dpo_loop import frozen_reference
from cs336_alignment.training.eval_config import EvalSettings, QuestionSet, run_eval
from cs336_alignment.training.grpo_loop import _vllm_backend, resolve_backend, rollout_training_batch
from cs336_basics.cli_support import StopRequest, UserError, bounded, check_ranges

REWARDS = ("rule", "model")


@dataclass
class PPOConfig(EvalSettings):
    """Every field is a `cs336-align ppo` flag. KL coefficient, λ, clip ranges and value coefficient follow
    common RLHF practice (InstructGPT, TRL); sizes follow the GRPO loop's conventions."""

    n_ppo_steps: int = bounded(100, ge=1)
    learning_rate: float = bounded(1e-5, gt=0)
    rollout_batch_size: int = bounded(64, ge=1)  # responses per rollout batch
    samples_per_prompt: int = bounded(1, ge=1)
    sampling_temperature: float = bounded(1.0, ge=0)
    sampling_min_tokens: int = bounded(4, ge=0)
    sampling_max_tokens: int = bounded(1024, ge=1)
    ppo_epochs: int = bounded(4, ge=1)  # passes over each rollout batch
    train_batch_size: int = bounded(32, ge=1)  # responses per optimizer step
    gradient_accumulation_steps: int = bounded(16, ge=1)
    cliprange: float = bounded(0.2, ge=0)
    cliprange_value: float = bounded(0.2, ge=0)
    vf_coef: float = bounded(0.1, ge=0)
    gamma: float = bounded(1.0, ge=0, le=1)
    lam: float = bounded(0.95, ge=0, le=1)
    kl_coef: float = bounded(0.05, ge=0)
    whiten_advantages: bool = True
    reward: str = "rule"  # or "model": a trained reward model scores each response
    max_grad_norm: float = bounded(1.0, ge=0)
    warmup_steps: int = bounded(0, ge=0)
    weight_decay: float = bounded(0.0, ge=0)
    adam_beta1: float = bounded(0.9, ge=0, lt=1)
    adam_beta2: float = bounded(0.95, ge=0, lt=1)
    precision: str = "fp32"
    backend: str = "auto"
    gpu_memory_utilization: float = bounded(0.85, gt=0, le=1)
    generation_batch_size: int = bounded(64, ge=1)
    stop: tuple[str, ...] = ("</answer>",)
    checkpoint_every: int = bounded(0, ge=0)
    seed: int = bounded(0, ge=0)
    time_budget_s: float | None = bounded(None, gt=0)

    def validate(self) -> None:
        check_ranges(self)
        if self.reward not in REWARDS:
            raise UserError(f"--reward must be one of {REWARDS}, got {self.reward!r}")
        if self.backend not in ("auto", "native", "vllm"):
            raise UserError(f"backend must be 'auto', 'native' or 'vllm', got {self.backend!r}")
        check_divides("samples_per_prompt", self.samples_per_prompt, "rollout_batch_size", self.rollout_batch_size)
        check_divides("gradient_accumulation_steps", self.gradient_accumulation_steps, "train_batch_size",
                      self.train_batch_size)
        check_divides("train_batch_size", self.train_batch_size, "rollout_batch_size", self.rollout_batch_size)

    def rollout_params(self, seed: int) -> SamplingParams:
        return SamplingParams(temperature=self.sampling_temperature, max_tokens=self.sampling_max_tokens,
                              min_tokens=self.sampling_min_tokens, stop=self.stop, include_stop_str_in_output=True,
                              seed=seed)


def _policy_outputs(policy: nn.Module, value_head: ValueHead | None, input_ids: Tensor, labels: Tensor
                    ) -> tuple[Tensor, Tensor | None, Tensor]:
    """(log π of each label, value of each position or None, logits)."""
    if value_head is None:
        logits = policy(input_ids).logits
        return label_log_probs(logits, labels), None, logits
    logits, hidden = forward_with_hidden(policy, input_ids)
    return label_log_probs(logits, labels), value_head(hidden), logits


@torch.no_grad()
def score_rollout_batch(
    policy: nn.Module, value_head: ValueHead, reference: nn.Module | None, batch: dict[str, Tensor], micro: int,
    precision: str,
) -> dict[str, Tensor]:
    """log π_old, V_old and log π_ref of every label, before any update (the reference is the policy with its
    adapters switched off when `reference` is None), in eval mode: no dropout noise in the old log-probs. Returned
    on the host, beside the rest of the rollout batch (training moves each micro-batch to the device)."""
    device = model_device(policy)
    was_training = policy.training
    policy.eval()
    parts: dict[str, list[Tensor]] = {"old_log_probs": [], "old_values": [], "ref_log_probs": []}
    for start in range(0, batch["input_ids"].shape[0], micro):
        ids = batch["input_ids"][start : start + micro].to(device)
        labels = batch["labels"][start : start + micro].to(device)
        with autocast(device, precision):
            logp, values, _ = _policy_outputs(policy, value_head, ids, labels)
            if reference is None:
                with lora_disabled(policy):
                    ref = _policy_outputs(policy, None, ids, labels)[0]
            else:
                ref_device = model_device(reference)
                ref = _policy_outputs(reference, None, ids.to(ref_device), labels.to(ref_device))[0].to(device)
        parts["old_log_probs"].append(logp.float())
        parts["old_values"].append(values.float())
        parts["ref_log_probs"].append(ref.float())
    policy.train(was_training)
    return {key: torch.cat(value).cpu() for key, value in parts.items()}


def ppo_train_on_rollouts(
    policy: nn.Module,
    value_head: ValueHead,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, Tensor],
    config: PPOConfig,
    seed: int,
    steps_before: int = 0,
) -> list[dict[str, float]]:
    """`ppo_epochs` seeded-shuffled passes over a scored rollout batch (`batch` holds input_ids, labels,
    response_mask, old_log_probs, old_values, advantages, returns); one optimizer step per train batch, each
    accumulated over micro-batches of the token-mean loss pg + vf_coef · vf. Returns one record per step."""
    device = model_device(policy)
    trainable = nn.ModuleList([policy, value_head])
    n = batch["input_ids"].shape[0]
    micro = config.train_batch_size // config.gradient_accumulation_steps
    steps_per_epoch = n // config.train_batch_size
    share = 1.0 / config.gradient_accumulation_steps
    out: list[dict[str, float]] = []
    policy.train()
    for update in range(config.ppo_epochs * steps_per_epoch):
        rows = epoch_order(n, update, config.train_batch_size, seed)
        lr = warmup_lr(config.learning_rate, steps_before + update, config.warmup_steps)
        set_lr(optimizer, lr)
        totals = {key: 0.0 for key in ("pg_loss", "vf_loss", "clip_fraction", "value_clip_fraction", "approx_kl",
                                       "ratio_mean", "token_entropy")}
        for start in range(0, config.train_batch_size, micro):
            idx = torch.tensor(rows[start : start + micro])
            mask = batch["response_mask"][idx].to(device)
            if not bool(mask.any()):
                continue
            take = {key: batch[key][idx].to(device) for key in ("old_log_probs", "old_values", "advantages",
                                                                 "returns")}
            with autocast(device, config.precision):
                logp, values, logits = _policy_outputs(policy, value_head, batch["input_ids"][idx].to(device),
                                                       batch["labels"][idx].to(device))
            pg, pg_meta = ppo_policy_loss(logp.float(), take["old_log_probs"], take["advantages"], config.cliprange)
            vf, vf_meta = ppo_value_loss(values.float(), take["old_values"], take["returns"], config.cliprange_value)
            pg_loss, vf_loss = masked_mean(pg, mask), masked_mean(vf, mask)
            ((pg_loss + config.vf_coef * vf_loss) * share).backward()
            with torch.no_grad():
                totals["pg_loss"] += float(pg_loss) * share
                totals["vf_loss"] += float(vf_loss) * share
                totals["clip_fraction"] += float(masked_mean(pg_meta["clipped"].float(), mask)) * share
                totals["value_clip_fraction"] += float(masked_mean(vf_meta["clipped"].float(), mask)) * share
                totals["approx_kl"] += float(masked_mean(take["old_log_probs"] - logp.float(), mask)) * share
                totals["ratio_mean"] += float(masked_mean(pg_meta["ratio"], mask)) * share
                totals["token_entropy"] += float(masked_mean(compute_entropy(logits.detach()), mask)) * share
        totals["grad_norm"] = clip_and_step(trainable, optimizer, config.max_grad_norm)
        totals["lr"] = lr
        out.append(totals)
    return out


def run_ppo(
    policy: nn.Module,
    tokenizer: Any,
    train_questions: QuestionSet,
    config: PPOConfig,
    eval_questions: QuestionSet | None = None,
    out_dir: str | None = None,
    resume: bool = False,
    reward_fn: RewardFn = r1_zero_reward,
    reward_model: RewardModel | None = None,
    reward_tokenizer: Any = None,
    value_head: ValueHead | None = None,
    reference: nn.Module | None = None,
    backend: GenerationBackend | None = None,
    model_path: str | None = None,
    overwrite: bool = False,
    stop: StopRequest | None = None,
) -> list[dict[str, Any]]:
    """`n_ppo_steps` rollout batches: sample, score (`reward_fn` or `reward_model`), penalise KL to the reference,
    GAE, `ppo_epochs` of clipped updates; log, evaluate (held-out `reward_fn`), checkpoint (the policy as in
    every loop, the value head beside it in the checkpoint's extra state; `resume` continues exactly). The
    reward model reads the texts with `reward_tokenizer` (default: the policy's tokenizer).

    The reference defaults to a frozen copy of the starting policy, or, for a policy with LoRA adapters, to the
    same model with its adapters switched off (no second copy)."""
    config.validate()
    if not len(train_questions):
        raise UserError("PPO needs at least one training question")
    if config.reward == "model" and reward_model is None:
        raise UserError("--reward model needs a trained reward model (--reward-model DIR)")
    if value_head is None:
        value_head = ValueHead(hidden_size(policy), device=model_device(policy))
    if reference is None and not has_lora(policy):
        reference = frozen_reference(policy)
    if reward_model is not None:
        reward_model.eval().requires_grad_(False)
    run_dir = RunDir(out_dir, config, resume, overwrite)
    optimizer = make_adamw(nn.ModuleList([policy, value_head]), config.learning_rate, config.weight_decay,
                           config.adam_beta1, config.adam_beta2)
    start = 0
    if resume:
        start, extra = run_dir.resume(policy, optimizer)
        if "value_head" not in extra:
            raise UserError(f"cannot resume: {run_dir.checkpoint_path} holds no PPO value head")
        value_head.load_state_dict(extra["value_head"])
    kind = resolve_backend(config.backend, model_path)
    if backend is None:
        backend = _vllm_backend(config, model_path) if kind == "vllm" else \
            native_backend(policy, tokenizer, config.generation_batch_size)
    eval_backend = backend if kind == "vllm" else native_backend(policy, tokenizer, config.generation_batch_size)
    deadline = Deadline(config.time_budget_s)
    history: list[dict[str, Any]] = []

    def evaluate(step: int) -> None:
        if eval_questions is not None and len(eval_questions):
            if hasattr(eval_backend, "load_policy_weights"):
                eval_backend.load_policy_weights(policy)
            summary = run_eval(step, config, eval_backend, policy, tokenizer, eval_questions, reward_fn, run_dir,
                               config.stop)
            history.append({"step": step, "kind": "eval", **summary})

    def save(step: int) -> None:
        run_dir.save(policy, optimizer, step, extra={"value_head": value_head.state_dict()})

    if start == 0:
        evaluate(0)
    step = start
    for step in tqdm(range(start, config.n_ppo_steps), desc="ppo", initial=start, total=config.n_ppo_steps,
                     leave=False):
        if deadline.passed() or RunDir.stopped(stop):
            break
        record = ppo_step(policy, value_head, reference, reward_model, optimizer, tokenizer, backend, train_questions,
                          config, step, reward_fn, reward_tokenizer)
        record_step(run_dir, history, record, policy, optimizer, step + 1, config.n_ppo_steps, None,
                    config.eval_every, evaluate)
        if config.checkpoint_every and (step + 1) % config.checkpoint_every == 0:
            save(step + 1)
        step += 1
    save(step)
    if RunDir.stopped(stop):
        announce_stop(run_dir, stop, step)
    else:
        evaluate(step)
    return history


def _scores(config: PPOConfig, reward_model: RewardModel | None, tokenizer: Any, prompts: Sequence[str],
            responses: Sequence[str], rule: Sequence[dict[str, float]]) -> Tensor:
    if config.reward == "rule":
        return torch.tensor([float(s["reward"]) for s in rule])
    with torch.no_grad():
        parts = [score_texts(reward_model, tokenizer, [prompts[i] for i in idx], [responses[i] for i in idx])
                 for idx in chunks(range(len(prompts)), config.generation_batch_size)]
    return torch.cat(parts).float().cpu()


def ppo_step(
    policy: nn.Module,
    value_head: ValueHead,
    reference: nn.Module | None,
    reward_model: RewardModel | None,
    optimizer: torch.optim.Optimizer,
    tokenizer: Any,
    backend: GenerationBackend,
    train_questions: QuestionSet,
    config: PPOConfig,
    step: int,
    reward_fn: RewardFn,
    reward_tokenizer: Any = None,
) -> dict[str, Any]:
    """One rollout batch and its `ppo_epochs` of updates; every random choice is seeded by (seed, step)."""
    prompts_per_step = config.rollout_batch_size // config.samples_per_prompt
    rows = epoch_order(len(train_questions), step, prompts_per_step, config.seed)
    if hasattr(backend, "load_policy_weights"):
        backend.load_policy_weights(policy)
    started = time.perf_counter()
    rollouts = sample_rollouts(backend, [train_questions.prompts[i] for i in rows],
                               [train_questions.truths[i] for i in rows], config.samples_per_prompt,
                               config.rollout_params(config.seed * 7919 + step))
    rollout_seconds = time.perf_counter() - started
    rule = [reward_fn(r, g) for r, g in zip(rollouts.responses, rollouts.ground_truths, strict=True)]
    scores = _scores(config, reward_model, reward_tokenizer or tokenizer, rollouts.prompts, rollouts.responses, rule)
    batch = rollout_training_batch(rollouts, tokenizer)
    mask = batch["response_mask"]
    micro = config.train_batch_size // config.gradient_accumulation_steps
    batch.update(score_rollout_batch(policy, value_head, reference, batch, micro, config.precision))
    rewards, kl = kl_penalized_rewards(scores, batch["old_log_probs"], batch["ref_log_probs"], mask, config.kl_coef)
    advantages, returns = gae_advantages(rewards, batch["old_values"], mask, config.gamma, config.lam)
    batch["advantages"] = whiten(advantages, mask) if config.whiten_advantages else advantages
    batch["returns"] = returns
    updates_per_batch = config.ppo_epochs * (config.rollout_batch_size // config.train_batch_size)
    updates = ppo_train_on_rollouts(policy, value_head, optimizer, batch, config, config.seed * 104729 + step,
                                    steps_before=step * updates_per_batch)
    lengths = mask.sum(dim=-1).float()
    record: dict[str, Any] = {
        "step": step + 1,
        "kind": "train",
        "score_mean": float(scores.mean()),
        "reward_mean": sum(float(s["reward"]) for s in rule) / len(rule),
        "kl": float(kl.sum(dim=-1).mean()),
        "value_mean": float(masked_mean(batch["old_values"], mask)),
        "return_mean": float(masked_mean(returns, mask)),
        "response_length": float(lengths.mean()),
        "rollout_seconds": rollout_seconds,
        "optimizer_steps": len(updates),
    }
    for key in ("format_reward", "answer_reward"):
        if all(key in s for s in rule):
            record[f"{key}_mean"] = sum(float(s[key]) for s in rule) / len(rule)
    for key in updates[0]:
        record[key] = sum(u[key] for u in updates) / len(updates)
    return record
