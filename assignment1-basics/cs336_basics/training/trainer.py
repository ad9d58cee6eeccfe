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
from cs336_basics.data import check_length, check_token_ids, load_tokens
from cs336_basics.training.config import TrainConfig
from cs336_basics.training.gc_schedule import ScheduledGC
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
    """Before anything heavy: a folder holding a run needs --resume or --overwrite; --resume needs a checkpoint
    (checkpoint.pt or a sharded one in dcp/). (Nothing is deleted here: --overwrite removes the old run files
    only once the new run is ready to start.)"""
    from cs336_basics.cli_support.atomic import RUN_MARKERS
    from cs336_basics.training import dist_checkpoint

    if not config.overwrite:
        prepare_run_dir(config.out_dir, resume=config.resume, overwrite=False,
                        markers=(*RUN_MARKERS, dist_checkpoint.DCP_DIR))
    checkpoint = os.path.join(config.out_dir, CHECKPOINT)
    if config.resume and not os.path.isfile(checkpoint) and dist_checkpoint.latest(config.out_dir) is None:
        raise UserError(f"--resume: no checkpoint at {checkpoint} (leave out --resume to start a new run)")


def _check_architecture(saved: dict | None, config: TrainConfig, path: str) -> None:
    from cs336_basics.model import ConfigError, TransformerConfig

    if saved is None:
        return
    try:  # a config saved before a field existed gets its default: the model it was trained as
        saved = TransformerConfig.from_dict(saved).portable().to_dict()
    except (ConfigError, TypeError) as e:
        raise UserError(f"--resume: {path} records a model config this version cannot read: {e}") from e
    wanted = config.model_config().portable().to_dict()  # any attention backend resumes any run
    if saved != wanted:
        changed = sorted(k for k in saved if saved[k] != wanted.get(k))
        raise UserError(f"--resume: {path} was trained with another architecture (differs in "
                        f"{', '.join(changed)})")


def _peek_iteration(path: str) -> int | None:
    """The step of a checkpoint.pt without reading its tensors (memory-mapped); None when unreadable."""
    import torch

    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["iteration"])
    except Exception:
        return None


def _resume_state(config: TrainConfig, device: torch.device) -> dict[str, Any]:
    """The checkpoint to continue from, checked against the requested architecture: the newer of checkpoint.pt
    and the newest sharded checkpoint (at equal steps, the one this mode writes). A sharded one gives
    {"iteration", "extra", "sharded": folder}; checkpoint.pt gives its whole dict."""
    from cs336_basics.checkpoint import load_checkpoint_state
    from cs336_basics.training import dist_checkpoint

    path = os.path.join(config.out_dir, CHECKPOINT)
    sharded = dist_checkpoint.latest(config.out_dir)
    if sharded is not None and os.path.isfile(path):
        step = _peek_iteration(path)
        if step is not None and (step > sharded[1] or (step == sharded[1] and config.parallel == "none")):
            sharded = None
    if sharded is not None:
        folder = sharded[0]
        state = dist_checkpoint.read_trainer_state(folder)
        _check_architecture(state["extra"].get("model_config"), config, folder)
        return {"iteration": state["iteration"], "extra": state["extra"], "sharded": folder}
    state = load_checkpoint_state(path, map_location=device if config.parallel == "none" else "cpu")
    extra = state.get("extra") or {}
    _check_architecture(extra.get("model_config"), config, path)
    if "cpu_rng" not in extra:
        raise UserError(f"--resume: {path} holds no RNG state (not written by `cs336-basics train`)")
    return state


