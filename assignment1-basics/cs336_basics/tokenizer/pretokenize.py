"""GPT-2 pre-tokenization: special-token splitting, streaming over pieces of text, parallel pre-token counting.

Special tokens are hard boundaries: text is split on them first and the GPT-2 regex runs on each span in
between, so no pre-token (hence no merge) ever crosses a special token.
"""

import codecs
import itertools
import multiprocessing as mp
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from typing import BinaryIO

import regex

GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
PRETOKEN_RE = regex.compile(GPT2_PATTERN)

# A span of pre-tokens and the special token that ends it (None where the span ends without one).
Batch = tuple[list[str], str | None]

READ_BLOCK_BYTES = 1 << 20  # how much of the file a counting worker decodes at a time
MIN_BYTES_PER_WORKER = 1 << 20  # on Linux (fork), 2 processes already beat 1 on a 1 MB file
CHUNKS_PER_WORKER = 4  # more chunks than workers evens out the load
STREAM_MIN_CHARS = 1 << 12  # text gathered from small pieces (e.g. lines) before pre-tokenizing it


def unique_special_tokens(special_tokens: Iterable[str] | None) -> list[str]:
    """The special tokens in order without repeats, checked to be non-empty strings (None means none)."""
    if isinstance(special_tokens, str):
        raise TypeError(f"special_tokens must be a list of strings, not the string {special_tokens!r}")
    tokens = list(dict.fromkeys(special_tokens or []))
    for token in tokens:
        if not isinstance(token, str) or not token:
            raise ValueError(f"special tokens must be non-empty strings, got {token!r}")
    return tokens


class SpecialSplitter:
    """Finds special tokens in text; where several match at one position the longest wins."""

    def __init__(self, special_tokens: Iterable[str] | None):
        self.tokens = sorted(unique_special_tokens(special_tokens), key=len, reverse=True)
        # Alternation tries the alternatives in order, so longest-first makes the longest token win.
        self.regex = regex.compile("|".join(map(regex.escape, self.tokens))) if self.tokens else None
        self.max_len = len(self.tokens[0]) if self.tokens else 0


def pretokenize(text: str, splitter: SpecialSplitter) -> Iterator[Batch]:
    """Pre-tokenizes a whole text: one batch per span between special tokens."""
    start = 0
    if splitter.regex is not None:
        for match in splitter.regex.finditer(text):
            yield PRETOKEN_RE.findall(text, start, match.start()), match.group()
            start = match.end()
    yield PRETOKEN_RE.findall(text, start), None


def pretokenize_stream(pieces: Iterable[str], splitter: SpecialSplitter) -> Iterator[Batch]:
    """Pre-tokenizes text that arrives in pieces; the result equals `pretokenize` of the concatenation.

    A special token or a pre-token may straddle two pieces, so only what can no longer change is emitted and
    the rest is carried over: a special token match starting at least `max_len` characters before the end is
    final, and of the ordinary text before the last place a special token could still start, every pre-token
    but the last is final (the GPT-2 regex covers every character and looks at most one character past a
    match, so only the last match can grow). Pieces are gathered until they outweigh the carried text, so a
    pre-token spanning many pieces is rescanned a logarithmic number of times, not once per piece. Memory is
    bounded by a few times the longest pre-token plus `STREAM_MIN_CHARS` and one piece.
    """
    carry = ""
    pending: list[str] = []
    pending_chars = 0
    for piece in pieces:
        pending.append(piece)
        pending_chars += len(piece)
        if pending_chars < max(len(carry), STREAM_MIN_CHARS):
            continue
        buffer = carry + "".join(pending)
        pending, pending_chars = [], 0
        start = 0
        limit = len(buffer) - splitter.max_len  # special matches starting at or before this are final
        if splitter.regex is not None:
            for match in splitter.regex.finditer(buffer):
                if match.start() > limit:
                    break
                yield PRETOKEN_RE.findall(buffer, start, match.start()), match.group()
                start = match.end()
        safe_end = max(start, limit + 1) if splitter.regex is not None else len(buffer)
        pretokens = PRETOKEN_RE.findall(buffer, start, safe_end)
        if len(pretokens) > 1:
            last = pretokens.pop()
            yield pretokens, None
            start = safe_end - len(last)
        carry = buffer[start:]
    yield from pretokenize(carry + "".join(pending), splitter)


