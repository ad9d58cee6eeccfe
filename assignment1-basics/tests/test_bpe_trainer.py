"""BPE training against a brute-force trainer that recounts every pair before each merge."""

import io
import itertools
import os
import random
import tempfile
from collections import Counter

import pytest
import regex
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cs336_basics.tokenizer import train_bpe, train_bpe_from_counts
from cs336_basics.tokenizer.pretokenize import count_pretokens, find_chunk_boundaries, split_token_for_chunking

GPT2_SPLIT = regex.compile(r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
EOT = "<|endoftext|>"


def naive_split(text: str, special_tokens: list[str]) -> list[str]:
    """Spans between special tokens, scanning left to right and taking the longest token at a position."""
    spans, start, i = [], 0, 0
    while i < len(text):
        hits = [token for token in special_tokens if text.startswith(token, i)]
        if hits:
            spans.append(text[start:i])
            i = start = i + max(map(len, hits))
        else:
            i += 1
    spans.append(text[start:])
    return spans


def naive_counts(text: str, special_tokens: list[str]) -> Counter[bytes]:
    return Counter(p.encode() for span in naive_split(text, special_tokens) for p in GPT2_SPLIT.findall(span))


def naive_merge(word: tuple[bytes, ...], pair: tuple[bytes, bytes]) -> tuple[bytes, ...]:
    out, i = [], 0
    while i < len(word):
        if word[i : i + 2] == pair:
            out.append(pair[0] + pair[1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def brute_force_bpe(counts: Counter[bytes], vocab_size: int, special_tokens: list[str]):
    vocab = [bytes([b]) for b in range(256)] + [t.encode() for t in special_tokens]
    words = Counter({tuple(bytes([b]) for b in word): n for word, n in counts.items()})
    merges = []
    while len(vocab) < vocab_size:
        pairs: Counter[tuple[bytes, bytes]] = Counter()
        for word, n in words.items():
            for pair in itertools.pairwise(word):
                pairs[pair] += n
        if not pairs:
            break
        best = max(pairs, key=lambda pair: (pairs[pair], pair))
        merges.append(best)
        vocab.append(best[0] + best[1])
        merged: Counter[tuple[bytes, ...]] = Counter()
        for word, n in words.items():
            merged[naive_merge(word, best)] += n
        words = merged
    return dict(enumerate(vocab)), merges


def write_temp(text: str) -> str:
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", suffix=".txt", delete=False) as f:
        f.write(text)
    return f.name


# Few distinct pieces, so counts tie often; "<|", "|>" and "endoftext" are near misses of the special token.
PIECES = ["low", "lower", " low", " lowest", "newest", " widest", " the", "aa", "aaa", "ab", "ba", " ", "  ", "'s"]
PIECES += ["'ll", "!!", "\n", "\n\n", "héllo", " 日本", "🙃", "12", " 345", "<|", "|>", "endoftext"]
corpora = st.lists(
    st.one_of(st.sampled_from(PIECES), st.sampled_from([EOT, "<pad>"]), st.text(max_size=4)), max_size=80
).map("".join)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=corpora, specials=st.sampled_from([[], [EOT], [EOT, "<pad>"], [EOT, EOT + EOT]]), extra=st.integers(0, 40))
def test_matches_brute_force(text, specials, extra):
    path = write_temp(text)
    try:
        vocab, merges = train_bpe(path, 256 + len(specials) + extra, specials, num_workers=1)
    finally:
        os.unlink(path)
    expected_vocab, expected_merges = brute_force_bpe(
        naive_counts(text, specials), 256 + len(specials) + extra, specials
    )
    assert merges == expected_merges
    assert vocab == expected_vocab


def test_handout_example():
    """The handout's example: whitespace pre-tokens {low: 5, lower: 2, widest: 3, newest: 6}."""
    counts = {b"low": 5, b"lower": 2, b"widest": 3, b"newest": 6}
    expected = ["s t", "e st", "o w", "l ow", "w est", "n e", "ne west", "w i", "wi d", "wid est", "low e", "lowe r"]
    expected = [tuple(m.encode().split(b" ")) for m in expected]
    _, merges = train_bpe_from_counts(counts, 256 + 1 + 12, [EOT])
    assert merges == expected
    vocab6, merges6 = train_bpe_from_counts(counts, 256 + 1 + 6, [EOT])
    assert merges6 == expected[:6]
    assert vocab6[256] == EOT.encode()
    assert [vocab6[i] for i in range(257, 263)] == [b"st", b"est", b"ow", b"low", b"west", b"ne"]
    assert brute_force_bpe(Counter(counts), 256 + 1 + 12, [EOT])[1] == expected  # the reference agrees too


def test_training_stops_when_nothing_is_left_to_merge():
    vocab, merges = train_bpe_from_counts({b"ab": 3}, 1000)
    assert merges == [(b"a", b"b")] and len(vocab) == 257


def test_special_tokens_are_never_merged_across(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text(("x" + EOT) * 50 + "y", encoding="utf-8")
    vocab, merges = train_bpe(path, 300, [EOT])
    assert merges == []  # every pre-token is a single byte once the special tokens are cut out
    assert sorted(vocab.values()) == sorted([bytes([b]) for b in range(256)] + [EOT.encode()])


def make_documents(seed: int, num_docs: int) -> str:
    rng = random.Random(seed)
    words = ["the", "cat", "sat", "on", "mat", "héllo", "wörld", "日本語", "42", "1999", "don't", "it's", "!", "?"]
    docs = []
    for _ in range(num_docs):
        n = rng.randint(1, 60)
        docs.append(" ".join(rng.choice(words) + rng.choice(["", "", "s", "ed", "\n"]) for _ in range(n)))
    return EOT.join(docs)


def test_parallel_counting_equals_single_process(tmp_path):
    path = tmp_path / "docs.txt"
    path.write_text(make_documents(0, 2000), encoding="utf-8")
    with open(path, "rb") as f:
        assert len(find_chunk_boundaries(f, 8, EOT.encode())) - 1 == 8
    assert count_pretokens(path, [EOT], num_workers=2) == count_pretokens(path, [EOT], num_workers=1)
    assert train_bpe(path, 400, [EOT], num_workers=2) == train_bpe(path, 400, [EOT], num_workers=1)


@settings(max_examples=200, deadline=None)
@given(
    data=st.binary(max_size=300),
    token=st.sampled_from([b"<|endoftext|>", b"\n\n", b"x"]),
    positions=st.lists(st.integers(0, 300), max_size=10),
    chunks=st.integers(1, 12),
    scan=st.integers(1, 20),
)
def test_chunk_boundaries_are_the_first_token_after_each_guess(data, token, positions, chunks, scan):
    for p in sorted(positions, reverse=True):
        data = data[:p] + token + data[p:]
    boundaries = find_chunk_boundaries(io.BytesIO(data), chunks, token, scan_bytes=scan)
    expected = [0]
    for i in range(1, chunks):
        found = data.find(token, max(i * len(data) // chunks, expected[-1] + 1))
        if found < 0:
            break
        if found > expected[-1]:
            expected.append(found)
    assert boundaries == [*expected, len(data)]


def test_split_token_avoids_tokens_that_can_hide_inside_others():
    assert split_token_for_chunking([EOT]) == EOT.encode()
    assert split_token_for_chunking([EOT, EOT + EOT]) is None  # EOT sits inside EOT+EOT; EOT+EOT overlaps itself
    assert split_token_for_chunking(["aa", EOT]) == EOT.encode()  # "aa" overlaps itself
    assert split_token_for_chunking([]) is None


def test_clear_errors(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("hello", encoding="utf-8")
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe(path, 256, [EOT])
    with pytest.raises(FileNotFoundError):
        train_bpe(tmp_path / "missing.txt", 300, [])
    with pytest.raises(ValueError, match="special tokens"):
        train_bpe(path, 300, [""])
    with pytest.raises(ValueError, match="num_workers"):
        train_bpe(path, 300, [], num_workers=0)
    with pytest.raises(TypeError, match="list of strings"):
        train_bpe(path, 300, EOT)