def evaluate(model, tokens, config: TrainConfig, device, precision, dist=None) -> float:
    """Mean loss over a fixed set of validation windows (own generator: the training RNG is untouched). The
    windows are the same at every world size: each rank takes its share of every batch, in micro-batches, and
    the token-loss sums are all-reduced. Under --loss-impl chunked (or fused) the loss is computed chunk by chunk
    like in training (the full logits of a leaderboard batch alone are 2 GB bf16 + 4 GB float32)."""
    import torch

    from cs336_basics import chunked_ce
    from cs336_basics.data import batch_at
    from cs336_basics.nn_utils import cross_entropy

    def loss_of(x, y):
        if config.loss_impl in ("chunked", "fused"):  # fused: the kernel's loss-only pass over each chunk
            return chunked_ce.chunked_linear_cross_entropy(model(x, return_hidden=True), model.lm_head.weight, y,
                                                           config.loss_chunk_tokens,
                                                           fused=config.loss_impl == "fused")
        return cross_entropy(model(x), y)  # onepass differs from full in its backward only

    rank, world_size = (dist.rank, dist.world_size) if dist is not None else (0, 1)
    share = config.batch_size // world_size
    micro = share // config.grad_accum if share % config.grad_accum == 0 else share
    model.eval()
    generator = torch.Generator().manual_seed(config.seed + 1)
    num_starts = len(tokens) - config.context_length
    total = 0.0
    with torch.no_grad():
        for _ in range(config.eval_batches):
            starts = torch.randint(0, num_starts, (config.batch_size,), generator=generator).numpy()
            mine = starts[rank * share:(rank + 1) * share]
            for first in range(0, share, micro):
                x, y = batch_at(tokens, mine[first:first + micro], config.context_length, device)
                with _autocast(device, precision):
                    total += loss_of(x, y).item() * len(x)
    model.train()
    if dist is not None and dist.world_size > 1:
        total = dist.all_sum_(torch.tensor(total, dtype=torch.float64, device=dist.device)).item()
    return total / (config.eval_batches * config.batch_size)


def train(config: TrainConfig) -> dict[str, Any]:
    """Trains (or resumes) the run in `config.out_dir`; returns a summary with the final losses.

    Under torchrun with `--parallel ddp|fsdp` every rank calls this (see `training/distributed.py`); rank 0
    alone writes metrics, config, progress and wandb. Errors found before training starts are the same on
    every rank and carry `every_rank = True` (the CLI reports them on rank 0 only).

    Raises `TrainingStopped` (exit 130/143) after checkpointing when SIGINT/SIGTERM asked to stop."""
    from cs336_basics.training.distributed import check_launch, read_launch

    try:
        launch = read_launch()
        check_launch(config, launch)
        train_tokens, val_tokens = load_token_files(config)
        check_run_dir(config)
        model_config = config.model_config()  # a combination the model rejects: one line naming the flags
        device = resolve_device(config.device)
    except UserError as e:
        e.every_rank = True
        raise

    from cs336_basics.training.distributed import Dist, rank_device

    device = rank_device(device, launch, config.parallel)
    dist = Dist(launch, config.parallel, device, config.dist_timeout_s)
    dist.start()
    finished = False
    try:
        with dist.failures_as_one_line():
            summary = _train(config, model_config, train_tokens, val_tokens, device, dist)
        finished = True
        return summary
    except TrainingStopped:
        finished = True
        raise
    finally:
        if finished:
            dist.close()


