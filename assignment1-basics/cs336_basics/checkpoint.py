"""Checkpoints of model + optimizer + iteration: written atomically, loaded with `weights_only=True`."""

import os
import tempfile
from typing import IO, Any, BinaryIO

import torch

from cs336_basics.cli_support import UserError

PathOrFile = str | os.PathLike | BinaryIO | IO[bytes]


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """`torch.compile` wraps the module; checkpoints hold the plain module's keys."""
    return getattr(model, "_orig_mod", model)


def save_checkpoint(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    iteration: int,
    out: PathOrFile,
    extra: dict[str, Any] | None = None,
) -> None:
    """Writes the checkpoint; to a path it goes via a temporary file and `os.replace`, so a crash mid-write
    never leaves a truncated checkpoint behind."""
    state = {
        "model": _unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "iteration": int(iteration),
        "extra": extra or {},
    }
    if not isinstance(out, str | os.PathLike):
        torch.save(state, out)
        return
    out = os.fspath(out)
    directory = os.path.dirname(os.path.abspath(out))
    os.makedirs(directory, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".pt")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, out)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise


def load_checkpoint_state(src: PathOrFile, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The saved dict; a file that is missing, empty, truncated or not ours is one `UserError` naming it."""
    name = os.fspath(src) if isinstance(src, str | os.PathLike) else "checkpoint stream"
    if isinstance(src, str | os.PathLike):
        if os.path.isdir(src):
            raise UserError(f"checkpoint {name} is a folder")
        if not os.path.isfile(src):
            raise FileNotFoundError(f"checkpoint not found: {name}")
        if os.path.getsize(src) == 0:
            raise UserError(f"cannot read checkpoint {name}: the file is empty")
    try:
        state = torch.load(src, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, foreign pickle, disallowed global: all mean "not loadable"
        lines = str(e).strip().splitlines()
        raise UserError(f"cannot read checkpoint {name}: {lines[0] if lines else type(e).__name__}") from e
    if not isinstance(state, dict):
        raise UserError(f"{name} is not a cs336 checkpoint: expected a dict")
    missing = {"model", "optimizer", "iteration"} - set(state)
    if missing:
        raise UserError(f"{name} is not a cs336 checkpoint: missing {sorted(missing)}")
    return state


def load_checkpoint(
    src: PathOrFile,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    map_location: str | torch.device | None = None,
) -> int:
    """Restores model (and optimizer) state in place and returns the saved iteration."""
    if map_location is None:
        map_location = next(model.parameters()).device
    state = load_checkpoint_state(src, map_location)
    _unwrap(model).load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    return state["iteration"]
