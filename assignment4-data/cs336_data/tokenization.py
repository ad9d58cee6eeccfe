"""Filtered documents to a flat uint16 token file (GPT-2 BPE, `<|endoftext|>` after each document).

The output is what `cs336_basics` training reads with `np.memmap(path, dtype=np.uint16)`. The GPT-2 encoding
comes from tiktoken; offline, pass the GPT-2 `encoder.json`/`vocab.json` to rebuild it locally.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import tiktoken
from tqdm import tqdm
from xopen import xopen

from cs336_basics.cli_support import UserError, atomic_path, reading
from cs336_data.safe_io import jsonl_field

GPT2_SPLIT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
EOT = "<|endoftext|>"


def _byte_to_char() -> dict[int, str]:
    """GPT-2's reversible byte-to-printable-character table: printable Latin-1 bytes map to themselves."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def gpt2_encoding(vocab_json: str | os.PathLike | None = None) -> tiktoken.Encoding:
    """tiktoken's GPT-2 encoding, or the same rebuilt from a GPT-2 vocab JSON (token ids are the merge ranks)."""
    if vocab_json is None:
        try:
            return tiktoken.get_encoding("gpt2")
        except Exception as e:  # tiktoken fetches the files over HTTP on first use; offline that fails deep inside
            raise UserError("cannot load tiktoken's GPT-2 encoding (it downloads on first use; offline, pass "
                            f"--gpt2-vocab vocab.json): {type(e).__name__}") from e
    char_to_byte = {c: b for b, c in _byte_to_char().items()}
    with reading(vocab_json):
        vocab = json.loads(Path(vocab_json).read_text(encoding="utf-8"))
    if not isinstance(vocab, dict) or not all(isinstance(i, int) for i in vocab.values()):
        raise UserError(f"{vocab_json} is not a GPT-2 vocab.json (an object of token -> id)")
    try:
        ranks = {bytes(char_to_byte[c] for c in tok): i for tok, i in vocab.items() if tok != EOT}
    except KeyError as e:
        raise UserError(f"{vocab_json} is not a GPT-2 vocab.json (a token holds {e.args[0]!r}, no byte's "
                        "character)") from e
    return tiktoken.Encoding(name="gpt2-local", pat_str=GPT2_SPLIT, mergeable_ranks=ranks,
                             special_tokens={EOT: vocab.get(EOT, len(ranks))})


_ENCODING: tiktoken.Encoding | None = None


def _encode(text: str) -> list[int]:
    assert _ENCODING is not None
    return [*_ENCODING.encode_ordinary(text), _ENCODING.eot_token]


def iter_document_texts(paths: Iterable[str | os.PathLike], field: str = "text") -> Iterator[str]:
    """Texts from JSONL shards (`field` of each object) or plain-text files (each non-empty file one document;
    a WARC/WET file is refused: run `filter` first).

    A damaged file (truncated gzip, not gzip, not UTF-8) or a record without its text is a `UserError` naming
    the file (and line)."""
    for path in paths:
        name = str(path)
        if ".jsonl" in name:
            with reading(path), xopen(path, "rt", threads=0, encoding="utf-8") as f:
                for lineno, line in enumerate(f, start=1):
                    if line.strip():
                        yield jsonl_field(line, path, lineno, field)
            continue
        with reading(path), xopen(path, "rb", threads=0) as b:
            data = b.read()
        if data.startswith(b"WARC/"):  # its headers and markup would be tokenized as one document
            raise UserError(f"{name} is a WARC/WET file; tokenize takes JSONL shards (from filter) or text files")
        with reading(path):
            text = data.decode("utf-8")
        if text.strip():  # an empty text file holds no document (not one made of a lone <|endoftext|>)
            yield text


def tokenize_to_uint16(texts: Iterable[str], output_path: str | os.PathLike, encoding: tiktoken.Encoding,
                       workers: int = 1, chunksize: int = 64, progress: bool = True,
                       source: str = "the input") -> dict[str, int]:
    """Encode documents in order, append EOT to each, and stream the ids to `output_path` as uint16 (renamed into
    place only when every document is encoded; no documents at all is an error)."""
    global _ENCODING
    if encoding.n_vocab > 1 << 16:
        raise UserError(f"vocabulary of {encoding.n_vocab} ids does not fit in uint16")
    _ENCODING = encoding
    stats = {"documents": 0, "tokens": 0}
    with atomic_path(output_path) as tmp, open(tmp, "wb") as out:
        pool = multiprocessing.get_context("fork").Pool(workers) if workers > 1 else None
        try:
            ids_iter = pool.imap(_encode, texts, chunksize=chunksize) if pool else map(_encode, texts)
            for ids in tqdm(ids_iter, desc="tokenize", unit=" docs", disable=not progress):
                np.asarray(ids, dtype=np.uint16).tofile(out)
                stats["documents"] += 1
                stats["tokens"] += len(ids)
        finally:
            if pool:
                pool.close()
                pool.join()
        if not stats["documents"]:  # an empty token file would only fail later, in training
            raise UserError(f"no documents to tokenize in {source}; {os.fspath(output_path)} not written")
    return stats
