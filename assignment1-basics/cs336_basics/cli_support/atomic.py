"""Outputs that appear whole or not at all, never over an input, and run folders that are not reused by
accident."""

import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import IO, Any

from cs336_basics.cli_support.errors import UserError

PathLike = str | os.PathLike


def _new_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def atomic_path(destination: PathLike, suffix: str | None = None) -> Iterator[str]:
    """A temporary path beside `destination` for writers that take a path (np.save, savefig, torch.save);
    renamed onto `destination` when the block succeeds, removed when it fails. The destination's own
    extension is kept (some writers append one otherwise)."""
    destination = os.fspath(destination)
    directory = os.path.dirname(os.path.abspath(destination))
    if os.path.isdir(destination):
        raise UserError(f"{destination} is a folder; expected a file path")
    os.makedirs(directory, exist_ok=True)
    suffix = os.path.splitext(destination)[1] if suffix is None else suffix
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(destination)}.", suffix=suffix)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, _new_file_mode())  # mkstemp makes 0600; the output gets what open() would have given it
        os.replace(tmp, destination)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


@contextmanager
def atomic_write(destination: PathLike, mode: str = "w", **open_kwargs: Any) -> Iterator[IO]:
    """`open(destination, mode)` that leaves any existing destination untouched unless the block succeeds."""
    if "w" not in mode:
        raise ValueError(f"atomic_write writes a new file; mode {mode!r} has no 'w'")
    with atomic_path(destination) as tmp, open(tmp, mode, **open_kwargs) as f:
        yield f
        f.flush()
        os.fsync(f.fileno())


def save_figure(fig: Any, path: PathLike, dpi: int = 120) -> str:
    """A matplotlib figure written whole or not at all (an existing file survives a failed save), then closed
    either way: a figure left open stays in pyplot's registry and leaks memory in long runs. The format is the
    destination's extension, passed explicitly (the temporary file only copies it as its suffix); a path
    without one gets matplotlib's default format rather than a stray `<tmp>.png` beside an empty file."""
    import matplotlib.pyplot as plt

    path = os.fspath(path)
    try:
        extension = os.path.splitext(path)[1].lstrip(".").lower()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format=extension or plt.rcParams["savefig.format"])
    finally:
        plt.close(fig)
    return path


def _file_in_the_way(folder: str) -> str | None:
    """The existing file among `folder` and its ancestors, if any (no folder can be created there)."""
    folder = os.path.abspath(folder)
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    return None if os.path.isdir(folder) else folder


def check_output(path: PathLike, flag: str, folder: bool = False) -> None:
    """An output (a file, or with `folder` a folder) checked before any work: a folder where a file goes, a file
    where a folder goes, or a file above it is a `UserError` naming the flag (writing it at the end would fail
    with 'File exists' or 'Not a directory', after the work)."""
    path = os.fspath(path)
    if folder and os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{flag} {path} is a file; expected a folder")
    if not folder and os.path.isdir(path):
        raise UserError(f"{flag} {path} is a folder; expected a file path")
    blocker = _file_in_the_way(path if folder else os.path.dirname(os.path.abspath(path)))
    if blocker is not None:
        raise UserError(f"{flag} {path}: {blocker} is a file, not a folder")


def _same(a: str, b: str) -> bool:
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return os.path.realpath(a) == os.path.realpath(b)


def refuse_overwriting_inputs(outputs: Iterable[PathLike], inputs: Iterable[PathLike]) -> None:
    """A `UserError` when an output path is one of the inputs (the same file by any path or link)."""
    inputs = [os.fspath(p) for p in inputs]
    for output in (os.fspath(p) for p in outputs):
        for source in inputs:
            if _same(output, source):
                raise UserError(f"output {output} would overwrite the input {source}; choose another output path")


RUN_MARKERS = ("checkpoint.pt", "metrics.jsonl")


def prepare_run_dir(path: PathLike, resume: bool, overwrite: bool, markers: Iterable[str] = RUN_MARKERS,
                    flag_prefix: str = "--") -> None:
    """Checks a run folder before anything is written to it: a folder that already holds a run needs `resume`
    (continue it) or `overwrite` (start over, its run files removed); resuming needs a run to resume."""
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{path} exists and is not a folder")
    if (blocker := _file_in_the_way(path)) is not None:
        raise UserError(f"{path}: {blocker} is a file, not a folder")
    present = [m for m in markers if os.path.exists(os.path.join(path, m))]
    if resume and overwrite:
        raise UserError(f"{flag_prefix}resume and {flag_prefix}overwrite exclude each other")
    if resume:
        return
    if present and not overwrite:
        raise UserError(f"{path} already holds a run ({', '.join(present)}); pass {flag_prefix}resume to continue "
                        f"it or {flag_prefix}overwrite to start over")
    if present and overwrite:
        for marker in present:
            os.remove(os.path.join(path, marker))
