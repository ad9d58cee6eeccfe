"""Byte-level BPE: training (`train_bpe`), encoding/decoding (`Tokenizer`) and GPT-2 style files."""

from cs336_basics.tokenizer.serialization import (
    bytes_to_unicode,
    load_merges,
    load_vocab,
    save_merges,
    save_tokenizer,
    save_vocab,
)
from cs336_basics.tokenizer.tokenizer import Tokenizer
from cs336_basics.tokenizer.train_bpe import train_bpe, train_bpe_from_counts

__all__ = [
    "Tokenizer",
    "bytes_to_unicode",
    "load_merges",
    "load_vocab",
    "save_merges",
    "save_tokenizer",
    "save_vocab",
    "train_bpe",
    "train_bpe_from_counts",
]
