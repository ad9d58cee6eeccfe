"""Encoding a text file into a uint16 token array, in parallel over processes and in bounded memory."""

import itertools
import multiprocessing as mp
import os
import tempfile

import numpy as np
from tqdm.auto import tqdm

from cs336_basics.cli_support import UserError, atomic_path
from cs336_basics.tokenizer import Tokenizer
from cs336_basics.tokenizer.pretokenize import find_chunk_boundaries, read_text_range

_BLOCK_TOKENS = 1 << 20  # tokens buffered per write


def _encode_range(task: tuple[Tokenizer, str, int, int, str]) -> tuple[int, int]:
    tokenizer, path, start, end, out_path = task
    count, buffer = 0, []
    with open(out_path, "wb") as out:
        for token in tokenizer.encode_iterable(read_text_range(path, start, end)):
            buffer.append(token)
            if len(buffer) == _BLOCK_TOKENS:
                np.asarray(buffer, dtype=np.uint16).tofile(out)
                count, buffer = count + len(buffer), []
        np.asarray(buffer, dtype=np.uint16).tofile(out)
    return count + len(buffer), end - start


def encode_file(
    tokenizer: Tokenizer,
    input_path: str,
    output_path: str,
    num_workers: int | None = None,
    split_token: str = "<|endoftext|>",
    progress: bool = False,
) -> int:
    """Writes `output_path` (.npy, uint16) atomically and returns the number of tokens.

    The file is cut at `split_token` occurrences, so pieces are independent documents and encoding them
    separately gives exactly the ids of encoding the whole text.
    """
    if max(tokenizer.vocab) >= 2**16:
        raise UserError(f"vocabulary of {max(tokenizer.vocab) + 1} ids does not fit in uint16")
    size = os.path.getsize(input_path)
    workers = num_workers or max(1, min(os.cpu_count() or 1, size // (4 << 20)))
    with open(input_path, "rb") as f:
        boundaries = find_chunk_boundaries(f, max(1, workers * 8), split_token.encode("utf-8"))
    out_dir = os.path.dirname(os.path.abspath(output_path))
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".encode-") as tmp:
        tasks = [(tokenizer, input_path, start, end, os.path.join(tmp, f"{i}.bin"))
                 for i, (start, end) in enumerate(itertools.pairwise(boundaries))]
        counts = _encode_parts(tasks, workers, size, progress)
        with atomic_path(output_path, suffix=".npy") as staging:  # the destination changes only when whole
            tokens = np.lib.format.open_memmap(staging, mode="w+", dtype=np.uint16, shape=(sum(counts),))
            offset = 0
            for (_, _, _, _, part), count in zip(tasks, counts, strict=True):
                tokens[offset : offset + count] = np.fromfile(part, dtype=np.uint16)
                offset += count
            tokens.flush()
            del tokens
    return offset


def _encode_parts(tasks: list, workers: int, size: int, progress: bool) -> list[int]:
    """Encodes each byte range into its part file; the token count of each. A failing worker stops the pool
    (no orphan processes left encoding after the error is reported)."""
    bar = tqdm(total=size, unit="B", unit_scale=True, desc="encode", disable=not progress)
    counts = []
    pool = None if workers == 1 else mp.get_context("spawn" if os.name == "nt" else "fork").Pool(workers)
    try:
        results = map(_encode_range, tasks) if pool is None else pool.imap(_encode_range, tasks)
        for count, num_bytes in results:
            counts.append(count)
            bar.update(num_bytes)
        if pool is not None:
            pool.close()
            pool.join()
    finally:
        if pool is not None:
            pool.terminate()
        bar.close()
    return counts
