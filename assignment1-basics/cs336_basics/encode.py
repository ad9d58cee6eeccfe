"""Encoding a text file into a uint16 token array, in parallel over processes and in bounded memory."""

import copy
import itertools
import multiprocessing as mp
import os
import shutil
import tempfile

import numpy as np
from tqdm.auto import tqdm

from cs336_basics.cli_support import UserError, atomic_path
from cs336_basics.tokenizer import Tokenizer
from cs336_basics.tokenizer.pretokenize import find_chunk_boundaries, read_text_range

_BLOCK_TOKENS = 1 << 20  # tokens buffered per write
# Pre-tokens whose ids a worker keeps: web-scale text has a Zipf tail of distinct words, and the Tokenizer's
# default 32k cache misses about one pre-token in five on the benchmark corpus (benchmarks/scale_corpus.py;
# each miss runs BPE in Python, ~9 us); with 256k entries (~60 MB per worker) only first sightings miss.
# Together with ids written in batches this took one worker from 2.7 to 4.5 MB/s on 50 MB of that corpus.
ENCODE_CACHE_SIZE = 1 << 18


_worker_tokenizer: Tokenizer | None = None  # set once per worker process, so its cache lives across tasks


def _set_worker_tokenizer(tokenizer: Tokenizer | None) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizer


def _encode_range(task: tuple[str, int, int, str]) -> tuple[int, int]:
    """Encodes bytes [start, end) of the input into a part file in blocks; memory is one block of ids plus
    the tokenizer's cache, whatever the size of the range."""
    tokenizer, (path, start, end, out_path) = _worker_tokenizer, task
    assert tokenizer is not None
    count, buffer = 0, []
    with open(out_path, "wb") as out:
        for ids in tokenizer.encode_batches(read_text_range(path, start, end)):
            buffer.extend(ids)
            if len(buffer) >= _BLOCK_TOKENS:
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
    cache_size: int = ENCODE_CACHE_SIZE,
) -> int:
    """Writes `output_path` (.npy, uint16) atomically and returns the number of tokens.

    The file is cut at `split_token` occurrences, so pieces are independent documents and encoding them
    separately gives exactly the ids of encoding the whole text. Each worker streams its byte range into a part
    file and the parts are copied into the output in blocks, so memory does not grow with the input; workers
    use a pre-token cache of at least `cache_size` entries.
    """
    if max(tokenizer.vocab) >= 2**16:
        raise UserError(f"vocabulary of {max(tokenizer.vocab) + 1} ids does not fit in uint16")
    if tokenizer.cache_size < cache_size:
        tokenizer = copy.copy(tokenizer)  # a fresh cache of the larger size (see Tokenizer.__setstate__)
        tokenizer.cache_size = cache_size
        tokenizer._init_cache()
    size = os.path.getsize(input_path)
    workers = num_workers or max(1, min(os.cpu_count() or 1, size // (4 << 20)))
    with open(input_path, "rb") as f:
        boundaries = find_chunk_boundaries(f, max(1, workers * 8), split_token.encode("utf-8"))
    out_dir = os.path.dirname(os.path.abspath(output_path))
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".encode-") as tmp:
        tasks = [(input_path, start, end, os.path.join(tmp, f"{i}.bin"))
                 for i, (start, end) in enumerate(itertools.pairwise(boundaries))]
        counts = _encode_parts(tokenizer, tasks, workers, size, progress)
        total = sum(counts)
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint16)), "fortran_order": False,
                  "shape": (total,)}
        # the destination changes only when whole
        with atomic_path(output_path, suffix=".npy") as staging, open(staging, "wb") as out:
            np.lib.format.write_array_header_1_0(out, header)
            for task in tasks:
                with open(task[-1], "rb") as part:
                    shutil.copyfileobj(part, out, 1 << 22)
                os.remove(task[-1])
    return total


def _encode_parts(tokenizer: Tokenizer, tasks: list, workers: int, size: int, progress: bool) -> list[int]:
    """Encodes each byte range into its part file; the token count of each. The tokenizer goes to each worker
    once (not with every task, which would start each task with a cold cache). A failing worker stops the pool
    (no orphan processes left encoding after the error is reported)."""
    bar = tqdm(total=size, unit="B", unit_scale=True, desc="encode", disable=not progress)
    counts = []
    _set_worker_tokenizer(tokenizer)
    context = mp.get_context("spawn" if os.name == "nt" else "fork")
    pool = None if workers == 1 else context.Pool(workers, initializer=_set_worker_tokenizer, initargs=(tokenizer,))
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
        _set_worker_tokenizer(None)
        bar.close()
    return counts