def _train(config: TrainConfig, model_config, train_tokens, val_tokens, device, dist) -> dict[str, Any]:
    import torch
    from tqdm.auto import tqdm

    from cs336_basics.checkpoint import save_checkpoint
    from cs336_basics.model import TransformerLM
    from cs336_basics.optim import get_lr_cosine_schedule
    from cs336_basics.training import dist_checkpoint
    from cs336_basics.training.distributed import wrap_model
    from cs336_basics.training.metrics import peak_flops, training_flops_per_token

    main = dist.is_main
    precision = config.precision if config.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    if precision == "fp16" and device.type == "mps":
        raise UserError("--precision fp16 needs a CUDA or CPU device (its loss scaler does not run on MPS)")
    if device.type == "cuda" and config.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    try:  # the same files on every rank: the same verdict
        state = _resume_state(config, device) if config.resume else None
    except UserError as e:
        e.every_rank = True
        raise

    if config.residual_dtype == "bf16" and precision != "bf16":
        raise UserError(f"--residual-dtype bf16 needs bf16 precision; this run's is {precision} "
                        "(--precision auto is bf16 on CUDA only)")
    torch.manual_seed(config.seed)
    model = TransformerLM(model_config, device=device)
    apply_activation_flags(model, config, precision)
    flops_per_token = training_flops_per_token(model)  # before sharding: counts read whole parameters
    num_parameters, num_active = model.num_parameters(), model.num_active_parameters()
    checkpoint_path = os.path.join(config.out_dir, CHECKPOINT)
    plain = state is not None and "sharded" not in state  # a checkpoint.pt
    if plain:
        try:
            model.load_state_dict(state["model"])
        except (RuntimeError, ValueError, KeyError, TypeError) as e:  # weights of another shape or model
            _does_not_fit(checkpoint_path, e)
    wrapped = wrap_model(model, config.parallel, device, precision, config.compile, config.compile_mode,
                         config.fsdp_reshard, config.fsdp_units)
    optimizer = build_optimizer(model, config)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    guard = SpikeGuard(config.spike_guard, config.spike_warmup_steps)
    start_step, elapsed_before = 0, 0.0
    if state is not None:
        if plain:
            try:
                _load_plain_optimizer(state, model, model_config, optimizer, config)
            except (RuntimeError, ValueError, KeyError, TypeError) as e:
                _does_not_fit(checkpoint_path, e)
        else:
            dist_checkpoint.load(state["sharded"], wrapped.state_module, optimizer, dist)
        if "grad_scaler" in state["extra"]:
            scaler.load_state_dict(state["extra"]["grad_scaler"])
        if "spike_guard" in state["extra"]:
            guard.load_state_dict(state["extra"]["spike_guard"])
        start_step = state["iteration"]
        elapsed_before = state["extra"].get("elapsed_s", 0.0)
        if config.parallel == "none" and "cpu_rng" in state["extra"]:
            torch.set_rng_state(state["extra"]["cpu_rng"].cpu())
        if config.parallel == "none" and device.type == "cuda" and "cuda_rng" in state["extra"]:
            torch.cuda.set_rng_state(state["extra"]["cuda_rng"].cpu())
        state = None  # the weights now live in the model and optimizer

    if config.wandb and main:  # an absent optional dependency is the user's to fix, found before the folder changes
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise UserError("--wandb needs the optional dependency: uv sync --extra wandb")
    with StopRequest(announce=main) as stop, ScheduledGC(config.gc_interval) as collector:
        # from here on the folder changes: a signal ends with a checkpoint
        if main:
            if config.overwrite:
                import shutil

                shutil.rmtree(os.path.join(config.out_dir, dist_checkpoint.DCP_DIR), ignore_errors=True)
            prepare_run_dir(config.out_dir, resume=config.resume, overwrite=config.overwrite)
            os.makedirs(config.out_dir, exist_ok=True)
            with atomic_write(os.path.join(config.out_dir, "config.json")) as f:
                json.dump(dataclasses.asdict(config), f, indent=2)
        dist.barrier()
        log = JsonlLog(os.path.join(config.out_dir, METRICS), start_step if config.resume else None) if main else None
        run = _init_wandb(config) if config.wandb and main else None

        step_fn = _make_step(model, wrapped, optimizer, scaler, guard, config, device, precision, dist)
        peak = config.peak_flops or peak_flops(device, precision, config.tf32)
        peak = peak * dist.world_size if peak else peak  # MFU of the whole job

        def checkpoint(step: int, final: bool) -> None:
            extra = {"model_config": model_config.portable().to_dict(), "elapsed_s": elapsed_before + time.time() - t0,
                     "cpu_rng": torch.get_rng_state(), "grad_scaler": scaler.state_dict(),
                     "spike_guard": guard.state_dict()}
            if device.type == "cuda":
                extra["cuda_rng"] = torch.cuda.get_rng_state()
            if not dist.enabled:
                save_checkpoint(model, optimizer, step, checkpoint_path, extra=extra)
                return
            trainer_state = {"iteration": step, "extra": extra, "config": dataclasses.asdict(config),
                             "world_size": dist.world_size, "parallel": config.parallel}
            dist_checkpoint.save(config.out_dir, step, wrapped.state_module, optimizer, trainer_state, dist)
            if final:  # the plain single-file checkpoint for generate / export-hf, from the files just written
                if main:
                    dist_checkpoint.consolidate(config.out_dir)
                dist.barrier()

        t0 = time.time()
        window_start, window_steps = time.time(), 0
        last_train_loss, last_val_loss = math.nan, math.nan
        end_step = config.max_steps
        if config.stop_after_steps:
            end_step = min(end_step, start_step + config.stop_after_steps)
        bar = tqdm(range(start_step, end_step), initial=start_step, total=config.max_steps,
                   disable=not config.progress or not main, desc="train", unit="step")
        step, stopping = start_step, False
        for step in bar:
            lr = get_lr_cosine_schedule(step, config.lr_max, config.lr_min, config.warmup_steps, config.max_steps)
            loss, grad_norm, extras = step_fn(train_tokens, lr, step)
            window_steps += 1
            done = step + 1
            collector.step(done)
            if done % config.log_interval == 0 or done == end_step:
                last_train_loss = dist.all_mean(loss).item()  # the only host sync of the step, once per interval
                now = time.time()
                tokens_per_s = window_steps * config.tokens_per_step / (now - window_start)
                record = {"step": done, "split": "train", "loss": last_train_loss, "lr": lr,
                          "grad_norm": grad_norm.item(), "tokens": done * config.tokens_per_step,
                          "wall_s": elapsed_before + now - t0, "tokens_per_s": tokens_per_s}
                if peak:
                    record["mfu"] = tokens_per_s * flops_per_token / peak
                record.update(extras())
                if log:
                    log.write(record)
                if run:
                    run.log(record, step=done)
                if not math.isfinite(last_train_loss):  # the same on every rank: all stop here
                    bar.close()
                    error = TrainingDiverged(f"training diverged: loss {last_train_loss} at step {done} "
                                             f"(try a lower --lr-max or --grad-clip)")
                    error.every_rank = True
                    raise error
                bar.set_postfix(loss=f"{last_train_loss:.3f}", tok_s=f"{tokens_per_s:,.0f}")
                window_start, window_steps = time.time(), 0
            if done % config.eval_interval == 0 or done == config.max_steps:
                last_val_loss = evaluate(model, val_tokens, config, device, precision, dist)
                record = {"step": done, "split": "val", "loss": last_val_loss,
                          "tokens": done * config.tokens_per_step, "wall_s": elapsed_before + time.time() - t0}
                if log:
                    log.write(record)
                if run:
                    run.log({"val_loss": last_val_loss}, step=done)
                if main:
                    bar.write(f"step {done}: val loss {last_val_loss:.4f}")
                window_start = time.time()  # evaluation time is not training throughput
            # read once (a signal may land while we checkpoint) and agreed by every rank
            stopping, out_of_time = dist.any(stop.requested and done < end_step,
                                             bool(config.time_limit_s) and time.time() - t0 > config.time_limit_s)
            final = done == end_step or out_of_time or stopping
            if done % config.checkpoint_interval == 0 or final:
                checkpoint(done, final)
            if stopping:
                if log:
                    log.write({"step": done, "split": "event", "event": "stopped", "signal": stop.name or "SIGTERM",
                               "wall_s": elapsed_before + time.time() - t0})
                end_step = done
                break
            if out_of_time:
                if main:
                    bar.write(f"time limit reached after step {done}; resume with --resume")
                end_step = done
                break
        bar.close()
        if run:
            run.finish()
    if stopping:
        if main:
            where = checkpoint_path if not dist.enabled else f"{config.out_dir} (dcp/ and {CHECKPOINT})"
            print(f"cs336-basics train: stopped by {stop.name or 'SIGTERM'} after step {done}; checkpoint written "
                  f"to {where}; continue with --resume", file=sys.stderr, flush=True)
        raise TrainingStopped(stop.exit_code or 143)
    return {"steps": end_step if start_step < end_step else step, "train_loss": last_train_loss,
            "val_loss": last_val_loss, "finished": end_step >= config.max_steps, "out_dir": config.out_dir,
            "wall_s": elapsed_before + time.time() - t0, "num_parameters": num_parameters,
            "num_active_parameters": num_active, "skipped_steps": guard.skipped, "world_size": dist.world_size,
            "parallel": config.parallel}


