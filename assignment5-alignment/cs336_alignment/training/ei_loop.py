"""Expert iteration: sample G responses per question, keep the correct ones, SFT on them, repeat."""

from dataclasses import dataclass
from typing import Any

from torch import nn
from tqdm import tqdm

from cs336_alignment.generation import SamplingParams
from cs336_alignment.reward import r1_zero_reward
from cs336_alignment.rollouts import sample_rollouts
from cs336_alignment.training.common import (
    Deadline,
    RewardFn,
    RunDir,
    check_divides,
    epoch_order,
    finish_run,
    make_adamw,
    native_backend,
    record_step,
    set_lr,
)
from cs336_alignment.training.eval_config import EvalSettings, QuestionSet, run_eval
from cs336_alignment.training.parallel import RolloutEngine, agree_to_stop, from_rank_0, single_process, train_module
from cs336_alignment.training.sft_loop import sft_update
from cs336_basics.cli_support import StopRequest, bounded, check_ranges
from cs336_basics.training.distributed import Dist


@dataclass
class EIConfig(EvalSettings):
    """The handout's EI: `n_ei_steps` rounds over `ei_batch_size` questions with G rollouts each."""

    n_ei_steps: int = bounded(5, ge=1)
    ei_batch_size: int = bounded(512, ge=1)  # questions per round
    rollouts_per_question: int = bounded(4, ge=1)  # G
    sampling_temperature: float = bounded(1.0, ge=0)
    sampling_min_tokens: int = bounded(4, ge=0)
    sampling_max_tokens: int = bounded(1024, ge=1)
    sft_epochs: int = bounded(1, ge=1)  # passes over each round's correct responses
    learning_rate: float = bounded(1e-5, gt=0)
    train_batch_size: int = bounded(32, ge=1)
    gradient_accumulation_steps: int = bounded(16, ge=1)
    max_grad_norm: float = bounded(1.0, ge=0)  # 0: no clipping (clip_and_step)
    weight_decay: float = bounded(0.0, ge=0)
    adam_beta1: float = bounded(0.9, ge=0, lt=1)
    adam_beta2: float = bounded(0.95, ge=0, lt=1)
    precision: str = "fp32"
    generation_batch_size: int = bounded(64, ge=1)
    rollout_device: str | None = None  # e.g. cuda:1: a copy of the policy samples there, weights pushed every round
    stop: tuple[str, ...] = ("</answer>",)
    seed: int = bounded(0, ge=0)
    time_budget_s: float | None = bounded(None, gt=0)

    def validate(self) -> None:
        check_ranges(self)  # again: fields may have been changed since construction
        check_divides("gradient_accumulation_steps", self.gradient_accumulation_steps, "train_batch_size",
                      self.train_batch_size)