def split_token_for_chunking(special_tokens: Sequence[str]) -> bytes | None:
    """The special token at whose occurrences a file can be cut without changing pre-tokenization, if any.

    Cutting right before an occurrence is safe when that occurrence cannot be the tail of a longer special token
    (the token occurs in no other at a non-zero offset) nor overlap an earlier occurrence of itself (no border).
    """
    for token in special_tokens:
        inside_other = any(other != token and token in other[1:] for other in special_tokens)
        has_border = any(token[:k] == token[-k:] for k in range(1, len(token)))
        if not inside_other and not has_border:
            return token.encode("utf-8")
    return None


def find_chunk_boundaries(
    file: BinaryIO, desired_num_chunks: int, split_token: bytes, scan_bytes: int = 1 << 16
) -> list[int]:
    """Byte offsets [0, ..., size] that cut the file right before occurrences of `split_token`.

    Starts from evenly spaced guesses and scans forward from each in blocks of `scan_bytes` (so memory stays
    bounded); a guess with no later occurrence collapses into the end of the file, so fewer chunks may result.
    """
    if desired_num_chunks < 1:
        raise ValueError(f"desired_num_chunks must be positive, got {desired_num_chunks}")
    if not split_token:
        raise ValueError("split_token must be non-empty")
    size = file.seek(0, os.SEEK_END)
    boundaries = [0]
    for i in range(1, desired_num_chunks):
        guess = max(i * size // desired_num_chunks, boundaries[-1] + 1)
        if guess >= size:
            break
        found = _find_from(file, guess, split_token, scan_bytes)
        if found is None:
            break
        if found > boundaries[-1]:
            boundaries.append(found)
    boundaries.append(size)
    return boundaries


def _find_from(file: BinaryIO, position: int, token: bytes, scan_bytes: int) -> int | None:
    """Offset of the first occurrence of `token` at or after `position`, keeping an overlap across blocks."""
    file.seek(position)
    tail = b""
    while block := file.read(scan_bytes):
        data = tail + block
        index = data.find(token)
        if index >= 0:
            return position - len(tail) + index
        tail = data[max(0, len(data) - len(token) + 1) :]
        position += len(block)
    return None


def read_text_range(path: str | os.PathLike, start: int, end: int) -> Iterator[str]:
    """Decodes bytes [start, end) of a UTF-8 file in blocks (characters split across blocks are handled)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    with open(path, "rb") as f:
        f.seek(start)
        remaining = end - start
        while remaining > 0 and (block := f.read(min(READ_BLOCK_BYTES, remaining))):
            remaining -= len(block)
            yield decoder.decode(block)
    yield decoder.decode(b"", final=True)


def count_pretokens_in_range(
    path: str | os.PathLike, start: int, end: int, special_tokens: Sequence[str]
) -> Counter[str]:
    """Pre-token counts of bytes [start, end) of a file; special tokens are dropped, not counted."""
    counts: Counter[str] = Counter()
    for pretokens, _ in pretokenize_stream(read_text_range(path, start, end), SpecialSplitter(special_tokens)):
        counts.update(pretokens)
    return counts


def _count_task(task: tuple[str, int, int, list[str]]) -> Counter[str]:
    return count_pretokens_in_range(*task)


def available_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def count_pretokens(
    path: str | os.PathLike, special_tokens: Sequence[str], num_workers: int | None = None
) -> Counter[str]:
    """Pre-token counts of a whole file, over `num_workers` processes (None: by file size and CPU count).

    Each worker streams its own byte range, so memory grows with the number of distinct pre-tokens, not with
    the corpus. The file is cut only at a special token (see `split_token_for_chunking`); without one it is
    counted in a single process.
    """
    size = os.path.getsize(path)
    if num_workers is None:
        num_workers = max(1, min(available_cpus(), size // MIN_BYTES_PER_WORKER))
    if num_workers < 1:
        raise ValueError(f"num_workers must be positive, got {num_workers}")
    split_token = split_token_for_chunking(special_tokens)
    if num_workers == 1 or split_token is None:
        return count_pretokens_in_range(path, 0, size, special_tokens)
    with open(path, "rb") as f:
        boundaries = find_chunk_boundaries(f, num_workers * CHUNKS_PER_WORKER, split_token)
    tasks = [(os.fspath(path), a, b, list(special_tokens)) for a, b in itertools.pairwise(boundaries)]
    if len(tasks) == 1:
        return _count_task(tasks[0])
    counts: Counter[str] = Counter()
    with mp.get_context().Pool(min(num_workers, len(tasks))) as pool:
        for part in pool.imap_unordered(_count_task, tasks):
            counts.update(part)
    return counts
