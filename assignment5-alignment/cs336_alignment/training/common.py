"""What every loop shares: seeded data order, optimizer steps with clipping, checkpoints, JSONL metrics,
and reward evaluation through a generation backend."""

import contextlib
import json
import os
import random
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, is_dataclass
from typing import Any

import torch
from torch import nn

from cs336_alignment.cli_inputs import check_checkpoint_file
from cs336_alignment.generation import GenerationBackend, NativeBackend, SamplingParams
from cs336_alignment.lm import BasicsCausalLM, model_device
from cs336_alignment.log_generations import log_generations, response_entropies
from cs336_basics.checkpoint import load_checkpoint_state, save_checkpoint
from cs336_basics.cli_support import StopRequest, UserError, atomic_write, prepare_run_dir, read_jsonl_tolerant
from cs336_basics.cli_support.ranges import flag_name
from cs336_basics.model import TransformerConfig

RewardFn = Callable[[str, str], dict[str, float]]
CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"
GENERATIONS_NAME = "generations.jsonl"


def check_divides(divisor_name: str, divisor: int, name: str, value: int) -> None:
    if divisor <= 0 or value % divisor:
        raise UserError(f"{flag_name(name)} ({value}) must be divisible by {flag_name(divisor_name)} ({divisor})")


def epoch_order(n: int, step: int, batch_size: int, seed: int) -> list[int]:
    """Indices of optimizer step `step`'s batch in a stream of seeded per-epoch permutations.

    A pure function of (n, step, batch size, seed), so a resumed run sees exactly the batches it would have seen.
    """
    start = step * batch_size
    out: list[int] = []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n)
        perm = list(range(n))
        random.Random(seed * 1_000_003 + epoch).shuffle(perm)
        out.extend(perm[offset : offset + batch_size - len(out)])
    return out


def chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA when asked (weights stay fp32 for the optimizer); otherwise a no-op."""
    if precision not in ("fp32", "bf16"):
        raise UserError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    if precision == "bf16" and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_adamw(model: nn.Module, lr: float, weight_decay: float, beta1: float, beta2: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                             weight_decay=weight_decay, betas=(beta1, beta2))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def warmup_lr(base: float, step: int, warmup_steps: int) -> float:
    """Linear warm-up to `base` over `warmup_steps`, then constant (what the handout's loops use)."""
    return base if warmup_steps <= 0 else base * min(1.0, (step + 1) / warmup_steps)


def clip_and_step(model: nn.Module, optimizer: torch.optim.Optimizer, max_grad_norm: float | None) -> float:
    """Clips the accumulated gradients (when `max_grad_norm` is set), steps, zeroes; returns the pre-clip norm."""
    params = [p for p in model.parameters() if p.grad is not None]
    if max_grad_norm is not None and max_grad_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    else:
        norm = torch.linalg.vector_norm(torch.stack([p.grad.detach().norm() for p in params])) if params else \
            torch.zeros(())
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)


def config_dict(config: Any) -> dict[str, Any]:
    return asdict(config) if is_dataclass(config) else dict(config)


def _core(model: nn.Module) -> nn.Module:
    """The module whose keys checkpoints hold: no `torch.compile` wrapper, a bare cs336_basics LM (so the file
    is a regular cs336-basics checkpoint that `load_basics` and `cs336-align eval --basics-run` read)."""
    model = getattr(model, "_orig_mod", model)
    model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return model.model if isinstance(model, BasicsCausalLM) else model


