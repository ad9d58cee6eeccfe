"""The demo's tokenizer: byte-level BPE trained by cs336_basics on the generated text, with digits kept single.

Merges that touch a digit are dropped after training (and every merge built on them), so "123" is always the
tokens "1", "2", "3": arithmetic then works digit by digit instead of memorising a token per number.
"""

import os
import tempfile

from cs336_alignment.text_tokenizer import DEFAULT_EOS, BasicsTokenizer
from cs336_basics.tokenizer import Tokenizer, train_bpe

DIGITS = frozenset(b"0123456789")


def digit_free(vocab: dict[int, bytes], merges: list[tuple[bytes, bytes]], special: list[str]):
    """Drops merges (and their tokens) that contain a digit; re-numbers ids densely (bytes, specials, merges)."""
    kept = [(a, b) for a, b in merges if not (DIGITS & set(a + b))]
    tokens = [bytes([i]) for i in range(256)] + [s.encode() for s in special] + [a + b for a, b in kept]
    return dict(enumerate(tokens)), kept


def train_demo_tokenizer(text: str, vocab_size: int, eos: str = DEFAULT_EOS) -> BasicsTokenizer:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "corpus.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        vocab, merges = train_bpe(path, vocab_size, [eos], num_workers=1)
    vocab, merges = digit_free(vocab, merges, [eos])
    return BasicsTokenizer(Tokenizer(vocab, merges, [eos]), eos)