def _does_not_fit(path: str, e: BaseException):
    lines = [line.strip() for line in str(e).strip().splitlines()] or [type(e).__name__]
    reason = " ".join(lines[:2])[:300]  # the header and the first mismatch
    error = UserError(f"--resume: {path} does not fit this model: {reason}")
    error.every_rank = True  # the same checkpoint on every rank
    raise error from e


def _load_plain_optimizer(state: dict, model, model_config, optimizer, config: TrainConfig) -> None:
    """The optimizer state of a checkpoint.pt; under FSDP via a plain model and optimizer on the CPU, whose
    full state (keyed by parameter name) is then sharded onto this rank."""
    if config.parallel != "fsdp":
        optimizer.load_state_dict(state["optimizer"])
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    from cs336_basics.model import TransformerLM

    plain_model = TransformerLM(model_config)
    plain_model.load_state_dict(state["model"])
    plain_optimizer = build_optimizer(plain_model, config)
    plain_optimizer.load_state_dict(state["optimizer"])
    model_state, optimizer_state = get_state_dict(plain_model, plain_optimizer)
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state,
                   options=StateDictOptions(full_state_dict=True))


def apply_activation_flags(model, config: TrainConfig, precision: str) -> None:
    """The flags that change how activations are stored, not the weights: --residual-dtype, --attention-layout,
    --rope-layout, --value-proj. `precision`: the run's resolved precision (what --residual-dtype auto follows)."""
    import torch

    from cs336_basics.attention import MultiHeadSelfAttention

    bf16_residual = config.residual_dtype == "bf16" or (config.residual_dtype == "auto" and precision == "bf16")
    model.residual_dtype = torch.bfloat16 if bf16_residual else None
    for module in model.modules():
        if isinstance(module, MultiHeadSelfAttention):
            module.sequence_major = config.attention_layout == "bshd"
            module.rope_halves = config.rope_layout == "halves"
            module.separate_value_proj = config.value_proj == "separate"


