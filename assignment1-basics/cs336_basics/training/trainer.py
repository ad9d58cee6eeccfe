"""The training loop: AdamW + cosine schedule + clipping over memory-mapped tokens, with exact resume."""

import contextlib
import dataclasses
import json
import math
import os
import time
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from cs336_basics.checkpoint import load_checkpoint_state, save_checkpoint
from cs336_basics.data import get_batch, load_tokens
from cs336_basics.model import TransformerLM
from cs336_basics.nn_utils import cross_entropy
from cs336_basics.optim import AdamW, clip_gradients, get_lr_cosine_schedule
from cs336_basics.training.config import TrainConfig
from cs336_basics.training.metrics import JsonlLog, peak_flops, training_flops_per_token


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r} requested but MPS is not available")
    return device


def _autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _check_tokens(tokens: np.ndarray, path: str, config: TrainConfig) -> None:
    if len(tokens) <= config.context_length:
        raise ValueError(f"{path}: {len(tokens)} tokens is too few for context_length={config.context_length}")
    sample = np.asarray(tokens[: 1 << 20])
    if sample.max() >= config.vocab_size:
        raise ValueError(f"{path}: token id {int(sample.max())} >= vocab_size={config.vocab_size}")


@torch.no_grad()
def evaluate(model, tokens, config: TrainConfig, device, precision) -> float:
    """Mean loss over a fixed set of validation windows (own generator: the training RNG is untouched)."""
    model.eval()
    generator = torch.Generator().manual_seed(config.seed + 1)
    losses = []
    for _ in range(config.eval_batches):
        x, y = get_batch(tokens, config.batch_size, config.context_length, device, generator=generator)
        with _autocast(device, precision):
            losses.append(cross_entropy(model(x), y).item())
    model.train()
    return float(np.mean(losses))


def train(config: TrainConfig) -> dict[str, Any]:
    """Trains (or resumes) the run in `config.out_dir`; returns a summary with the final losses."""
    if not config.train_data or not config.val_data:
        raise ValueError("train_data and val_data must name token files (see `cs336-basics encode`)")
    device = resolve_device(config.device)
    precision = config.precision if config.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    if device.type == "cuda" and config.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    train_tokens, val_tokens = load_tokens(config.train_data), load_tokens(config.val_data)
    _check_tokens(train_tokens, config.train_data, config)
    _check_tokens(val_tokens, config.val_data, config)

    torch.manual_seed(config.seed)
    model = TransformerLM(config.model_config(), device=device)
    optimizer = AdamW(model.parameters(), lr=config.lr_max, betas=(config.beta1, config.beta2),
                      eps=config.adam_eps, weight_decay=config.weight_decay)
    checkpoint_path = os.path.join(config.out_dir, "checkpoint.pt")
    start_step, elapsed_before = 0, 0.0
    if config.resume:
        if not os.path.isfile(checkpoint_path):
            raise FileNotFoundError(f"--resume: no checkpoint at {checkpoint_path}")
        state = load_checkpoint_state(checkpoint_path, map_location=device)
        saved = state["extra"].get("model_config")
        if saved is not None and saved != config.model_config().to_dict():
            raise ValueError(f"--resume: checkpoint architecture {saved} differs from the requested one")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_step = state["iteration"]
        elapsed_before = state["extra"].get("elapsed_s", 0.0)
        torch.set_rng_state(state["extra"]["cpu_rng"].cpu())
        if device.type == "cuda" and "cuda_rng" in state["extra"]:
            torch.cuda.set_rng_state(state["extra"]["cuda_rng"].cpu())
    os.makedirs(config.out_dir, exist_ok=True)
    with open(os.path.join(config.out_dir, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(config), f, indent=2)
    log = JsonlLog(os.path.join(config.out_dir, "metrics.jsonl"), start_step if config.resume else None)
    run = _init_wandb(config) if config.wandb else None

    step_fn = _make_step(model, optimizer, config, device, precision)
    flops_per_token = training_flops_per_token(model)
    peak = config.peak_flops or peak_flops(device, precision, config.tf32)

    def checkpoint(step: int) -> None:
        extra = {"model_config": config.model_config().to_dict(), "elapsed_s": elapsed_before + time.time() - t0,
                 "cpu_rng": torch.get_rng_state()}
        if device.type == "cuda":
            extra["cuda_rng"] = torch.cuda.get_rng_state()
        save_checkpoint(model, optimizer, step, checkpoint_path, extra=extra)

    t0 = time.time()
    window_start, window_steps = time.time(), 0
    last_train_loss, last_val_loss = math.nan, math.nan
    end_step = config.max_steps
    if config.stop_after_steps:
        end_step = min(end_step, start_step + config.stop_after_steps)
    bar = tqdm(range(start_step, end_step), initial=start_step, total=config.max_steps, disable=not config.progress,
               desc="train", unit="step")
    step = start_step
    for step in bar:
        lr = get_lr_cosine_schedule(step, config.lr_max, config.lr_min, config.warmup_steps, config.max_steps)
        loss, grad_norm = step_fn(train_tokens, lr)
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
            log.write(record)
            if run:
                run.log(record, step=done)
            if not math.isfinite(last_train_loss):
                bar.close()
                raise FloatingPointError(f"training diverged: loss {last_train_loss} at step {done}")
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
        out_of_time = config.time_limit_s and time.time() - t0 > config.time_limit_s
        if done % config.checkpoint_interval == 0 or done == end_step or out_of_time:
            checkpoint(done)
        if out_of_time:
            bar.write(f"time limit reached after step {done}; resume with --resume")
            end_step = done
            break
    bar.close()
    if run:
        run.finish()
    return {"steps": end_step if start_step < end_step else step, "train_loss": last_train_loss,
            "val_loss": last_val_loss, "finished": end_step >= config.max_steps, "out_dir": config.out_dir,
            "wall_s": elapsed_before + time.time() - t0, "num_parameters": model.num_parameters()}


def _make_step(model, optimizer, config: TrainConfig, device, precision):
    """One optimizer step; the forward+backward is optionally compiled (the optimizer stays eager)."""
    compiled = torch.compile(model) if config.compile else model

    def step(tokens, lr: float):
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = get_batch(tokens, config.batch_size, config.context_length, device)
        with _autocast(device, precision):
            loss = cross_entropy(compiled(x), y)
        loss.backward()
        grad_norm = clip_gradients(model.parameters(), config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach(), grad_norm

    return step


def _init_wandb(config: TrainConfig):
    try:
        import wandb
    except ImportError as e:
        raise RuntimeError("--wandb needs the optional dependency: uv sync --extra wandb") from e
    return wandb.init(project=config.wandb_project, config=dataclasses.asdict(config),
                      name=os.path.basename(config.out_dir.rstrip("/")))
