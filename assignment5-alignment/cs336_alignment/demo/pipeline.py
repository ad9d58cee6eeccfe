"""The demonstration: pretrain a small cs336_basics LM on generated word problems, SFT it into the R1-Zero
format, measure held-out reward, run the RL method of `config.method` (GRPO or GSPO with the GRPO loop, PPO with
the rule reward or with a reward model trained here first; native KV-cached rollouts), measure again.

Step counts decide every stage's length and the seed every random choice, so a (preset, seed) pair is one
set of numbers; the time budget only guards against a much slower machine.
"""

import json
import math
import multiprocessing
import os
import random
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from cs336_alignment.demo.config import DemoConfig
from cs336_alignment.demo.problems import Problem, generate, maybe_slip
from cs336_alignment.demo.tokenizer import train_demo_tokenizer
from cs336_alignment.generation import NativeBackend, SamplingParams
from cs336_alignment.lm import BasicsCausalLM
from cs336_alignment.models import resolve_device
from cs336_alignment.reward import r1_zero_reward
from cs336_alignment.reward_model import RewardModel
from cs336_alignment.rollouts import sample_rollouts
from cs336_alignment.text_tokenizer import BasicsTokenizer
from cs336_alignment.training import GRPOConfig, SFTConfig, run_grpo, run_sft
from cs336_alignment.training.common import Deadline, evaluate_reward, native_backend
from cs336_alignment.training.eval_config import QuestionSet
from cs336_alignment.training.ppo_loop import PPOConfig, run_ppo
from cs336_alignment.training.reward_model_loop import RewardModelConfig, preference_pairs_from_groups, run_reward_model
from cs336_basics.cli_support import atomic_path, atomic_write
from cs336_basics.model import TransformerConfig, TransformerLM

_WORKER_TOKENIZER: BasicsTokenizer | None = None


def _init_worker(tokenizer: BasicsTokenizer) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = tokenizer


def _encode_many(texts: list[str]) -> list[int]:
    assert _WORKER_TOKENIZER is not None
    eos = _WORKER_TOKENIZER.eos_token_id
    out: list[int] = []
    for t in texts:
        out += _WORKER_TOKENIZER.encode(t)
        out.append(eos)
    return out


def encode_corpus(tokenizer: BasicsTokenizer, texts: list[str], workers: int) -> torch.Tensor:
    """Documents joined by EOS into one token stream (in parallel processes when `workers` > 1)."""
    parts = [texts[i : i + 2000] for i in range(0, len(texts), 2000)]
    if workers <= 1:
        _init_worker(tokenizer)
        streams = [_encode_many(p) for p in parts]
    else:
        with multiprocessing.get_context("fork").Pool(workers, _init_worker, (tokenizer,)) as pool:
            streams = pool.map(_encode_many, parts)
    return torch.tensor([t for s in streams for t in s], dtype=torch.long)


