"""The demonstration: pretrain a small cs336_basics LM on generated word problems, SFT it into the R1-Zero
format, measure held-out reward, run GRPO (the package's loop, native KV-cached rollouts), measure again.

Every stage is bounded by its share of the time budget, so the whole run fits one command on the device.
"""

import json
import math
import multiprocessing
import os
import random
import time
from dataclasses import asdict
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
from cs336_alignment.text_tokenizer import BasicsTokenizer
from cs336_alignment.training import GRPOConfig, SFTConfig, run_grpo, run_sft
from cs336_alignment.training.common import evaluate_reward
from cs336_alignment.training.eval_config import QuestionSet
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


def pretrain(model: TransformerLM, stream: torch.Tensor, config: DemoConfig, budget_s: float,
             log: list[dict[str, Any]]) -> dict[str, Any]:
    """Next-token training on random windows of the stream; the LR schedule runs on max(step, time) progress,
    so it decays fully whichever of `pretrain_max_steps` and the time budget ends the stage."""
    device = next(model.parameters()).device
    stream = stream.to(device)
    ctx, batch = config.context_length, config.pretrain_batch_size
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.pretrain_lr, betas=(0.9, 0.95), weight_decay=0.1,
                                  fused=device.type == "cuda")
    generator = torch.Generator(device=device).manual_seed(config.seed)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu",
                                                                                                   enabled=False)
    warm = config.pretrain_warmup / config.pretrain_max_steps
    start, step, tokens = time.perf_counter(), 0, 0
    model.train()
    progress_bar = tqdm(total=config.pretrain_max_steps, desc="pretrain", leave=False)
    while step < config.pretrain_max_steps:
        elapsed = time.perf_counter() - start
        progress = max(step / config.pretrain_max_steps, elapsed / budget_s)
        if progress >= 1:
            break
        for group in optimizer.param_groups:
            group["lr"] = lr_at(progress, config.pretrain_lr, warm)
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
            "final_loss": float(loss.detach()) if step else None}


def evaluate(policy: BasicsCausalLM, tokenizer: BasicsTokenizer, questions: QuestionSet, config: DemoConfig,
             temperature: float) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    backend = NativeBackend(policy, tokenizer, batch_size=config.generation_batch_size)
    params = SamplingParams(temperature=temperature, max_tokens=config.max_new_tokens, stop=("</answer>",),
                            include_stop_str_in_output=True, seed=config.seed + 99)
    return evaluate_reward(backend, policy, tokenizer, questions.prompts, questions.truths, r1_zero_reward, params,
                           entropy_batch_size=128)


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
    """(samples at T=1, their summary, the greedy summary) on the held-out questions."""
    samples, sampled = evaluate(policy, tokenizer, questions, config, temperature=1.0)
    _, greedy = evaluate(policy, tokenizer, questions, config, temperature=0.0)
    return samples, sampled, greedy


