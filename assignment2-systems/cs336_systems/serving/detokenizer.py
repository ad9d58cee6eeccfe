"""Streaming detokenization and stop strings.

Decoding all output tokens again at every step would cost O(length²); instead each sequence decodes a short
window: the tokens since the last stable point, compared with the same window minus the newest tokens. A
window that ends in U+FFFD (an unfinished multi-byte character) waits for the next token.
"""

from collections.abc import Callable


def tolerant(decode: Callable[[list[int]], str]) -> Callable[[list[int]], str]:
    """`decode` that renders ids the tokenizer doesn't know (a model whose vocabulary was padded past the
    tokenizer's, as many are) as U+FFFD instead of raising inside the engine's step."""

    def safe(ids: list[int]) -> str:
        try:
            return decode(ids)
        except (ValueError, KeyError, IndexError, OverflowError):
            pieces = []
            for i in ids:
                try:
                    pieces.append(decode([i]))
                except (ValueError, KeyError, IndexError, OverflowError):
                    pieces.append("\ufffd")
            return "".join(pieces)

    return safe


def batch_decoder(tokenizer) -> Callable[[list[list[int]]], list[str]]:
    """Decodes many id lists in one call: one Rust call for a Hugging Face fast tokenizer (decoding each
    sequence's window separately would cost a Python round trip per token per step)."""
    fast = getattr(tokenizer, "decode_batch", None)
    if fast is not None:
        return fast
    decode = tolerant(tokenizer.decode)
    return lambda batch: [decode(ids) for ids in batch]


class IncrementalDetokenizer:
    def __init__(self, decode: Callable[[list[int]], str], prompt_ids: list[int], context_tokens: int = 4):
        self.decode = tolerant(decode)
        self.ids: list[int] = list(prompt_ids[-context_tokens:])  # a little prompt context for tokenizers that
        self.prefix = 0  # strip leading spaces (SentencePiece); decoded text before `read` is already out
        self.read = len(self.ids)

    def push(self, token_id: int) -> str:
        """The text this token adds (possibly "", when it ends inside a character)."""
        self.ids.append(token_id)
        before, now = self.windows()
        return self.advance(self.decode(before), self.decode(now))

    def windows(self) -> tuple[list[int], list[int]]:
        """The two id windows whose decoded texts differ by the newest text (for batched decoding)."""
        return self.ids[self.prefix : self.read], self.ids[self.prefix :]

    def advance(self, before: str, now: str) -> str:
        if now.endswith("\ufffd") or len(now) <= len(before):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return now[len(before) :]

    def step_windows(self, steps: int) -> list[list[int]]:
        """After `steps` ids were added at once: the id windows from `prefix` that end after each of them but
        the last (the last one is `windows()[1]`), for `advance_steps`."""
        end = len(self.ids)
        return [self.ids[self.prefix : end - steps + j] for j in range(1, steps)]

    def advance_steps(self, before: str, nows: list[str]) -> str:
        """What `push`ing the newest len(nows) ids one at a time would add in all, from the texts of
        `windows()[0]` and of the windows from `prefix` that end after each of those ids (`step_windows` and
        then `windows()[1]`): each step advances when its text does not end in U+FFFD and is longer than the
        text that was read. Equal to the per-token pushes for decoders where decoding from a point after which
        text was read gives that same text's continuation (byte-level BPE, SentencePiece), i.e. all decoders
        for which `push` itself is right; the state afterwards is the per-token one."""
        base = len(self.ids) - len(nows)
        read_len, last = len(before), None
        prefix, read = self.prefix, self.read
        for j, now in enumerate(nows, 1):
            if len(now) > read_len and not now.endswith("\ufffd"):
                prefix, read, read_len, last = read, base + j, len(now), now
        if last is None:
            return ""
        self.prefix, self.read = prefix, read
        return last[len(before) :]

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end), as replacement characters."""
        before = self.decode(self.ids[self.prefix : self.read])
        now = self.decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return now[len(before) :] if len(now) > len(before) else ""


def find_stop(text: str, stops: list[str], new_from: int) -> int | None:
    """Index where the first stop string in `text` starts, looking only where it could overlap new text."""
    if not stops:
        return None
    best = None
    for stop in stops:
        start = max(0, new_from - len(stop) + 1)
        at = text.find(stop, start)
        if at != -1 and (best is None or at < best):
            best = at
    return best


def holdback(stops: list[str]) -> int:
    """Characters to keep from a stream until they can no longer begin a stop string."""
    return max((len(s) for s in stops), default=1) - 1
