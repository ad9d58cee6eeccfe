"""Token files checked before any training starts (numpy only, so `serve` and `train` refuse a bad file in a
second, without importing torch): a float or bool array, a negative id or one past the vocabulary would
otherwise train silently on garbage or fail deep inside the embedding."""

import os
import pickle

import numpy as np

from cs336_basics.cli_support import UserError

EVAL_FRACTION = 0.02  # the tail of the token file held out for the reported loss
CHUNK = 1 << 22  # ids checked per slice of the memory map


def open_tokens(path: str | os.PathLike) -> np.ndarray:
    """A 1-D memory map of the file (`.npy`, or raw uint16 otherwise), or a one-line error naming it."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise UserError(f"token file {path} is a folder")
    if not os.path.exists(path):
        raise FileNotFoundError(2, "token file not found", path)
    if os.path.getsize(path) == 0:
        raise UserError(f"token file {path} is empty")
    try:
        tokens = np.load(path, mmap_mode="r") if path.endswith(".npy") else np.memmap(path, np.uint16, mode="r")
    except (ValueError, OSError, EOFError, pickle.UnpicklingError) as error:
        text = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UserError(f"cannot read token file {path}: {text}") from error
    if not isinstance(tokens, np.ndarray) or tokens.ndim != 1:
        raise UserError(f"token file {path}: expected a 1-D array of token ids, got {getattr(tokens, 'shape', '?')}")
    return tokens


def check_tokens(path: str | os.PathLike, vocab_size: int, context_length: int) -> np.ndarray:
    """The token file as a memory map, refused unless it holds integer ids in [0, vocab_size) and enough of them
    for a training and a held-out window; the ids are checked by chunks of the map, never all in memory."""
    path = os.fspath(path)
    tokens = open_tokens(path)
    if not np.issubdtype(tokens.dtype, np.integer):
        raise UserError(f"{path} holds {tokens.dtype} values; token ids must be integers")
    held_out = len(tokens) - int(len(tokens) * (1 - EVAL_FRACTION))
    if held_out <= context_length:
        raise UserError(f"{path} holds {len(tokens):,} tokens: too few for --context-length {context_length} "
                        f"(the held-out {EVAL_FRACTION:.0%} must exceed it)")
    for start in range(0, len(tokens), CHUNK):
        chunk = np.asarray(tokens[start:start + CHUNK])
        low, high = int(chunk.min()), int(chunk.max())
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            raise UserError(f"{path} holds token id {bad}, outside [0, vocab_size={vocab_size}) (--vocab-size)")
    return tokens