def run_demo(config: DemoConfig, out_dir: str) -> dict[str, Any]:
    """All stages; returns (and writes to `out_dir`) the results dictionary."""
    t0 = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    budgets = config.stage_budgets()
    timings: dict[str, float] = {}
    log: list[dict[str, Any]] = []

    # Data: a train pool (pretraining text, SFT traces, GRPO questions) and a disjoint held-out split.
    pool = generate(config.n_pretrain_problems, config.seed, held_out=False, max_steps=config.max_steps_per_problem)
    heldout = generate(config.n_heldout, config.seed + 1, held_out=True, max_steps=config.max_steps_per_problem)
    rng = random.Random(config.seed)
    sft_problems = pool[: config.n_sft_examples]
    sft_examples = [{"prompt": p.r1_prompt(), "response": p.r1_response(maybe_slip(p, rng, config.error_rate))}
                    for p in sft_problems]
    grpo_questions = _question_set(pool[config.n_sft_examples : config.n_sft_examples + config.n_grpo_questions])
    heldout_set = _question_set(heldout)
    pretrain_texts = [p.plain_text(maybe_slip(p, rng, config.error_rate)) for p in pool]
    sample = "<|endoftext|>".join(pretrain_texts[:3000] + [e["prompt"] + e["response"] for e in sft_examples[:300]])
    tokenizer = train_demo_tokenizer(sample, config.vocab_size)
    stream = encode_corpus(tokenizer, pretrain_texts, config.encode_workers)
    timings["data_and_tokenizer"] = time.perf_counter() - t0

    model_config = TransformerConfig(vocab_size=len(tokenizer), context_length=config.context_length,
                                     d_model=config.d_model, num_layers=config.num_layers, num_heads=config.num_heads,
                                     d_ff=config.d_ff, use_torch_sdpa=device.type == "cuda")
    model = TransformerLM(model_config).to(device)
    t = time.perf_counter()
    pretrain_stats = pretrain(model, stream, config, budgets["pretrain"], log)
    timings["pretrain"] = time.perf_counter() - t
    policy = BasicsCausalLM(model)
    precision = "bf16" if device.type == "cuda" else "fp32"

    t = time.perf_counter()
    sft_history = run_sft(policy, tokenizer, sft_examples, SFTConfig(
        learning_rate=config.sft_lr, train_batch_size=config.sft_batch_size,
        gradient_accumulation_steps=config.sft_grad_accum, num_steps=config.sft_steps, warmup_steps=5,
        precision=precision, seed=config.seed, time_budget_s=budgets["sft"]))
    log += [{"stage": "sft", **r} for r in sft_history]
    timings["sft"] = time.perf_counter() - t

    t = time.perf_counter()
    sft_samples, sft_sampled, sft_greedy = evaluate_sampled_and_greedy(policy, tokenizer, heldout_set, config)
    timings["eval_sft"] = time.perf_counter() - t

    grpo_config = GRPOConfig(
        n_grpo_steps=config.grpo_steps, learning_rate=config.grpo_lr, rollout_batch_size=config.rollout_batch_size,
        group_size=config.group_size, sampling_max_tokens=config.max_new_tokens,
        epochs_per_rollout_batch=config.epochs_per_rollout_batch, train_batch_size=config.train_batch_size,
        gradient_accumulation_steps=config.grpo_grad_accum, loss_type=config.loss_type, cliprange=config.cliprange,
        precision=precision, generation_batch_size=config.generation_batch_size, seed=config.seed,
        time_budget_s=budgets["grpo"], eval_every=config.eval_every, eval_limit=config.n_eval_in_loop,
        eval_max_tokens=config.max_new_tokens, eval_seed=config.seed + 99, log_generations=0)
    t = time.perf_counter()
    grpo_history = run_grpo(policy, tokenizer, grpo_questions, grpo_config, eval_questions=heldout_set)
    log += [{"stage": "grpo", **r} for r in grpo_history]
    timings["grpo"] = time.perf_counter() - t

    t = time.perf_counter()
    grpo_samples, grpo_sampled, grpo_greedy = evaluate_sampled_and_greedy(policy, tokenizer, heldout_set, config)
    timings["eval_grpo"] = time.perf_counter() - t
    throughput = rollout_throughput(policy, tokenizer, heldout_set.prompts, config)
    timings["total"] = time.perf_counter() - t0

    train = [r for r in grpo_history if r["kind"] == "train"]
    results = {
        "config": asdict(config),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "model": {**model_config.to_dict(), "parameters": model.num_parameters()},
        "tokenizer_vocab": len(tokenizer),
        "pretrain": pretrain_stats,
        "sft_steps_run": sum(1 for r in sft_history if r["kind"] == "train"),
        "grpo_steps_run": len(train),
        "heldout": {"n": len(heldout_set), "sft": {"sampled": sft_sampled, "greedy": sft_greedy},
                    "grpo": {"sampled": grpo_sampled, "greedy": grpo_greedy}},
        "reward_gain_sampled": grpo_sampled["reward"] - sft_sampled["reward"],
        "reward_gain_greedy": grpo_greedy["reward"] - sft_greedy["reward"],
        "rollout_tokens_per_s_mean": (sum(r["rollout_tokens_per_s"] for r in train) / len(train)) if train else None,
        "native_throughput": throughput,
        "timings_s": timings,
        "curves": {
            "grpo_train": [{k: r.get(k) for k in ("step", "reward_mean", "format_reward_mean", "token_entropy",
                                                 "response_length", "clip_fraction", "grad_norm", "loss",
                                                 "rollout_tokens_per_s")} for r in train],
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

    with open(os.path.join(out_dir, "a5_demo_results.json"), "w") as f:
        json.dump(results, f, indent=2, default=float)
    with open(os.path.join(out_dir, "a5_demo_log.jsonl"), "w") as f:
        for record in log:
            f.write(json.dumps(record, default=float) + "\n")
    with open(os.path.join(out_dir, "a5_demo_samples.jsonl"), "w") as f:
        for stage, records in (("sft", sft_samples), ("grpo", grpo_samples)):
            for r in records:
                f.write(json.dumps({"stage": stage, **{k: v for k, v in r.items() if k != "prompt"}},
                                   default=float) + "\n")
    plot_curves(results, out_dir)
    with open(os.path.join(out_dir, "a5_demo_summary.md"), "w") as f:
        f.write(markdown_summary(results))