class RunDir:
    """A loop's output folder: `checkpoint.pt` (atomic, weights-only loadable), `metrics.jsonl`, `config.json`.

    A folder that already holds a run is continued only with `resume` and started over only with `overwrite`
    (checked before anything is written). Without a folder every method is a no-op, so loops run the same in
    memory (tests, the demo's inner stages). With `writer=False` (ranks other than 0 of a data-parallel run)
    nothing is written or removed: the folder is only read, to resume.
    """

    def __init__(self, out_dir: str | os.PathLike | None, config: Any = None, resume: bool = False,
                 overwrite: bool = False, writer: bool = True):
        self.out_dir = None if out_dir is None else os.fspath(out_dir)
        self.writer = writer
        if self.out_dir is not None and writer:
            prepare_run_dir(self.out_dir, resume, overwrite)
            if resume and not os.path.isfile(os.path.join(self.out_dir, CHECKPOINT_NAME)):
                raise UserError(f"nothing to resume: {self.out_dir} has no {CHECKPOINT_NAME}")
            os.makedirs(self.out_dir, exist_ok=True)
            if config is not None:
                with atomic_write(os.path.join(self.out_dir, "config.json")) as f:
                    json.dump(config_dict(config), f, indent=2, default=str)

    @property
    def checkpoint_path(self) -> str | None:
        return None if self.out_dir is None else os.path.join(self.out_dir, CHECKPOINT_NAME)

    def log(self, record: dict[str, Any]) -> None:
        if self.out_dir is not None and self.writer:
            with open(os.path.join(self.out_dir, METRICS_NAME), "a") as f:
                f.write(json.dumps(record, default=float) + "\n")

    def log_generations(self, step: int, records: Sequence[dict[str, Any]]) -> None:
        """Keeps sample generations (prompt, response, rewards, entropy, length) per evaluation."""
        if self.out_dir is not None and self.writer and records:
            with open(os.path.join(self.out_dir, GENERATIONS_NAME), "a") as f:
                for record in records:
                    f.write(json.dumps({"step": step, **record}, default=float) + "\n")

    def save(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int, extra: dict | None = None) -> None:
        """Atomic checkpoint; a cs336_basics model also records its config, so `load_basics` can rebuild it."""
        if self.checkpoint_path is not None and self.writer:
            extra = dict(extra or {})
            core = _core(model)
            if isinstance(getattr(core, "config", None), TransformerConfig):
                extra.setdefault("model_config", core.config.to_dict())
            save_checkpoint(core, optimizer, step, self.checkpoint_path, extra=extra)

    def resume(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[int, dict[str, Any]]:
        """Loads the folder's checkpoint into model and optimizer; returns (completed steps, extra).

        Metric and generation lines written after that checkpoint are dropped, so a crashed-and-resumed run
        logs each step once; a half-written last line (a run killed mid-write) is dropped with a warning.
        """
        path = self.checkpoint_path
        if path is None or not os.path.isfile(path):
            raise UserError(f"nothing to resume: {path or 'no --out-dir'} has no {CHECKPOINT_NAME}")
        check_checkpoint_file(path, "cannot resume")
        try:
            state = load_checkpoint_state(path, map_location=model_device(model))
        except ValueError as e:  # not a loadable cs336 checkpoint (garbage, truncated, foreign)
            raise UserError(f"cannot resume: {str(e).strip() or path}") from e
        try:
            _core(model).load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:  # another model's or optimizer's checkpoint
            raise UserError(f"cannot resume from {path}: it does not match this model and optimizer "
                            f"({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})") from e
        step = int(state["iteration"])
        for name in (METRICS_NAME, GENERATIONS_NAME) if self.writer else ():
            self._keep_up_to(os.path.join(self.out_dir, name), step)
        return step, state.get("extra", {})

    @staticmethod
    def _keep_up_to(path: str, step: int) -> None:
        """Rewrites a JSONL log (atomically) without the records of steps after `step`."""
        if not os.path.isfile(path):
            return
        kept = [r for r in read_jsonl_tolerant(path) if not isinstance(r, dict) or r.get("step", 0) <= step]
        with atomic_write(path) as f:
            f.writelines(json.dumps(r, default=float) + "\n" for r in kept)

    @staticmethod
    def stopped(stop: StopRequest | None) -> bool:
        return stop is not None and stop.requested


def announce_stop(run_dir: RunDir, stop: StopRequest | None, step: int) -> None:
    """After a loop honoured SIGINT/SIGTERM: say where its checkpoint is (the command then exits 130/143)."""
    if RunDir.stopped(stop):
        where = run_dir.checkpoint_path or "memory (no --out-dir)"
        print(f"{stop.name}: stopped after step {step}; checkpoint written to {where} (continue with --resume)",
              file=sys.stderr, flush=True)


def finish_run(run_dir: "RunDir", model: nn.Module, optimizer, step: int, stop, evaluate) -> None:
    """A loop's last act: the final checkpoint, then either the stop notice (a signal or the time budget
    ended it early) or the final evaluation."""
    run_dir.save(model, optimizer, step)
    if RunDir.stopped(stop):
        announce_stop(run_dir, stop, step)
    else:
        evaluate(step)


def record_step(
    run_dir: RunDir,
    history: list[dict[str, Any]],
    record: dict[str, Any],
    policy: nn.Module,
    optimizer: torch.optim.Optimizer,
    done: int,
    total: int,
    checkpoint_every: int | None,
    eval_every: int | None,
    evaluate: Callable[[int], None],
) -> None:
    """After step `done` (1-based) of `total`: log and keep its record, checkpoint and evaluate on their
    schedules. The last step's checkpoint and evaluation are left to the loop, which also runs them when its
    time budget ends it early."""
    run_dir.log(record)
    history.append(record)
    if checkpoint_every and done % checkpoint_every == 0:
        run_dir.save(policy, optimizer, done)
    if eval_every and done % eval_every == 0 and done < total:
        evaluate(done)


def native_backend(policy: nn.Module, tokenizer: Any, batch_size: int) -> GenerationBackend:
    """The in-process KV-cached sampler over the live policy: no weight copies needed between steps."""
    return NativeBackend(policy, tokenizer, batch_size=batch_size)


def evaluate_reward(
    backend: GenerationBackend,
    policy: nn.Module | None,
    tokenizer: Any,
    prompts: Sequence[str],
    truths: Sequence[str],
    reward_fn: RewardFn,
    params: SamplingParams,
    entropy_batch_size: int = 32,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """`log_generations` over a whole evaluation set, with entropies scored in chunks (memory stays bounded).

    Returns per-example records and a summary: mean reward, format and answer reward, mean token entropy,
    response length (all / correct / incorrect), generated tokens and generation tokens per second.
    """
    start = time.perf_counter()
    records, _ = log_generations(backend, prompts, truths, reward_fn, params)
    gen_seconds = time.perf_counter() - start
    if policy is not None and records:
        entropies: list[float] = []
        for chunk in chunks(records, entropy_batch_size):
            entropies += response_entropies(policy, tokenizer, [r["prompt"] for r in chunk],
                                            [r["response"] for r in chunk])
        for record, entropy in zip(records, entropies, strict=True):
            record["mean_token_entropy"] = entropy
    return records, summarize_generations(records, gen_seconds)


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize_generations(records: Sequence[dict[str, Any]], gen_seconds: float | None = None) -> dict[str, Any]:
    correct = [r["response_tokens"] for r in records if r["reward"] > 0]
    wrong = [r["response_tokens"] for r in records if r["reward"] <= 0]
    tokens = sum(correct) + sum(wrong)
    summary: dict[str, Any] = {
        "n": len(records),
        "reward": _mean([r["reward"] for r in records]),
        "format_reward": _mean([r.get("format_reward", 0.0) for r in records]),
        "answer_reward": _mean([r.get("answer_reward", 0.0) for r in records]),
        "mean_token_entropy": _mean([r["mean_token_entropy"] for r in records
                                     if r.get("mean_token_entropy") is not None]),
        "response_length": _mean(correct + wrong),
        "response_length_correct": _mean(correct),
        "response_length_incorrect": _mean(wrong),
        "generated_tokens": tokens,
    }
    if gen_seconds is not None:
        summary["generation_seconds"] = gen_seconds
        summary["generation_tokens_per_s"] = tokens / gen_seconds if gen_seconds > 0 else None
    return summary


class Deadline:
    """A wall-clock budget; loops check it between steps and stop cleanly (after a checkpoint)."""

    def __init__(self, seconds: float | None):
        self.end = None if seconds is None else time.monotonic() + seconds

    def passed(self) -> bool:
        return self.end is not None and time.monotonic() >= self.end

    def left(self) -> float:
        return float("inf") if self.end is None else self.end - time.monotonic()
