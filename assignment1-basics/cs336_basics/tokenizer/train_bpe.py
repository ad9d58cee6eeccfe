"""Byte-level BPE training with incremental pair counts.

Vocabulary layout: ids 0-255 are the byte values, then the special tokens in the order given, then one id per
merge in the order learned. Each merge joins the most frequent adjacent pair (counted over pre-tokens, weighted
by their frequency); ties go to the lexicographically greater pair of byte strings.
"""

import heapq
import itertools
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

from tqdm.auto import tqdm

from cs336_basics.tokenizer.pretokenize import count_pretokens, unique_special_tokens

Pair = tuple[int, int]


class _Descending:
    """Heap key that inverts the order of a pair of byte strings, so a min-heap pops the greatest pair first."""

    __slots__ = ("key",)

    def __init__(self, key: tuple[bytes, bytes]):
        self.key = key

    def __lt__(self, other: "_Descending") -> bool:
        return self.key > other.key


def train_bpe(
    input_path: str | os.PathLike,
    vocab_size: int,
    special_tokens: Sequence[str] | None = None,
    *,
    num_workers: int | None = None,
    progress: bool = False,
) -> tuple[dict[int, bytes], list[tuple[bytes, bytes]]]:
    """Trains a byte-level BPE tokenizer on a UTF-8 text file; returns (vocab, merges).

    Special tokens split the text and are removed before counting, so no merge crosses them. Pre-tokens are
    counted over `num_workers` processes (None: chosen from the file size). Training stops early when no
    pair is left to merge, so the vocabulary can come out smaller than `vocab_size`.
    """
    path = Path(input_path)
    if not path.is_file():
        raise FileNotFoundError(f"training corpus {path} does not exist or is not a file")
    special_tokens = unique_special_tokens(special_tokens)
    _check_vocab_size(vocab_size, special_tokens)
    counts = count_pretokens(path, special_tokens, num_workers=num_workers)
    pretoken_counts = {pretoken.encode("utf-8"): count for pretoken, count in counts.items()}
    return train_bpe_from_counts(pretoken_counts, vocab_size, special_tokens, progress=progress)


def train_bpe_from_counts(
    pretoken_counts: Mapping[bytes, int],
    vocab_size: int,
    special_tokens: Sequence[str] | None = None,
    *,
    progress: bool = False,
) -> tuple[dict[int, bytes], list[tuple[bytes, bytes]]]:
    """Learns merges from pre-token counts (the part of training after pre-tokenization)."""
    special_tokens = unique_special_tokens(special_tokens)
    _check_vocab_size(vocab_size, special_tokens)
    token_bytes = [bytes([i]) for i in range(256)] + [token.encode("utf-8") for token in special_tokens]
    num_merges = vocab_size - len(token_bytes)
    merges = _learn_merges(pretoken_counts, token_bytes, num_merges, progress)
    return dict(enumerate(token_bytes)), merges


def _check_vocab_size(vocab_size: int, special_tokens: Sequence[str]) -> None:
    minimum = 256 + len(special_tokens)
    if vocab_size < minimum:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: the 256 byte values and {len(special_tokens)} special "
            f"token(s) already take {minimum} ids"
        )


def _learn_merges(
    pretoken_counts: Mapping[bytes, int], token_bytes: list[bytes], num_merges: int, progress: bool
) -> list[tuple[bytes, bytes]]:
    """Runs `num_merges` merges, appending each new token to `token_bytes` (ids are list positions).

    Keeps pair -> count, pair -> words that (may) contain it, and each distinct pre-token's current token ids;
    a merge rewrites only the words listed for its pair and updates the counts by the difference. The best pair
    comes from a heap of (-count, descending pair bytes) entries; an entry whose count no longer matches the
    current count is stale and skipped when popped.
    """
    words: list[list[int]] = []
    freqs: list[int] = []
    for pretoken, count in pretoken_counts.items():
        if len(pretoken) > 1 and count > 0:  # single bytes have no pairs
            words.append(list(pretoken))
            freqs.append(count)

    pair_counts: dict[Pair, int] = defaultdict(int)
    pair_words: dict[Pair, set[int]] = defaultdict(set)
    for index, (word, freq) in enumerate(zip(words, freqs, strict=True)):
        for pair in itertools.pairwise(word):
            pair_counts[pair] += freq
            pair_words[pair].add(index)
    pair_counts = dict(pair_counts)

    def entry(pair: Pair, count: int) -> tuple[int, _Descending, int, int]:
        return -count, _Descending((token_bytes[pair[0]], token_bytes[pair[1]])), pair[0], pair[1]

    heap = [entry(pair, count) for pair, count in pair_counts.items()]
    heapq.heapify(heap)

    merges: list[tuple[bytes, bytes]] = []
    for _ in tqdm(range(num_merges), desc="BPE merges", disable=not progress):
        while heap:
            negative_count, _, a, b = heap[0]
            count = pair_counts.get((a, b), 0)
            if count == -negative_count:
                break
            heapq.heappop(heap)
            if count:  # the count went down since this entry was pushed (increases push their own entry)
                heapq.heappush(heap, entry((a, b), count))
        if not heap:
            break
        _, _, a, b = heapq.heappop(heap)
        new = len(token_bytes)
        token_bytes.append(token_bytes[a] + token_bytes[b])
        merges.append((token_bytes[a], token_bytes[b]))

        delta: dict[Pair, int] = defaultdict(int)
        for index in pair_words.pop((a, b)):
            merged = _merge_word(words[index], a, b, new, freqs[index], delta, pair_words, index)
            if merged is not None:
                words[index] = merged
        del pair_counts[a, b]  # no occurrence is left (for a == b, `delta` holds part of its count: drop it)
        delta.pop((a, b), None)
        for pair, change in delta.items():
            count = pair_counts.get(pair, 0) + change
            if count:
                pair_counts[pair] = count
                if change > 0:
                    heapq.heappush(heap, entry(pair, count))
            else:
                pair_counts.pop(pair, None)
    return merges


def _merge_word(
    word: list[int],
    a: int,
    b: int,
    new: int,
    freq: int,
    delta: dict[Pair, int],
    pair_words: dict[Pair, set[int]],
    index: int,
) -> list[int] | None:
    """`word` with each non-overlapping (a, b), left to right, replaced by `new`, or None if it has none.

    Adds the change of the counts of the neighbouring pairs (times `freq`) to `delta` and registers word `index`
    under the new pairs, touching only the pairs around each occurrence; the pair between two adjacent
    occurrences is handled by the second one. The count of (a, b) itself is left to the caller.
    """
    n = len(word)
    out: list[int] = []
    i = 0
    while i < n:
        if word[i] == a and i + 1 < n and word[i + 1] == b:
            if out:
                delta[word[i - 1], a] -= freq
                delta[out[-1], new] += freq
                pair_words[out[-1], new].add(index)
            if i + 2 < n and not (word[i + 2] == a and i + 3 < n and word[i + 3] == b):
                delta[b, word[i + 2]] -= freq
                delta[new, word[i + 2]] += freq
                pair_words[new, word[i + 2]].add(index)
            out.append(new)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out if len(out) < n else None
