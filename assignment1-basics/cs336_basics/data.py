"""Token files (memory-mapped, checked on load) and random language-modelling batches from them.

Importing this module does not import torch (only `get_batch` needs it), so a bad token file is reported
before the seconds torch takes to load.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from cs336_basics.cli_support import UserError

if TYPE_CHECKING:
    import torch
    from jaxtyping import Int
    from torch import Tensor

TEXT_SUFFIXES = (".txt", ".text", ".md", ".json", ".jsonl", ".csv", ".html")
CHECK_CHUNK = 1 << 24  # token ids scanned per slice of the memory map (16M ids: tens of ms, bounded memory)


def load_tokens(path: str | os.PathLike, dtype: npt.DTypeLike = np.uint16) -> np.ndarray:
    """Opens a token file without reading it into memory: `.npy` via np.load, anything else as raw `dtype`.

    Refused with an error naming the file: a missing file, a text file (by its suffix: .txt, .jsonl, ...; raw
    ids are otherwise read from any file), one that is not an array, a non-integer dtype
    (float or bool ids would be silently cast), more than one dimension, no tokens at all.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        if os.path.isdir(path):
            raise UserError(f"token file {path} is a folder")
        raise FileNotFoundError(f"token file not found: {path}")
    if os.path.getsize(path) == 0:
        raise UserError(f"token file {path} is empty")
    if path.lower().endswith(TEXT_SUFFIXES):  # raw ids would be the text's bytes, two at a time
        raise UserError(f"token file {path} is a text file; encode it first (`cs336-basics encode --tokenizer DIR "
                        f"--input {path} --output TOKENS.npy`) and train on the .npy")
    if path.endswith(".npy"):
        with open(path, "rb") as f:
            if f.read(6) != b"\x93NUMPY":
                raise UserError(f"token file {path} is not a .npy array (no NumPy header)")
    try:
        if path.endswith(".npy"):
            tokens = np.load(path, mmap_mode="r")
        else:
            tokens = np.memmap(path, dtype=dtype, mode="r")
    except (ValueError, OSError, EOFError, pickle.UnpicklingError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot read token file {path}: {reason}") from e
    if not isinstance(tokens, np.ndarray):  # np.load of an .npz archive or a pickle
        raise UserError(f"token file {path} is not a single array (got {type(tokens).__name__})")
    if tokens.dtype == np.bool_ or not np.issubdtype(tokens.dtype, np.integer):
        raise UserError(f"token file {path} holds {tokens.dtype} values; token ids must be integers "
                        "(e.g. uint16 from `cs336-basics encode`)")
    if tokens.ndim != 1:
        raise UserError(f"token file {path}: expected a 1-D array of token ids, got shape {tokens.shape}")
    if len(tokens) == 0:
        raise UserError(f"token file {path} holds no tokens")
    return tokens


def check_token_ids(tokens: np.ndarray, vocab_size: int, path: str | os.PathLike,
                    chunk: int = CHECK_CHUNK) -> None:
    """Every id in [0, vocab_size), scanned slice by slice of the memory map (one pass, bounded memory); the
    first bad id is reported with its index and the file. Skipped when the dtype cannot hold a bad id."""
    info = np.iinfo(tokens.dtype)
    check_low, check_high = info.min < 0, info.max >= vocab_size
    for start in range(0, len(tokens) if check_low or check_high else 0, chunk):
        window = np.asarray(tokens[start : start + chunk])
        bad = np.zeros(len(window), dtype=bool)
        if check_low and window.min() < 0:
            bad |= window < 0
        if check_high and window.max() >= vocab_size:
            bad |= window >= vocab_size
        if bad.any():
            index = int(np.argmax(bad))
            raise UserError(f"token file {os.fspath(path)}: id {int(window[index])} at index {start + index} is "
                            f"outside [0, vocab_size={vocab_size}); set --vocab-size to the tokenizer's size")


def check_length(tokens: np.ndarray, context_length: int, path: str | os.PathLike) -> None:
    """A batch window needs context_length + 1 tokens (inputs plus the shifted targets)."""
    if len(tokens) <= context_length:
        raise UserError(f"token file {os.fspath(path)} holds {len(tokens)} tokens, too few for "
                        f"--context-length {context_length} (needs at least {context_length + 1})")


def get_batch(
    dataset: npt.NDArray,
    batch_size: int,
    context_length: int,
    device: str | torch.device,
    generator: torch.Generator | None = None,
) -> tuple[Int[Tensor, "batch ctx"], Int[Tensor, "batch ctx"]]:
    """Samples `batch_size` windows uniformly over every valid start; targets are inputs shifted by one.

    Only the sampled windows are read, so `dataset` can be a memory map far larger than RAM.
    """
    import torch

    num_starts = len(dataset) - context_length
    if num_starts <= 0:
        raise ValueError(f"dataset of {len(dataset)} tokens is too short for context_length={context_length}")
    starts = torch.randint(0, num_starts, (batch_size,), generator=generator).numpy()
    return batch_at(dataset, starts, context_length, device)


def step_batch_starts(num_tokens: int, batch_size: int, context_length: int, seed: int, step: int) -> np.ndarray:
    """The window starts of the global batch of training step `step`: a function of (seed, step) alone.

    `cs336-basics train` gives rank r of W, micro-step m of A, the rows [(r·A + m)·b, (r·A + m + 1)·b) with
    b = batch_size / (W·A): the ranks' micro-batches together are exactly this batch at every world size and
    accumulation, so a run is reproducible for its world size and a resumed run sees the same stream whatever
    world size it resumes at. Drawing batch_size integers costs microseconds on every rank.
    """
    num_starts = num_tokens - context_length
    if num_starts <= 0:
        raise ValueError(f"dataset of {num_tokens} tokens is too short for context_length={context_length}")
    return np.random.default_rng([seed, step]).integers(0, num_starts, size=batch_size)


def batch_at(
    dataset: npt.NDArray, starts: np.ndarray, context_length: int, device: str | torch.device
) -> tuple[Int[Tensor, "batch ctx"], Int[Tensor, "batch ctx"]]:
    """The windows beginning at `starts` as (inputs, targets shifted by one), on `device`."""
    import torch

    device = torch.device(device)
    return batch_to_device(host_batch(dataset, starts, context_length, pin=device.type == "cuda"), device)


def host_batch(dataset: npt.NDArray, starts: np.ndarray, context_length: int, pin: bool) -> Tensor:
    """The windows beginning at `starts` (context_length + 1 tokens each) as an int64 CPU tensor, pinned when
    `pin` (so that the copy to a GPU can run asynchronously)."""
    import torch

    windows = np.asarray(dataset[np.asarray(starts)[:, None] + np.arange(context_length + 1)], dtype=np.int64)
    batch = torch.from_numpy(windows)
    return batch.pin_memory() if pin else batch


def batch_to_device(batch: Tensor, device: torch.device) -> tuple[Tensor, Tensor]:
    """A `host_batch` on `device` as (inputs, targets shifted by one); non-blocking from pinned memory."""
    batch = batch.to(device, non_blocking=batch.is_pinned())
    return batch[:, :-1], batch[:, 1:]


class Prefetcher:
    """Builds `build(i)` for the next `depth` indices on one background thread while the caller works on index i
    (for the trainer: the pinned host batches of the coming steps while the GPU runs this one).

    `get(i)` returns exactly `build(i)`: a prefetched result when i is the index that was expected next,
    otherwise (the first call, a jump) it is built on the spot and prefetching restarts from i + 1."""

    def __init__(self, build: Callable[[int], Any], depth: int = 2):
        from concurrent.futures import ThreadPoolExecutor

        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.build, self.depth = build, depth
        self.pending: dict[int, Any] = {}  # index -> Future
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")

    def get(self, index: int) -> Any:
        future = self.pending.pop(index, None)
        if future is None:
            for stale in self.pending.values():
                stale.cancel()
            self.pending.clear()
            result = self.build(index)
        else:
            result = future.result()
        for ahead in range(index + 1, index + 1 + self.depth):
            if ahead not in self.pending:
                self.pending[ahead] = self.executor.submit(self.build, ahead)
        return result

    def close(self) -> None:
        for future in self.pending.values():
            future.cancel()
        self.pending.clear()
        self.executor.shutdown(wait=True)
