"""The training loop: AdamW or Muon + cosine schedule + clipping over memory-mapped tokens, with exact resume;
bf16 autocast or fp16 with dynamic loss scaling; an optional loss-spike guard; MoE balancing (the
auxiliary-loss-free bias update after each step, an optional auxiliary loss, per-expert load in the log).

Everything the user gave is checked before the run folder is touched (flags, token files, the folder itself, a
checkpoint to resume), so a rejected run leaves an existing one byte-identical. SIGINT/SIGTERM end the run
after the current step with a checkpoint (exit 130/143); `--resume` continues it exactly. torch is imported
only once the cheap checks have passed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from cs336_basics.cli_support import StopRequest, UserError, atomic_write, prepare_run_dir
from cs336_basics.data import check_length, check_token_ids, get_batch, load_tokens
from cs336_basics.training.config import TrainConfig
from cs336_basics.training.metrics import JsonlLog
from cs336_basics.training.spike_guard import SpikeGuard

if TYPE_CHECKING:
    import torch

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"


class TrainingDiverged(UserError, FloatingPointError):
    """The loss became NaN/inf: a result of the chosen hyperparameters, reported in one line (a sweep records
    it and goes on: it is still a `FloatingPointError`)."""


class TrainingStopped(SystemExit):
    """Raised after a SIGINT/SIGTERM stop has written its checkpoint: exits with 130/143 and no traceback."""


def resolve_device(name: str) -> torch.device:
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UserError(f"--device {name!r} is not a device (cpu, cuda, cuda:1, mps, auto)") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name!r} requested but CUDA is not available")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name!r} requested but MPS is not available")
    return device


def _autocast(device: torch.device, precision: str):
    import torch

    if precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(device_type=device.type, dtype=dtype)
    return contextlib.nullcontext()


def load_token_files(config: TrainConfig) -> tuple[np.ndarray, np.ndarray]:
    """Both token files, memory-mapped and checked: integer ids, all in [0, vocab_size), a window long."""
    if not config.train_data or not config.val_data:
        raise UserError("--train-data and --val-data must name token files (see `cs336-basics encode`)")
    loaded = []
    for path in (config.train_data, config.val_data):
        tokens = load_tokens(path)
        check_length(tokens, config.context_length, path)
        check_token_ids(tokens, config.vocab_size, path)
        loaded.append(tokens)
    return loaded[0], loaded[1]


def check_run_dir(config: TrainConfig) -> None:
    """Before anything heavy: a folder holding a run needs --resume or --overwrite; --resume needs a checkpoint.
    (Nothing is deleted here: --overwrite removes the old run files only once the new run is ready to start.)"""
    if not config.overwrite:
        prepare_run_dir(config.out_dir, resume=config.resume, overwrite=False)
    checkpoint = os.path.join(config.out_dir, CHECKPOINT)
    if config.resume and not os.path.isfile(checkpoint):
        raise UserError(f"--resume: no checkpoint at {checkpoint} (leave out --resume to start a new run)")


def _resume_state(config: TrainConfig, device: torch.device) -> dict[str, Any]:
    """The checkpoint to continue from, checked against the requested architecture."""
    from cs336_basics.checkpoint import load_checkpoint_state
    from cs336_basics.model import ConfigError, TransformerConfig

    path = os.path.join(config.out_dir, CHECKPOINT)
    state = load_checkpoint_state(path, map_location=device)
    extra = state.get("extra") or {}
    saved = extra.get("model_config")
    if saved is not None:
        try:  # a config saved before a field existed gets its default: the model it was trained as
            saved = TransformerConfig.from_dict(saved).to_dict()
        except (ConfigError, TypeError) as e:
            raise UserError(f"--resume: {path} records a model config this version cannot read: {e}") from e
        wanted = config.model_config().to_dict()
        if saved != wanted:
            changed = sorted(k for k in saved if saved[k] != wanted.get(k))
            raise UserError(f"--resume: {path} was trained with another architecture (differs in "
                            f"{', '.join(changed)})")
    if "cpu_rng" not in extra:
        raise UserError(f"--resume: {path} holds no RNG state (not written by `cs336-basics train`)")
    return state


def evaluate(model, tokens, config: TrainConfig, device, precision) -> float:
    """Mean loss over a fixed set of validation windows (own generator: the training RNG is untouched)."""
    import torch

    from cs336_basics.nn_utils import cross_entropy

    model.eval()
    generator = torch.Generator().manual_seed(config.seed + 1)
    losses = []
    with torch.no_grad():
        for _ in range(config.eval_batches):
            x, y = get_batch(tokens, config.batch_size, config.context_length, device, generator=generator)
            with _autocast(device, precision):
                losses.append(cross_entropy(model(x), y).item())
    model.train()
    return float(np.mean(losses))


def train(config: TrainConfig) -> dict[str, Any]:
    """Trains (or resumes) the run in `config.out_dir`; returns a summary with the final losses.

    Raises `TrainingStopped` (exit 130/143) after checkpointing when SIGINT/SIGTERM asked to stop."""
    train_tokens, val_tokens = load_token_files(config)
    check_run_dir(config)
    model_config = config.model_config()  # a combination the model rejects: one line naming the flags

    import torch
    from tqdm.auto import tqdm

    from cs336_basics.checkpoint import save_checkpoint
    from cs336_basics.model import TransformerLM
    from cs336_basics.optim import get_lr_cosine_schedule
    from cs336_basics.training.metrics import peak_flops, training_flops_per_token

    device = resolve_device(config.device)
    precision = config.precision if config.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    if precision == "fp16" and device.type == "mps":
        raise UserError("--precision fp16 needs a CUDA or CPU device (its loss scaler does not run on MPS)")
    if device.type == "cuda" and config.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    state = _resume_state(config, device) if config.resume else None

    torch.manual_seed(config.seed)
    model = TransformerLM(model_config, device=device)
    optimizer = build_optimizer(model, config)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    guard = SpikeGuard(config.spike_guard, config.spike_warmup_steps)
    checkpoint_path = os.path.join(config.out_dir, CHECKPOINT)
    start_step, elapsed_before = 0, 0.0
    if state is not None:
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            if "grad_scaler" in state["extra"]:
                scaler.load_state_dict(state["extra"]["grad_scaler"])
            if "spike_guard" in state["extra"]:
                guard.load_state_dict(state["extra"]["spike_guard"])
        except (RuntimeError, ValueError, KeyError, TypeError) as e:  # weights of another shape or model
            lines = [line.strip() for line in str(e).strip().splitlines()] or [type(e).__name__]
            reason = " ".join(lines[:2])[:300]  # the header and the first mismatch
            raise UserError(f"--resume: {checkpoint_path} does not fit this model: {reason}") from e
        start_step = state["iteration"]
        elapsed_before = state["extra"].get("elapsed_s", 0.0)
        torch.set_rng_state(state["extra"]["cpu_rng"].cpu())
        if device.type == "cuda" and "cuda_rng" in state["extra"]:
            torch.cuda.set_rng_state(state["extra"]["cuda_rng"].cpu())

    if config.wandb:  # an absent optional dependency is the user's to fix, and found before the folder changes
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise UserError("--wandb needs the optional dependency: uv sync --extra wandb")
    with StopRequest() as stop:  # from here on the folder changes: a signal ends with a checkpoint
        prepare_run_dir(config.out_dir, resume=config.resume, overwrite=config.overwrite)
        os.makedirs(config.out_dir, exist_ok=True)
        with atomic_write(os.path.join(config.out_dir, "config.json")) as f:
            json.dump(dataclasses.asdict(config), f, indent=2)
        log = JsonlLog(os.path.join(config.out_dir, METRICS), start_step if config.resume else None)
        run = _init_wandb(config) if config.wandb else None

        step_fn = _make_step(model, optimizer, scaler, guard, config, device, precision)
        flops_per_token = training_flops_per_token(model)
        peak = config.peak_flops or peak_flops(device, precision, config.tf32)

        def checkpoint(step: int) -> None:
            extra = {"model_config": model_config.to_dict(), "elapsed_s": elapsed_before + time.time() - t0,
                     "cpu_rng": torch.get_rng_state(), "grad_scaler": scaler.state_dict(),
                     "spike_guard": guard.state_dict()}
            if device.type == "cuda":
                extra["cuda_rng"] = torch.cuda.get_rng_state()
            save_checkpoint(model, optimizer, step, checkpoint_path, extra=extra)

        t0 = time.time()
        window_start, window_steps = time.time(), 0
        last_train_loss, last_val_loss = math.nan, math.nan
        end_step = config.max_steps
        if config.stop_after_steps:
            end_step = min(end_step, start_step + config.stop_after_steps)
        bar = tqdm(range(start_step, end_step), initial=start_step, total=config.max_steps,
                   disable=not config.progress, desc="train", unit="step")
        step, stopping = start_step, False
        for step in bar:
            lr = get_lr_cosine_schedule(step, config.lr_max, config.lr_min, config.warmup_steps, config.max_steps)
            loss, grad_norm, extras = step_fn(train_tokens, lr)
            window_steps += 1
            done = step + 1
            if done % config.log_interval == 0 or done == end_step:
                last_train_loss = loss.item()  # the only host sync of the step, once per log interval
                now = time.time()
                tokens_per_s = window_steps * config.tokens_per_step / (now - window_start)
                record = {"step": done, "split": "train", "loss": last_train_loss, "lr": lr,
                          "grad_norm": grad_norm.item(), "tokens": done * config.tokens_per_step,
                          "wall_s": elapsed_before + now - t0, "tokens_per_s": tokens_per_s}
                if peak:
                    record["mfu"] = tokens_per_s * flops_per_token / peak
                record.update(extras())
                log.write(record)
                if run:
                    run.log(record, step=done)
                if not math.isfinite(last_train_loss):
                    bar.close()
                    raise TrainingDiverged(f"training diverged: loss {last_train_loss} at step {done} "
                                           f"(try a lower --lr-max or --grad-clip)")
                bar.set_postfix(loss=f"{last_train_loss:.3f}", tok_s=f"{tokens_per_s:,.0f}")
                window_start, window_steps = time.time(), 0
            if done % config.eval_interval == 0 or done == config.max_steps:
                last_val_loss = evaluate(model, val_tokens, config, device, precision)
                record = {"step": done, "split": "val", "loss": last_val_loss,
                          "tokens": done * config.tokens_per_step, "wall_s": elapsed_before + time.time() - t0}
                log.write(record)
                if run:
                    run.log({"val_loss": last_val_loss}, step=done)
                bar.write(f"step {done}: val loss {last_val_loss:.4f}")
                window_start = time.time()  # evaluation time is not training throughput
            stopping = stop.requested and done < end_step  # read once: a signal may land while we checkpoint
            out_of_time = config.time_limit_s and time.time() - t0 > config.time_limit_s
            if done % config.checkpoint_interval == 0 or done == end_step or out_of_time or stopping:
                checkpoint(done)
            if stopping:
                log.write({"step": done, "split": "event", "event": "stopped", "signal": stop.name,
                           "wall_s": elapsed_before + time.time() - t0})
                end_step = done
                break
            if out_of_time:
                bar.write(f"time limit reached after step {done}; resume with --resume")
                end_step = done
                break
        bar.close()
        if run:
            run.finish()
    if stopping:
        print(f"cs336-basics train: stopped by {stop.name} after step {done}; checkpoint written to "
              f"{checkpoint_path}; continue with --resume", file=sys.stderr, flush=True)
        raise TrainingStopped(stop.exit_code)
    return {"steps": end_step if start_step < end_step else step, "train_loss": last_train_loss,
            "val_loss": last_val_loss, "finished": end_step >= config.max_steps, "out_dir": config.out_dir,
            "wall_s": elapsed_before + time.time() - t0, "num_parameters": model.num_parameters(),
            "num_active_parameters": model.num_active_parameters(), "skipped_steps": guard.skipped}


def build_optimizer(model, config: TrainConfig):
    """AdamW for everything, or Muon for the hidden matrices (at `muon_lr`, following the same schedule) with
    AdamW for embeddings, LM head, gains and routers."""
    from cs336_basics.optim import AdamW, Muon, muon_param_groups

    betas = (config.beta1, config.beta2)
    if config.optimizer == "muon":
        scale = config.muon_lr / config.lr_max if config.muon_lr and config.lr_max else 1.0
        return Muon(muon_param_groups(model, muon_lr_scale=scale), lr=config.lr_max, momentum=config.muon_momentum,
                    weight_decay=config.weight_decay, betas=betas, eps=config.adam_eps)
    return AdamW(model.parameters(), lr=config.lr_max, betas=betas, eps=config.adam_eps,
                 weight_decay=config.weight_decay)


def _make_step(model, optimizer, scaler, guard: SpikeGuard, config: TrainConfig, device, precision):
    """One optimizer step; the forward+backward is optionally compiled (the optimizer stays eager).

    Returns (loss, grad norm, extras): the first two stay on the device (no host sync unless the spike guard
    needs the values); `extras()` gives the log fields of the latest step (MoE load, aux loss, skips)."""
    import torch

    from cs336_basics.nn_utils import cross_entropy
    from cs336_basics.optim import clip_gradients

    compiled = torch.compile(model) if config.compile else model
    moe_layers = model.moe_layers()
    latest: dict[str, Any] = {}

    def step(tokens, lr: float):
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        x, y = get_batch(tokens, config.batch_size, config.context_length, device)
        with _autocast(device, precision):
            loss = cross_entropy(compiled(x), y)
        objective = loss
        if moe_layers and config.moe_aux_loss_coef > 0:
            latest["aux_loss"] = torch.stack([m.last_aux_loss for m in moe_layers]).sum()
            objective = loss + config.moe_aux_loss_coef * latest["aux_loss"]
        scaler.scale(objective).backward()
        scaler.unscale_(optimizer)  # clipping and the guard see the true gradients
        grad_norm = clip_gradients(model.parameters(), config.grad_clip)
        if not guard.enabled or guard.allows(loss.item(), grad_norm.item()):
            scaler.step(optimizer)  # skipped by the scaler itself when fp16 gradients overflowed
            latest["moe_load"] = [m.update_bias(config.moe_bias_update_rate) for m in moe_layers]
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach(), grad_norm, extras

    def extras() -> dict[str, Any]:
        record: dict[str, Any] = {}
        if guard.enabled:
            record["skipped_steps"] = guard.skipped
        if scaler.is_enabled():
            record["loss_scale"] = scaler.get_scale()
        if "aux_loss" in latest:
            record["aux_loss"] = latest["aux_loss"].item()
        if latest.get("moe_load"):
            loads = [load.float().tolist() for load in latest["moe_load"]]  # per layer: fraction per expert
            record["moe_load"] = [[round(f, 5) for f in layer] for layer in loads]
            record["moe_load_max"] = [max(layer) for layer in loads]
            record["moe_load_min"] = [min(layer) for layer in loads]
        return record

    return step


def _init_wandb(config: TrainConfig):
    try:
        import wandb
    except ImportError as e:
        raise UserError("--wandb needs the optional dependency: uv sync --extra wandb") from e
    return wandb.init(project=config.wandb_project, config=dataclasses.asdict(config),
                      name=os.path.basename(config.out_dir.rstrip("/")))