def lr_at(progress: float, peak: float, warmup_fraction: float) -> float:
    """Linear warm-up then cosine decay to 10% of peak over `progress` in [0, 1]."""
    if progress < warmup_fraction:
        return peak * progress / max(warmup_fraction, 1e-9)
    t = min(1.0, (progress - warmup_fraction) / max(1 - warmup_fraction, 1e-9))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def pretrain(model: TransformerLM, stream: torch.Tensor, config: DemoConfig, guard_s: float,
             log: list[dict[str, Any]]) -> dict[str, Any]:
    """Next-token training on random windows of the stream for exactly `pretrain_steps` steps (the schedule
    follows the step count); `guard_s` only stops a far slower machine early, which the stats then record."""
    device = next(model.parameters()).device
    stream = stream.to(device)
    ctx, batch, total = config.context_length, config.pretrain_batch_size, config.pretrain_steps
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.pretrain_lr, betas=(0.9, 0.95), weight_decay=0.1,
                                  fused=device.type == "cuda")
    generator = torch.Generator(device=device).manual_seed(config.seed)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu",
                                                                                                   enabled=False)
    warm = config.pretrain_warmup / total
    deadline = Deadline(guard_s)
    start, step, tokens, loss = time.perf_counter(), 0, 0, None
    model.train()
    progress_bar = tqdm(total=total, desc="pretrain", leave=False)
    while step < total and not deadline.passed():
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step / total, config.pretrain_lr, warm)
        offsets = torch.randint(0, stream.numel() - ctx - 1, (batch,), device=device, generator=generator)
        window = offsets[:, None] + torch.arange(ctx + 1, device=device)
        chunk = stream[window]
        with amp:
            logits = model(chunk[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), chunk[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens += batch * ctx
        progress_bar.update(1)
        if step % 50 == 0 or step == 1:
            log.append({"stage": "pretrain", "step": step, "loss": float(loss.detach()),
                        "lr": optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - start})
    progress_bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"steps": step, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / max(seconds, 1e-9),
            "final_loss": float(loss.detach()) if loss is not None else None, "stopped_by_guard": step < total}


def evaluate(policy: BasicsCausalLM, tokenizer: BasicsTokenizer, questions: QuestionSet, config: DemoConfig,
             temperature: float) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Reward on `questions` (one sample each) with the standard error of its mean."""
    backend = NativeBackend(policy, tokenizer, batch_size=config.generation_batch_size)
    params = SamplingParams(temperature=temperature, max_tokens=config.max_new_tokens, stop=("</answer>",),
                            include_stop_str_in_output=True, seed=config.seed + 99)
    records, summary = evaluate_reward(backend, policy, tokenizer, questions.prompts, questions.truths,
                                       r1_zero_reward, params, entropy_batch_size=128)
    summary["reward_se"] = standard_error([r["reward"] for r in records])
    return records, summary


def standard_error(values: list[float]) -> float | None:
    """Sample standard deviation / sqrt(n): the error bar of a mean over independent examples."""
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def rollout_throughput(policy: BasicsCausalLM, tokenizer: BasicsTokenizer, prompts: list[str],
                       config: DemoConfig) -> dict[str, Any]:
    """Native backend decoding speed: `throughput_rows` rows forced to `throughput_tokens` new tokens each."""
    backend = NativeBackend(policy, tokenizer, batch_size=config.throughput_rows)
    rows = (prompts * config.throughput_rows)[: config.throughput_rows]
    params = SamplingParams(temperature=1.0, max_tokens=config.throughput_tokens, min_tokens=config.throughput_tokens,
                            seed=config.seed)
    device = next(policy.parameters()).device
    backend.generate(rows[:2], SamplingParams(max_tokens=4, seed=0))  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    completions = backend.generate(rows, params)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    tokens = sum(len(c.token_ids) for c in completions)
    return {"rows": len(rows), "new_tokens_per_row": config.throughput_tokens, "tokens": tokens, "seconds": seconds,
            "tokens_per_s": tokens / seconds, "decode_steps_per_s": config.throughput_tokens / seconds}


def _question_set(problems: list[Problem]) -> QuestionSet:
    return QuestionSet([p.r1_prompt() for p in problems], [str(p.answer) for p in problems])


def evaluate_sampled_and_greedy(
    policy: BasicsCausalLM, tokenizer: BasicsTokenizer, questions: QuestionSet, config: DemoConfig
) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
    """(samples at T=1, their summary, the greedy records and summary) on the held-out questions."""
    samples, sampled = evaluate(policy, tokenizer, questions, config, temperature=1.0)
    greedy_records, greedy = evaluate(policy, tokenizer, questions, config, temperature=0.0)
    return samples, sampled, {**greedy, "_records": greedy_records}


def paired_gain(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> dict[str, float | None]:
    """Mean reward change on the same questions and its paired standard error."""
    diffs = [b["reward"] - a["reward"] for a, b in zip(before, after, strict=True)]
    return {"gain": sum(diffs) / len(diffs) if diffs else None, "se": standard_error(diffs)}


# ---- the run's stages --------------------------------------------------------------------------------------

# Fields that decide the SFT start; a saved start is only reused by a run that agrees on all of them.
START_FIELDS = ("seed", "max_steps_per_problem", "error_rate", "n_pretrain_problems", "n_sft_examples",
                "vocab_size", "d_model", "num_layers", "num_heads", "d_ff", "context_length", "pretrain_batch_size",
                "pretrain_lr", "pretrain_warmup", "pretrain_steps", "sft_steps", "sft_batch_size", "sft_grad_accum",
                "sft_lr")


class StartMismatch(ValueError):
    """A saved start was made with other data, model or stage settings than the run that wants it."""


@dataclass
class DemoData:
    tokenizer: BasicsTokenizer
    pretrain_texts: list[str]
    sft_examples: list[dict[str, str]]
    grpo_questions: QuestionSet
    heldout: QuestionSet


def make_data(config: DemoConfig) -> DemoData:
    """A train pool (pretraining text, SFT traces, GRPO questions), a disjoint held-out split, the tokenizer."""
    pool = generate(config.n_pretrain_problems, config.seed, held_out=False, max_steps=config.max_steps_per_problem)
    heldout = generate(config.n_heldout, config.seed + 1, held_out=True, max_steps=config.max_steps_per_problem)
    rng = random.Random(config.seed)
    sft_problems = pool[: config.n_sft_examples]
    sft_examples = [{"prompt": p.r1_prompt(), "response": p.r1_response(maybe_slip(p, rng, config.error_rate))}
                    for p in sft_problems]
    grpo_questions = _question_set(pool[config.n_sft_examples : config.n_sft_examples + config.n_grpo_questions])
    pretrain_texts = [p.plain_text(maybe_slip(p, rng, config.error_rate)) for p in pool]
    sample = "<|endoftext|>".join(pretrain_texts[:3000] + [e["prompt"] + e["response"] for e in sft_examples[:300]])
    tokenizer = train_demo_tokenizer(sample, config.vocab_size)
    return DemoData(tokenizer, pretrain_texts, sft_examples, grpo_questions, _question_set(heldout))


def model_config_for(config: DemoConfig, tokenizer: BasicsTokenizer, device: torch.device) -> TransformerConfig:
    return TransformerConfig(vocab_size=len(tokenizer), context_length=config.context_length, d_model=config.d_model,
                             num_layers=config.num_layers, num_heads=config.num_heads, d_ff=config.d_ff,
                             use_torch_sdpa=device.type == "cuda")


def train_start(config: DemoConfig, data: DemoData, device: torch.device, log: list[dict[str, Any]],
                timings: dict[str, float]) -> tuple[BasicsCausalLM, dict[str, Any]]:
    """Pretraining on plain problem + reasoning text, then SFT into the R1-Zero format: GRPO's starting policy."""
    budgets = config.stage_budgets()
    t = time.perf_counter()
    stream = encode_corpus(data.tokenizer, data.pretrain_texts, config.encode_workers)
    timings["encode"] = time.perf_counter() - t
    torch.manual_seed(config.seed)
    model = TransformerLM(model_config_for(config, data.tokenizer, device)).to(device)
    t = time.perf_counter()
    pretrain_stats = pretrain(model, stream, config, budgets["pretrain"], log)
    timings["pretrain"] = time.perf_counter() - t
    policy = BasicsCausalLM(model)
    t = time.perf_counter()
    sft_history = run_sft(policy, data.tokenizer, data.sft_examples, SFTConfig(
        learning_rate=config.sft_lr, train_batch_size=config.sft_batch_size,
        gradient_accumulation_steps=config.sft_grad_accum, num_steps=config.sft_steps, warmup_steps=5,
        precision=_precision(device), seed=config.seed, time_budget_s=budgets["sft"]))
    log += [{"stage": "sft", **r} for r in sft_history]
    timings["sft"] = time.perf_counter() - t
    return policy, {"pretrain": pretrain_stats, "sft_steps_run": sum(1 for r in sft_history if r["kind"] == "train")}


def save_start(path: str, policy: BasicsCausalLM, config: DemoConfig, stats: dict[str, Any]) -> None:
    """The SFT model and what made it, written atomically (a sweep's GRPO runs all start from this file)."""
    state = {"model": policy.model.state_dict(), "model_config": policy.model.config.to_dict(),
             "start_config": {k: getattr(config, k) for k in START_FIELDS}, "stats": stats}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def read_start(path: str, config: DemoConfig) -> dict[str, Any]:
    """A saved SFT start (on the CPU), refused when it was made with other data, model or stage settings; read
    before the run makes its output folder, so that a refused start leaves nothing behind."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, a pickle weights_only refuses: the file's fault
        reason = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
        raise StartMismatch(f"{path} is not a start written by --save-start ({reason})") from e
    if not isinstance(state, dict) or not {"start_config", "model", "stats"} <= state.keys():
        raise StartMismatch(f"{path} is not a start written by --save-start")
    mismatched = [k for k in START_FIELDS if state["start_config"].get(k) != getattr(config, k)]
    if mismatched:
        raise StartMismatch(f"{path} was made with other settings: " + ", ".join(
            f"{k}={state['start_config'].get(k)!r} (this run: {getattr(config, k)!r})" for k in mismatched))
    return state


def load_start(state: dict[str, Any], config: DemoConfig, data: DemoData, device: torch.device
               ) -> tuple[BasicsCausalLM, dict[str, Any]]:
    """The policy of a start `read_start` accepted."""
    model = TransformerLM(model_config_for(config, data.tokenizer, device)).to(device)
    model.load_state_dict(state["model"])
    return BasicsCausalLM(model), state["stats"]


def _precision(device: torch.device) -> str:
    return "bf16" if device.type == "cuda" else "fp32"


def make_deterministic(device: torch.device) -> None:
    """Deterministic kernels (cuBLAS workspace, sorted scatter in embedding backward, deterministic SDPA
    backward): bitwise-repeatable runs for a seed on one machine, at a small speed cost."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)


def grpo_config_for(config: DemoConfig, device: torch.device) -> GRPOConfig:
    """The GRPO loop's settings; method `gspo` swaps in the sequence-level loss and its clip range."""
    gspo = config.method == "gspo"
    return GRPOConfig(
        n_grpo_steps=config.grpo_steps, learning_rate=config.grpo_lr, warmup_steps=config.grpo_warmup_steps,
        rollout_batch_size=config.rollout_batch_size, group_size=config.group_size,
        sampling_max_tokens=config.max_new_tokens, epochs_per_rollout_batch=config.epochs_per_rollout_batch,
        train_batch_size=config.train_batch_size, gradient_accumulation_steps=config.grpo_grad_accum,
        loss_type="gspo" if gspo else config.loss_type, cliprange=config.gspo_cliprange if gspo else config.cliprange,
        precision=_precision(device), backend="native",
        generation_batch_size=config.generation_batch_size, seed=config.seed,
        time_budget_s=config.stage_budgets()["grpo"], eval_every=config.eval_every,
        eval_limit=config.n_eval_in_loop, eval_max_tokens=config.max_new_tokens, eval_seed=config.seed + 99,
        log_generations=0)


def ppo_config_for(config: DemoConfig, device: torch.device) -> PPOConfig:
    """PPO with the RL stage's shared settings (rollout budget, lr, warm-up, train batch, epochs per rollout
    batch, clip range, sampling, in-loop evaluation) and its own (samples per prompt, KL, value loss, λ)."""
    return PPOConfig(
        n_ppo_steps=config.grpo_steps, learning_rate=config.grpo_lr, warmup_steps=config.grpo_warmup_steps,
        rollout_batch_size=config.rollout_batch_size, samples_per_prompt=config.ppo_samples_per_prompt,
        sampling_max_tokens=config.max_new_tokens, ppo_epochs=config.epochs_per_rollout_batch,
        train_batch_size=config.train_batch_size, gradient_accumulation_steps=config.grpo_grad_accum,
        cliprange=config.cliprange, vf_coef=config.ppo_vf_coef, lam=config.ppo_lam, kl_coef=config.ppo_kl_coef,
        reward="model" if config.method == "ppo-rm" else "rule", precision=_precision(device), backend="native",
        generation_batch_size=config.generation_batch_size, seed=config.seed,
        time_budget_s=config.stage_budgets()["grpo"], eval_every=config.eval_every,
        eval_limit=config.n_eval_in_loop, eval_max_tokens=config.max_new_tokens, eval_seed=config.seed + 99,
        log_generations=0)


class NoPreferencePairs(ValueError):
    """Every group of SFT rollouts scored the same, so the rule reward gave the reward model nothing to learn."""


def train_reward_model(policy: BasicsCausalLM, data: DemoData, config: DemoConfig, device: torch.device,
                       log: list[dict[str, Any]]) -> tuple[RewardModel, dict[str, Any]]:
    """The reward model of `ppo-rm`: `rm_questions` training questions (the end of the RL pool), `rm_group_size`
    rollouts each from the SFT policy (the RL rollout settings), scored by the rule reward; pairs (the higher
    reward preferred) within each group by `preference_pairs_from_groups`; the last `rm_heldout_fraction` of the
    groups give held-out pairs, on questions the model never trains on. The trunk is a copy of the SFT model with
    a longer context (RoPE, no learned positions): the Alpaca-wrapped pair text is longer than a rollout."""
    started = time.perf_counter()
    pool = data.grpo_questions
    n = min(config.rm_questions, len(pool))
    prompts, truths = pool.prompts[len(pool) - n :], pool.truths[len(pool) - n :]
    params = grpo_config_for(config, device).rollout_params(config.seed * 7919 + 1_000_003)
    rollouts = sample_rollouts(native_backend(policy, data.tokenizer, config.generation_batch_size), prompts, truths,
                               config.rm_group_size, params)
    group = config.rm_group_size
    prompts, responses, truths = list(rollouts.prompts), list(rollouts.responses), list(rollouts.ground_truths)
    if config.rm_add_gold:  # one more member per group: the bare gold answer (see DemoConfig.rm_add_gold)
        def extend(rows: list[str], extra: list[str]) -> list[str]:
            return [x for q in range(n) for x in [*rows[q * group : (q + 1) * group], extra[q]]]
        prompts, truths = extend(prompts, list(pool.prompts[len(pool) - n :])), extend(truths, list(truths[::group]))
        responses = extend(responses, [f" </think> <answer>{t}</answer>" for t in pool.truths[len(pool) - n :]])
        group += 1
    rewards = [r1_zero_reward(r, g)["reward"] for r, g in zip(responses, truths, strict=True)]
    n_held = min(n - 1, max(1, round(n * config.rm_heldout_fraction)))
    cut = (n - n_held) * group
    pairs = {name: preference_pairs_from_groups(prompts[rows], responses[rows], rewards[rows], group,
                                                config.rm_max_pairs_per_group)
             for name, rows in (("train", slice(0, cut)), ("heldout", slice(cut, None)))}
    if not pairs["train"]:
        raise NoPreferencePairs(f"ppo-rm: the SFT rollouts of all {n - n_held} training questions tie within their "
                                "groups (rule reward), so there is no preference pair to train a reward model on")
    trunk = TransformerLM(replace(model_config_for(config, data.tokenizer, device),
                                  context_length=config.rm_context_length)).to(device)
    trunk.load_state_dict(policy.model.state_dict())
    torch.manual_seed(config.seed + 17)  # the value head's initial weights
    reward_model = RewardModel(BasicsCausalLM(trunk))
    history = run_reward_model(reward_model, data.tokenizer, pairs["train"], RewardModelConfig(
        learning_rate=config.rm_lr, train_batch_size=config.rm_batch_size, gradient_accumulation_steps=1,
        num_steps=config.rm_steps, eval_batch_size=config.rm_batch_size, precision=_precision(device),
        seed=config.seed), eval_pairs=pairs["heldout"] or None)
    log += [{"stage": "reward_model", **r} for r in history]
    evals = [r for r in history if r["kind"] == "eval"]
    train = [r for r in history if r["kind"] == "train"]
    return reward_model, {
        "questions": n, "heldout_questions": n_held, "rollouts": len(rollouts.responses),
        "gold_answers_added": config.rm_add_gold,
        "rollout_tokens": sum(len(ids) for ids in rollouts.response_token_ids or []),
        "rollout_reward_mean": sum(rewards[i] for i in range(len(rewards)) if i % group < config.rm_group_size)
        / len(rollouts.responses), "train_pairs": len(pairs["train"]),
        "heldout_pairs": len(pairs["heldout"]), "steps": len(train),
        "heldout_accuracy_start": evals[0]["eval_accuracy"] if evals else None,
        "heldout_accuracy": evals[-1]["eval_accuracy"] if evals else None,
        "train_accuracy_last": train[-1]["train_accuracy"] if train else None,
        "seconds": time.perf_counter() - started}


def run_rl(policy: BasicsCausalLM, data: DemoData, config: DemoConfig, device: torch.device,
           log: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """The RL stage of `config.method` from the SFT policy: the loop's history (train records and held-out
    evaluations, always scored by the rule reward) and, for ppo-rm, the reward model's statistics."""
    if config.method in ("grpo", "gspo"):
        return run_grpo(policy, data.tokenizer, data.grpo_questions, grpo_config_for(config, device),
                        eval_questions=data.heldout), None
    reward_model, rm_stats = None, None
    if config.method == "ppo-rm":
        reward_model, rm_stats = train_reward_model(policy, data, config, device, log)
    torch.manual_seed(config.seed + 23)  # the value head's initial weights
    return run_ppo(policy, data.tokenizer, data.grpo_questions, ppo_config_for(config, device),
                   eval_questions=data.heldout, reward_fn=r1_zero_reward, reward_model=reward_model), rm_stats


def rollout_budget(config: DemoConfig, train: list[dict[str, Any]],
                   reward_model: dict[str, Any] | None) -> dict[str, Any]:
    """What the RL stage sampled, counted the same way for every method: rollout batches x responses per batch
    (each capped at max_new_tokens), and response tokens generated (per step, mean length x responses).
    The reward model's SFT-policy rollouts (ppo-rm) are counted apart: labelled data, not RL samples."""
    return {"rl_steps": len(train), "rollouts_per_step": config.rollout_batch_size,
            "rollouts": len(train) * config.rollout_batch_size, "max_new_tokens": config.max_new_tokens,
            "generated_tokens": round(sum(r["response_length"] * config.rollout_batch_size for r in train)),
            "optimizer_steps": int(sum(r.get("optimizer_steps", 0) for r in train)),
            "reward_model_rollouts": reward_model["rollouts"] if reward_model else 0}


def run_demo(config: DemoConfig, out_dir: str, start_from: str | None = None,
             save_start_to: str | None = None, start_only: bool = False) -> dict[str, Any]:
    """All stages; returns (and writes to `out_dir`) the results dictionary.

    `start_from` skips pretraining and SFT by loading a start saved with `save_start_to` (same seed and start
    settings); `start_only` stops after saving it.
    """
    t0 = time.perf_counter()
    start = read_start(start_from, config) if start_from is not None else None
    os.makedirs(out_dir, exist_ok=True)
    device = resolve_device(config.device)
    if config.deterministic:
        make_deterministic(device)
    torch.manual_seed(config.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    timings: dict[str, float] = {}
    log: list[dict[str, Any]] = []

    data = make_data(config)
    timings["data_and_tokenizer"] = time.perf_counter() - t0
    if start is not None:
        policy, start_stats = load_start(start, config, data, device)
    else:
        policy, start_stats = train_start(config, data, device, log, timings)
    if save_start_to is not None:
        save_start(save_start_to, policy, config, start_stats)
    if start_only:
        return {"config": asdict(config), "start": save_start_to, **start_stats, "timings_s": timings}
    tokenizer, heldout_set = data.tokenizer, data.heldout

    t = time.perf_counter()
    sft_samples, sft_sampled, sft_greedy = evaluate_sampled_and_greedy(policy, tokenizer, heldout_set, config)
    timings["eval_sft"] = time.perf_counter() - t

    t = time.perf_counter()
    grpo_history, reward_model = run_rl(policy, data, config, device, log)
    log += [{"stage": config.method, **r} for r in grpo_history]
    timings["grpo"] = time.perf_counter() - t

    t = time.perf_counter()
    grpo_samples, grpo_sampled, grpo_greedy = evaluate_sampled_and_greedy(policy, tokenizer, heldout_set, config)
    timings["eval_grpo"] = time.perf_counter() - t
    throughput = rollout_throughput(policy, tokenizer, heldout_set.prompts, config)
    timings["total"] = time.perf_counter() - t0

    gains = {"sampled": paired_gain(sft_samples, grpo_samples),
             "greedy": paired_gain(sft_greedy.pop("_records"), grpo_greedy.pop("_records"))}
    train = [r for r in grpo_history if r["kind"] == "train"]
    model = policy.model
    speeds = [r["response_length"] * config.rollout_batch_size / r["rollout_seconds"] for r in train
              if r.get("rollout_seconds")]
    results = {
        "config": asdict(config),
        "method": config.method,
        "started_from": start_from,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "model": {**model.config.to_dict(), "parameters": model.num_parameters()},
        "tokenizer_vocab": len(tokenizer),
        **start_stats,
        "grpo_steps_run": len(train),
        "stopped_by_guard": [name for name, stopped in (
            ("pretrain", start_stats["pretrain"].get("stopped_by_guard", False)),
            ("sft", start_stats["sft_steps_run"] < config.sft_steps),
            ("grpo", len(train) < config.grpo_steps)) if stopped],
        "heldout": {"n": len(heldout_set), "sft": {"sampled": sft_sampled, "greedy": sft_greedy},
                    "grpo": {"sampled": grpo_sampled, "greedy": grpo_greedy}},
        "reward_gain_sampled": gains["sampled"]["gain"],
        "reward_gain_sampled_se": gains["sampled"]["se"],
        "reward_gain_greedy": gains["greedy"]["gain"],
        "reward_gain_greedy_se": gains["greedy"]["se"],
        "budget": rollout_budget(config, train, reward_model),
        "reward_model": reward_model,
        "rollout_tokens_per_s_mean": sum(speeds) / len(speeds) if speeds else None,
        "native_throughput": throughput,
        "timings_s": timings,
        "curves": {
            "grpo_train": [{k: r.get(k) for k in ("step", "reward_mean", "format_reward_mean", "token_entropy",
                                                 "response_length", "clip_fraction", "grad_norm", "loss", "lr",
                                                 "fraction_groups_all_equal", "skipped_step", "sampled_ids_fraction",
                                                 "noncanonical_fraction", "rollout_tokens_per_s", "score_mean",
                                                 "kl", "pg_loss", "vf_loss", "value_mean", "optimizer_steps")}
                           for r in train],
            "grpo_eval": [{k: r.get(k) for k in ("step", "reward", "format_reward", "mean_token_entropy",
                                                "response_length")} for r in grpo_history if r["kind"] == "eval"],
        },
    }
    write_outputs(out_dir, results, log, sft_samples[:20], grpo_samples[:20])
    return results


def write_outputs(out_dir: str, results: dict[str, Any], log: list[dict[str, Any]],
                  sft_samples: list[dict[str, Any]], grpo_samples: list[dict[str, Any]]) -> None:
    """Few files on purpose (the device returns at most eight): JSON, JSONL log, samples, two PNGs, markdown."""
    from cs336_alignment.demo.report import markdown_summary, plot_curves

    with atomic_write(os.path.join(out_dir, "a5_demo_results.json")) as f:
        json.dump(results, f, indent=2, default=float)
    with atomic_write(os.path.join(out_dir, "a5_demo_log.jsonl")) as f:
        for record in log:
            f.write(json.dumps(record, default=float) + "\n")
    with atomic_write(os.path.join(out_dir, "a5_demo_samples.jsonl")) as f:
        for stage, records in (("sft", sft_samples), ("grpo", grpo_samples)):
            for r in records:
                f.write(json.dumps({"stage": stage, **{k: v for k, v in r.items() if k != "prompt"}},
                                   default=float) + "\n")
    plot_curves(results, out_dir)
    with atomic_write(os.path.join(out_dir, "a5_demo_summary.md")) as f:
        f.write(markdown_summary(results))
