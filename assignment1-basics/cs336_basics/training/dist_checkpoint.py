"""Sharded checkpoints of ddp/fsdp runs (`torch.distributed.checkpoint`), resumable at any world size, and their
export to the plain single-file `checkpoint.pt` that `generate`, `export-hf` and `load_run` read.

    out_dir/dcp/step_00001000/   .metadata, one __<rank>_0.distcp per rank, trainer_state.pt (rank 0)
    out_dir/dcp/LATEST           the name of the newest complete checkpoint

A checkpoint is written into `dcp/.tmp-step_N/`, renamed into place once every rank has finished and only
then named in LATEST (written atomically), so a crash at any point leaves the previous checkpoint loadable;
older ones are removed after. Model and optimizer are saved under their plain parameter names
(`get_state_dict` strips DDP/FSDP/compile wrappers), so DCP reshards them on load: a checkpoint resumes under
ddp or fsdp at any world size, and in a single process (`--parallel none`), without a process group.
"""

from __future__ import annotations

import os
import shutil
import warnings
from typing import TYPE_CHECKING, Any

from cs336_basics.cli_support import UserError, atomic_write

if TYPE_CHECKING:
    from cs336_basics.training.distributed import Dist

DCP_DIR = "dcp"
LATEST = "LATEST"
TRAINER_STATE = "trainer_state.pt"


def _name(step: int) -> str:
    return f"step_{step:08d}"


def latest(out_dir: str) -> tuple[str, int] | None:
    """(folder, step) of the newest complete sharded checkpoint in a run folder, or None; torch-free."""
    pointer = os.path.join(out_dir, DCP_DIR, LATEST)
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as f:
        name = f.read().strip()
    path = os.path.join(out_dir, DCP_DIR, name)
    try:
        step = int(name.removeprefix("step_"))
    except ValueError:
        raise UserError(f"{pointer} names {name!r}, not a checkpoint of `cs336-basics train`") from None
    if not (os.path.isfile(os.path.join(path, ".metadata")) and os.path.isfile(os.path.join(path, TRAINER_STATE))):
        raise UserError(f"{pointer} names {name}, which is missing or incomplete in {os.path.dirname(pointer)}")
    return path, step


def save(out_dir: str, step: int, module, optimizer, trainer_state: dict[str, Any], dist: Dist) -> str:
    """Every rank writes its shards; rank 0 adds the trainer state, renames the folder into place and points
    LATEST at it. Collective: all ranks call it at the same step."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    root = os.path.join(out_dir, DCP_DIR)
    final = os.path.join(root, _name(step))
    tmp = os.path.join(root, ".tmp-" + _name(step))
    if dist.is_main:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run that died while writing this step
    dist.barrier()
    model_state, optimizer_state = get_state_dict(module, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=tmp, process_group=dist.control)
    if dist.is_main:
        with open(os.path.join(tmp, TRAINER_STATE), "wb") as f:
            torch.save(trainer_state, f)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        old = None
        if os.path.exists(final):  # the same step written again (a resumed run that re-reached it)
            old = os.path.join(root, ".old-" + _name(step))
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        with atomic_write(os.path.join(root, LATEST)) as f:
            f.write(_name(step) + "\n")
        _fsync_dir(root)
        for entry in os.listdir(root):  # superseded checkpoints and leftovers of interrupted writes
            if entry not in (_name(step), LATEST) and (entry.startswith(("step_", ".tmp-step_", ".old-step_"))):
                shutil.rmtree(os.path.join(root, entry), ignore_errors=True)
    dist.barrier()
    return final


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_trainer_state(path: str) -> dict[str, Any]:
    """{"iteration", "extra" (what checkpoint.pt keeps as extra), "config", "world_size", "parallel"}."""
    import torch

    file = os.path.join(path, TRAINER_STATE)
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or foreign: not loadable either way
        lines = str(e).strip().splitlines()
        raise UserError(f"cannot read {file}: {lines[0] if lines else type(e).__name__}") from e
    if not isinstance(state, dict) or not {"iteration", "extra"} <= set(state):
        raise UserError(f"{file} is not a trainer state of `cs336-basics train`")
    return state


def load(path: str, module, optimizer, dist: Dist | None) -> None:
    """Loads a sharded checkpoint into `module` (plain, DDP or FSDP) and `optimizer`, resharding to this run's
    world size; `dist=None` reads it in this process alone (no process group needed)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(module, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    try:
        if dist is None or not dist.enabled:
            with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
                warnings.simplefilter("ignore", UserWarning)
                dcp.load(state, checkpoint_id=path, no_dist=True)
        else:
            dcp.load(state, checkpoint_id=path, process_group=dist.control)
    except (CheckpointException, RuntimeError, KeyError, ValueError) as e:  # another model or optimizer
        failures = getattr(e, "failures", None)  # CheckpointException: the ranks' own errors
        cause = next(iter(failures.values())) if failures else e
        if isinstance(cause, tuple):  # (exception, traceback) in some versions
            cause = cause[0]
        lines = [line.strip() for line in str(cause).strip().splitlines()] or [type(cause).__name__]
        error = UserError(f"--resume: {path} does not fit this model and optimizer: {' '.join(lines[:2])[:300]}")
        error.every_rank = True  # the same checkpoint on every rank
        raise error from e
    set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def consolidate(run_dir: str, out: str | None = None) -> dict[str, Any]:
    """Writes the newest sharded checkpoint of `run_dir` as one `checkpoint.pt` (model, optimizer, iteration,
    extra: the format single-process runs write), read in this process alone. Returns a summary."""
    import dataclasses

    from cs336_basics.checkpoint import save_checkpoint
    from cs336_basics.model import ConfigError, TransformerConfig, TransformerLM
    from cs336_basics.training.config import TrainConfig
    from cs336_basics.training.trainer import build_optimizer

    found = latest(run_dir)
    if found is None:
        raise UserError(f"no sharded checkpoint in {os.path.join(run_dir, DCP_DIR)} "
                        "(written by `cs336-basics train --parallel ddp|fsdp`)")
    path, step = found
    state = read_trainer_state(path)
    extra = state["extra"]
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    saved = {k: v for k, v in (state.get("config") or {}).items() if k in fields}
    saved.update(resume=False, overwrite=False, parallel="none")
    try:
        config = TrainConfig(**saved)
        model = TransformerLM(TransformerConfig.from_dict(extra["model_config"]))
    except (ConfigError, TypeError, KeyError) as e:
        raise UserError(f"{path} records a configuration this version cannot build: {e}") from e
    optimizer = build_optimizer(model, config)
    load(path, model, optimizer, None)
    out = out or os.path.join(run_dir, "checkpoint.pt")
    save_checkpoint(model, optimizer, step, out, extra=extra)
    return {"checkpoint": out, "step": step, "from": path, "world_size": state.get("world_size"),
            "parallel": state.get("parallel")}
