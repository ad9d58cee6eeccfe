"""Random language-modelling batches from a (memory-mapped) 1-D array of token ids."""

import os

import numpy as np
import numpy.typing as npt
import torch
from jaxtyping import Int
from torch import Tensor


def load_tokens(path: str | os.PathLike, dtype: npt.DTypeLike = np.uint16) -> np.ndarray:
    """Opens a token file without reading it into memory: `.npy` via np.load, anything else as raw `dtype`."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"token file not found: {path}")
    if path.endswith(".npy"):
        tokens = np.load(path, mmap_mode="r")
    else:
        tokens = np.memmap(path, dtype=dtype, mode="r")
    if tokens.ndim != 1:
        raise ValueError(f"{path}: expected a 1-D array of token ids, got shape {tokens.shape}")
    return tokens


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
    num_starts = len(dataset) - context_length
    if num_starts <= 0:
        raise ValueError(f"dataset of {len(dataset)} tokens is too short for context_length={context_length}")
    starts = torch.randint(0, num_starts, (batch_size,), generator=generator).numpy()
    windows = np.asarray(dataset[starts[:, None] + np.arange(context_length + 1)], dtype=np.int64)
    batch = torch.from_numpy(windows)
    device = torch.device(device)
    if device.type == "cuda":
        batch = batch.pin_memory().to(device, non_blocking=True)
    else:
        batch = batch.to(device)
    return batch[:, :-1], batch[:, 1:]