def build_optimizer(model, config: TrainConfig):
    """AdamW for everything, or Muon for the hidden matrices (at `muon_lr`, following the same schedule) with
    AdamW for embeddings, LM head, gains and routers."""
    from cs336_basics.optim import AdamW, FusedAdamW, Muon, muon_param_groups

    betas = (config.beta1, config.beta2)
    if config.optimizer == "muon":
        scale = config.muon_lr / config.lr_max if config.muon_lr and config.lr_max else 1.0
        return Muon(muon_param_groups(model, muon_lr_scale=scale), lr=config.lr_max, momentum=config.muon_momentum,
                    weight_decay=config.weight_decay, betas=betas, eps=config.adam_eps)
    optimizer_class = FusedAdamW if config.adamw_impl == "fused" else AdamW
    return optimizer_class(model.parameters(), lr=config.lr_max, betas=betas, eps=config.adam_eps,
                           weight_decay=config.weight_decay)


def loss_function(model, wrapped, config: TrainConfig):
    """(inputs, targets) -> mean loss by the configured path. The original: the (optionally compiled) model's
    logits into `cross_entropy`, outside the compiled graph (--loss-impl onepass: `onepass_cross_entropy`).
    --compile-loss: tokens to loss as one compiled graph. --loss-impl chunked: the model's final hidden states
    into `chunked_linear_cross_entropy` (its per-chunk softmax compiled under --compile-loss); --loss-impl fused:
    the same with the per-chunk loss and gradient as one Triton pass over the logits (`fused_ce.py`)."""
    from cs336_basics.nn_utils import cross_entropy as full_cross_entropy
    from cs336_basics.onepass_ce import onepass_cross_entropy
    from cs336_basics.training.distributed import compiled

    cross_entropy = onepass_cross_entropy if config.loss_impl == "onepass" else full_cross_entropy
    compile_loss = config.compile and config.compile_loss
    if config.loss_impl in ("chunked", "fused"):
        from cs336_basics.chunked_ce import chunked_linear_cross_entropy

        fused = config.loss_impl == "fused"

        def chunked_loss(x, y):
            hidden = wrapped.forward(x, return_hidden=True)
            return chunked_linear_cross_entropy(hidden, model.lm_head.weight, y, config.loss_chunk_tokens,
                                                compiled=compile_loss and not fused, fused=fused)

        return chunked_loss
    if compile_loss:
        return compiled(lambda x, y: cross_entropy(model(x), y), config.compile_mode)
    return lambda x, y: cross_entropy(wrapped.forward(x), y)