def run_expert_iteration(
    policy: nn.Module,
    tokenizer: Any,
    train_questions: QuestionSet,
    config: EIConfig,
    eval_questions: QuestionSet | None = None,
    out_dir: str | None = None,
    resume: bool = False,
    reward_fn: RewardFn = r1_zero_reward,
    overwrite: bool = False,
    stop: StopRequest | None = None,
    dist: Dist | None = None,
) -> list[dict[str, Any]]:
    """Rounds of (sample, filter by reward == 1, deduplicate, SFT); checkpoints after every round.

    With `rollout_device` a copy of the policy there samples (weights pushed after every round's SFT steps).
    With a data-parallel `dist` every rank calls this; rank 0 samples and grades, the kept examples go to every
    rank and the SFT steps run data-parallel (a short round's batch rounded down to a multiple of the ranks)."""
    config.validate()
    dist = dist or single_process()
    run_dir = RunDir(out_dir, config, resume, overwrite, writer=dist.is_main)
    optimizer = make_adamw(policy, config.learning_rate, config.weight_decay, config.adam_beta1, config.adam_beta2)
    set_lr(optimizer, config.learning_rate)
    start = run_dir.resume(policy, optimizer)[0] if resume else 0
    trained = train_module(policy, dist)
    backend = None
    if dist.is_main:
        backend = native_backend(policy, tokenizer, config.generation_batch_size) if config.rollout_device is None \
            else RolloutEngine(policy, tokenizer, config.rollout_device, config.generation_batch_size)
    deadline = Deadline(config.time_budget_s)
    history: list[dict[str, Any]] = []
    per_round = min(config.ei_batch_size, len(train_questions))

    def push() -> None:
        if isinstance(backend, RolloutEngine):
            backend.load_policy_weights(policy)

    def evaluate(round_: int) -> None:
        if eval_questions is not None and len(eval_questions) and dist.is_main:
            summary = run_eval(round_, config, backend, policy, tokenizer, eval_questions, reward_fn, run_dir,
                               config.stop)
            history.append({"step": round_, "kind": "eval", **summary})

    push()
    if start == 0:
        evaluate(0)
    round_ = start
    for round_ in tqdm(range(start, config.n_ei_steps), desc="ei", initial=start, total=config.n_ei_steps,
                       leave=False, disable=not dist.is_main):
        if agree_to_stop(dist, deadline.passed(), RunDir.stopped(stop)):
            break
        rows = epoch_order(len(train_questions), round_, per_round, config.seed)
        params = SamplingParams(temperature=config.sampling_temperature, max_tokens=config.sampling_max_tokens,
                                min_tokens=config.sampling_min_tokens, stop=config.stop,
                                include_stop_str_in_output=True, seed=config.seed * 7919 + round_)

        def sample_and_filter(rows=rows, params=params) -> tuple[int, list[dict[str, str]]]:
            rollouts = sample_rollouts(backend, [train_questions.prompts[i] for i in rows],
                                       [train_questions.truths[i] for i in rows], config.rollouts_per_question,
                                       params)
            kept: dict[tuple[str, str], None] = {}
            for prompt, response, truth in zip(rollouts.prompts, rollouts.responses, rollouts.ground_truths,
                                               strict=True):
                if reward_fn(response, truth)["reward"] >= 1.0:
                    kept.setdefault((prompt, response))
            return len(rollouts.responses), [{"prompt": p, "response": r} for p, r in kept]

        sampled, examples = from_rank_0(dist, sample_and_filter)
        record: dict[str, Any] = {"step": round_ + 1, "kind": "train", "rollouts": sampled, "kept": len(examples),
                                  "kept_fraction": len(examples) / max(1, sampled), "sft_steps": 0}
        # Fewer correct responses than a batch: train on them as one (smaller) batch with one micro-batch each
        # (data-parallel: a multiple of the ranks, so each takes an equal share).
        batch_size = min(config.train_batch_size, len(examples))
        if batch_size < config.train_batch_size:
            batch_size -= batch_size % dist.world_size
        accumulation = config.gradient_accumulation_steps if batch_size == config.train_batch_size else batch_size
        sft_steps = (config.sft_epochs * len(examples)) // batch_size if batch_size else 0
        losses = []
        policy.train()
        for sft_step in range(sft_steps):
            batch = [examples[i] for i in epoch_order(len(examples), sft_step, batch_size, config.seed + round_)]
            metrics = sft_update(trained, optimizer, tokenizer, [e["prompt"] for e in batch],
                                 [e["response"] for e in batch], accumulation, config.max_grad_norm,
                                 precision=config.precision, dist=dist)
            losses.append(metrics["loss"])
        record.update(sft_steps=sft_steps, sft_loss_first=losses[0] if losses else None,
                      sft_loss_last=losses[-1] if losses else None)
        push()
        record_step(run_dir, history, record, policy, optimizer, round_ + 1, config.n_ei_steps, 1, config.eval_every,
                    evaluate)  # a checkpoint after every round
        round_ += 1
    finish_run(run_dir, policy, optimizer, round_, stop, evaluate)
    return history
