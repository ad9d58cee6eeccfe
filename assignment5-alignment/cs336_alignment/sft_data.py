"""Instruction-tuning data packed into fixed-length language-modelling examples (supplement section 3.2.1)."""

import json
import os
import random
from collections.abc import Iterator
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from cs336_alignment.prompts import format_prompt
from cs336_alignment.text_tokenizer import encode, eos_token_id


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All JSON objects of a JSON-lines file (blank lines skipped), with the line number on a parse error."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{os.fspath(path)}:{number}: not valid JSON ({e.msg})") from None
    return rows


def format_sft_document(example: dict[str, Any]) -> str:
    """An example with `prompt` and `response` in the Alpaca template."""
    try:
        return format_prompt("alpaca_sft", instruction=example["prompt"], response=example["response"])
    except KeyError as e:
        raise ValueError(f"SFT example lacks the {e.args[0]!r} field") from None


def pack_token_stream(
    documents: list[list[int]], seq_length: int
) -> tuple[Int[Tensor, "n seq"], Int[Tensor, "n seq"]]:
    """Concatenates documents and cuts consecutive non-overlapping chunks; labels are the stream shifted by one.

    A trailing chunk shorter than `seq_length` (or without a next token for its last label) is dropped.
    """
    if seq_length < 1:
        raise ValueError(f"seq_length must be >= 1, got {seq_length}")
    stream = torch.tensor([t for doc in documents for t in doc], dtype=torch.long)
    count = max(0, (stream.numel() - 1) // seq_length)
    used = count * seq_length
    return stream[:used].view(count, seq_length), stream[1 : used + 1].view(count, seq_length)


class PackedSFTDataset(Dataset):
    """Alpaca-formatted documents, each followed by the end-of-text id, packed into `seq_length` chunks.

    Each document keeps the tokenizer's own special tokens (Llama 3 opens every one with BOS). With `shuffle`
    the documents are shuffled before packing (by `seed`, random when None).
    """

    def __init__(
        self,
        tokenizer: Any,
        dataset_path: str | os.PathLike,
        seq_length: int,
        shuffle: bool,
        seed: int | None = None,
    ):
        examples = read_jsonl(dataset_path)
        if shuffle:
            random.Random(seed).shuffle(examples)
        eos = eos_token_id(tokenizer)
        documents = [[*encode(tokenizer, format_sft_document(ex), add_special_tokens=True), eos] for ex in examples]
        self.input_ids, self.labels = pack_token_stream(documents, seq_length)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} examples")
        return {"input_ids": self.input_ids[i], "labels": self.labels[i]}

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        return (self[i] for i in range(len(self)))


def iterate_batches(dataset: Dataset, batch_size: int, shuffle: bool, seed: int | None = None) -> DataLoader:
    """One epoch of batches (the last may be short) as a `DataLoader`, so `len()` gives the batch count."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator)
