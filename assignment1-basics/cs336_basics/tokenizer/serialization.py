"""GPT-2 style vocab.json / merges.txt files for byte-level BPE.

Tokens are arbitrary bytes, so each byte is written as one printable character (the GPT-2 byte <-> unicode
table): a token then never contains a space or a newline, and merges.txt can be one "left right" pair a line.
"""

import json
import os
from functools import cache
from pathlib import Path

from cs336_basics.cli_support import atomic_path, atomic_write

MERGES_HEADER = "#version: 0.2"


@cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table: printable Latin-1 bytes map to themselves, the other 68 bytes to chr(256), chr(257), ..."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {byte: chr(byte) for byte in printable}
    shifted = (byte for byte in range(256) if byte not in table)
    for offset, byte in enumerate(shifted):
        table[byte] = chr(256 + offset)
    return table


@cache
def unicode_to_bytes() -> dict[str, int]:
    return {char: byte for byte, char in bytes_to_unicode().items()}


def token_to_str(token: bytes) -> str:
    table = bytes_to_unicode()
    return "".join(table[byte] for byte in token)


def str_to_token(text: str) -> bytes:
    table = unicode_to_bytes()
    try:
        return bytes(table[char] for char in text)
    except KeyError as error:
        raise ValueError(f"{text!r} has a character outside the GPT-2 byte table: {error.args[0]!r}") from None


def save_vocab(vocab: dict[int, bytes], path: str | os.PathLike) -> None:
    """Writes {token string: id} in id order; a JSON object cannot hold two ids for the same bytes."""
    entries = {token_to_str(vocab[token_id]): token_id for token_id in sorted(vocab)}
    if len(entries) != len(vocab):
        raise ValueError("vocab maps several ids to the same bytes, which vocab.json cannot represent")
    with atomic_write(path, encoding="utf-8") as f:
        f.write(json.dumps(entries, ensure_ascii=False, indent=0) + "\n")


def load_vocab(path: str | os.PathLike) -> dict[int, bytes]:
    entries = json.loads(Path(path).read_text(encoding="utf-8"))
    return {token_id: str_to_token(text) for text, token_id in entries.items()}


def save_merges(merges: list[tuple[bytes, bytes]], path: str | os.PathLike) -> None:
    lines = [MERGES_HEADER, *(f"{token_to_str(left)} {token_to_str(right)}" for left, right in merges)]
    with atomic_write(path, encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def load_merges(path: str | os.PathLike) -> list[tuple[bytes, bytes]]:
    """Reads "left right" lines; blank lines and a leading "#version" line are skipped."""
    merges = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line or (number == 1 and line.startswith("#version")):
                continue
            parts = line.split(" ")
            if len(parts) != 2:
                raise ValueError(f"{path}:{number}: expected two tokens separated by one space, got {line!r}")
            merges.append((str_to_token(parts[0]), str_to_token(parts[1])))
    return merges


def save_tokenizer(vocab: dict[int, bytes], merges: list[tuple[bytes, bytes]], out_dir: str | os.PathLike) -> None:
    """Writes out_dir/vocab.json and out_dir/merges.txt (read back with `Tokenizer.from_files`), both or
    neither: each is staged beside its destination and both are renamed into place only once both are whole."""
    os.makedirs(out_dir, exist_ok=True)
    folder = Path(out_dir)
    with atomic_path(folder / "vocab.json") as vocab_tmp, atomic_path(folder / "merges.txt") as merges_tmp:
        save_vocab(vocab, vocab_tmp)
        save_merges(merges, merges_tmp)
