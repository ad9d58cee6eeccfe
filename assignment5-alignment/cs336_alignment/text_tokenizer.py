"""One small interface over Hugging Face tokenizers and the cs336_basics BPE tokenizer.

Everything in this package asks a tokenizer only for `encode(text, add_special_tokens=...)`, `decode(ids)`,
`eos_token_id` and `pad_token_id`; HF tokenizers already have them, `BasicsTokenizer` adds them to ours.
"""

from collections.abc import Iterable, Sequence
from typing import Any

from cs336_basics.tokenizer import Tokenizer

DEFAULT_EOS = "<|endoftext|>"


class BasicsTokenizer:
    """Wraps a cs336_basics `Tokenizer`; its end-of-text special token serves as both EOS and padding."""

    def __init__(self, tokenizer: Tokenizer, eos_token: str = DEFAULT_EOS):
        if eos_token not in tokenizer.special_tokens:
            raise ValueError(f"tokenizer has no special token {eos_token!r} to use as end of text")
        self.tokenizer = tokenizer
        self.eos_token = eos_token
        self.eos_token_id = tokenizer.encode(eos_token)[0]
        self.pad_token_id = self.eos_token_id
        self.bos_token_id = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        ids = list(ids)
        if skip_special_tokens:
            ids = [i for i in ids if i != self.eos_token_id]
        return self.tokenizer.decode(ids)

    def __len__(self) -> int:
        return len(self.tokenizer.vocab)


def encode(tokenizer: Any, text: str, add_special_tokens: bool = True) -> list[int]:
    """Token ids of `text`; `add_special_tokens` controls the tokenizer's own BOS (Llama) where it has one."""
    return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))


def eos_token_id(tokenizer: Any) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError("tokenizer has no eos_token_id")
    return int(eos)


def pad_token_id(tokenizer: Any) -> int:
    """The padding id: the tokenizer's own, else its EOS (padding is always masked out, so any id works)."""
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is not None:
        return int(pad)
    eos = getattr(tokenizer, "eos_token_id", None)
    return 0 if eos is None else int(eos)


def stop_token_ids(tokenizer: Any, extra: Sequence[int] = ()) -> set[int]:
    """Ids that end a generation: EOS (one id or several, as some HF configs list) plus `extra`."""
    ids = set(extra)
    eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif eos is not None:
        ids.update(int(i) for i in eos)
    return ids