def _make_step(model, wrapped, optimizer, scaler, guard: SpikeGuard, config: TrainConfig, device, precision, dist):
    """One optimizer step over the global batch of the step: this rank's rows in `grad_accum` micro-batches
    (gradients reduced across ranks on the last); the forward+backward is optionally compiled (the optimizer
    stays eager).

    Returns (loss, grad norm, extras): this rank's mean loss and the global gradient norm stay on the device
    (no host sync unless the spike guard needs the values); `extras()` gives the log fields of the latest step
    (MoE load, aux loss, skips)."""
    import torch

    from cs336_basics.data import Prefetcher, batch_to_device, host_batch, step_batch_starts
    from cs336_basics.optim import clip_gradients
    from cs336_basics.training.distributed import clip_sharded_gradients

    loss_of = loss_function(model, wrapped, config)
    moe_layers = model.moe_layers()
    latest: dict[str, Any] = {}
    accum = config.grad_accum
    micro = config.batch_size // (dist.world_size * accum)
    prefetch: dict[str, Any] = {}  # --prefetch: the Prefetcher of the token array being trained on

    def host_batches(tokens, index: int) -> list:
        """This rank's micro-batches of step `index` in (pinned) host memory (what `batch_at` would move)."""
        starts = step_batch_starts(len(tokens), config.batch_size, config.context_length, config.seed, index)
        firsts = [(dist.rank * accum + m) * micro for m in range(accum)]
        return [host_batch(tokens, starts[f:f + micro], config.context_length, pin=device.type == "cuda")
                for f in firsts]

    def step(tokens, lr: float, index: int):
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        if config.prefetch:
            if prefetch.get("tokens") is not tokens:
                if "prefetcher" in prefetch:
                    prefetch["prefetcher"].close()
                prefetch.update(tokens=tokens, prefetcher=Prefetcher(lambda i: host_batches(tokens, i)))
            batches = prefetch["prefetcher"].get(index)
        else:
            batches = host_batches(tokens, index)
        total = None
        for m in range(accum):
            x, y = batch_to_device(batches[m], device)
            with wrapped.sync(m == accum - 1):
                with _autocast(device, precision):
                    loss = loss_of(x, y)
                objective = loss
                if moe_layers and config.moe_aux_loss_coef > 0:
                    latest["aux_loss"] = torch.stack([layer.last_aux_loss for layer in moe_layers]).sum()
                    objective = loss + config.moe_aux_loss_coef * latest["aux_loss"]
                scaler.scale(objective if accum == 1 else objective / accum).backward()
            total = loss.detach() if total is None else total + loss.detach()
        loss = total if accum == 1 else total / accum
        scaler.unscale_(optimizer)  # clipping and the guard see the true gradients
        if config.parallel == "fsdp":
            grad_norm = clip_sharded_gradients(model.parameters(), config.grad_clip, dist)
        elif config.clip_in_optimizer:
            grad_norm = optimizer.clip_in_next_step(config.grad_clip)
        else:
            grad_norm = clip_gradients(model.parameters(), config.grad_clip)
        if not guard.enabled or guard.allows(dist.all_mean(loss).item(), grad_norm.item()):
            scaler.step(optimizer)  # skipped by the scaler itself when fp16 gradients overflowed
            for layer in moe_layers:  # every rank's routing counts, so the biases stay equal on all ranks
                dist.all_sum_(layer.load_counts)
            latest["moe_load"] = [layer.update_bias(config.moe_bias_update_rate) for layer in moe_layers]
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return loss, grad_norm, extras

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
