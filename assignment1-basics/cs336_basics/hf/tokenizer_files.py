"""Our byte-level BPE as a Hugging Face fast tokenizer (tokenizer.json) and back.

GPT-2 conventions on both sides: the byte <-> printable-character table, the GPT-2 pre-tokenization regex
(the `tokenizers` ByteLevel pre-tokenizer with use_regex=True is exactly `GPT2_PATTERN`), merges applied by
rank, special tokens split out before pre-tokenization and never merged across. So the two encode any
text to the same ids (tested on text with special tokens, unicode and whitespace runs).
"""

import json
import os
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from cs336_basics.cli_support import UserError
from cs336_basics.tokenizer.serialization import str_to_token, token_to_str

EOS = "<|endoftext|>"


def build_fast_tokenizer(vocab: dict[int, bytes], merges: list[tuple[bytes, bytes]],
                         special_tokens: list[str]) -> HFTokenizer:
    """A `tokenizers.Tokenizer` equal to `cs336_basics.tokenizer.Tokenizer(vocab, merges, special_tokens)`.

    Special tokens missing from `vocab` get the ids our Tokenizer gives them (after the largest id).
    """
    vocab = dict(vocab)
    ids_by_bytes = {token: token_id for token_id, token in sorted(vocab.items(), reverse=True)}  # smallest id wins
    for token in special_tokens:
        encoded = token.encode("utf-8")
        if encoded not in ids_by_bytes:
            new_id = max(vocab, default=-1) + 1
            vocab[new_id], ids_by_bytes[encoded] = encoded, new_id
    strings = {token_to_str(token): token_id for token_id, token in sorted(vocab.items())}
    if len(strings) != len(vocab):
        raise UserError("the vocabulary maps several ids to the same bytes, which tokenizer.json cannot hold")
    bpe = models.BPE(vocab=strings, merges=[(token_to_str(a), token_to_str(b)) for a, b in merges],
                     fuse_unk=False, byte_fallback=False)
    tokenizer = HFTokenizer(bpe)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    # The special token's vocabulary entry is its GPT-2-mapped string; for ASCII tokens such as <|endoftext|>
    # that is the token itself, so the added token reuses the vocabulary id.
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens])
    for token in special_tokens:
        if tokenizer.token_to_id(token) != ids_by_bytes[token.encode("utf-8")]:
            raise UserError(f"special token {token!r} would get id {tokenizer.token_to_id(token)} in tokenizer.json "
                            f"but has id {ids_by_bytes[token.encode('utf-8')]} in our vocabulary")
    return tokenizer


def tokenizer_config(special_tokens: list[str], model_max_length: int) -> dict[str, Any]:
    eos = EOS if EOS in special_tokens else (special_tokens[0] if special_tokens else None)
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",  # the plain fast tokenizer: no Llama BOS/prefix rules
        "bos_token": eos,
        "eos_token": eos,
        "unk_token": None,
        "pad_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "extra_special_tokens": [t for t in special_tokens if t != eos],
    }


def write_tokenizer_files(vocab: dict[int, bytes], merges: list[tuple[bytes, bytes]], special_tokens: list[str],
                          model_max_length: int, out_dir: str | os.PathLike) -> None:
    """tokenizer.json and tokenizer_config.json into out_dir (a staging folder: no atomicity needed here)."""
    build_fast_tokenizer(vocab, merges, special_tokens).save(os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(tokenizer_config(special_tokens, model_max_length), f, indent=2)


def _is_gpt2_byte_level(pre_tokenizer: dict | None) -> bool:
    """True for ByteLevel(use_regex=True, add_prefix_space=False), alone or as the only step of a Sequence."""
    if pre_tokenizer and pre_tokenizer.get("type") == "Sequence" and len(pre_tokenizer["pretokenizers"]) == 1:
        pre_tokenizer = pre_tokenizer["pretokenizers"][0]
    return (bool(pre_tokenizer) and pre_tokenizer.get("type") == "ByteLevel"
            and pre_tokenizer.get("use_regex", True) and not pre_tokenizer.get("add_prefix_space", False))


def read_tokenizer_json(path: str | os.PathLike) -> tuple[dict[int, bytes], list[tuple[bytes, bytes]], list[str]]:
    """(vocab, merges, special tokens) of a GPT-2 style byte-level BPE tokenizer.json; anything our Tokenizer
    would encode differently (a normalizer, another pre-tokenizer or model) is a `UserError` naming it."""
    spec = json.loads(Path(path).read_text(encoding="utf-8"))
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise UserError(f"{path}: the tokenizer model is {model.get('type')!r}, not byte-level BPE")
    if spec.get("normalizer") is not None:
        raise UserError(f"{path}: the tokenizer has a normalizer ({spec['normalizer'].get('type')}); ours has none")
    if not _is_gpt2_byte_level(spec.get("pre_tokenizer")):
        kind = (spec.get("pre_tokenizer") or {}).get("type")
        raise UserError(f"{path}: the pre-tokenizer ({kind}) is not GPT-2's byte-level regex, so our Tokenizer "
                        "would split text differently")
    special = [t["content"] for t in spec.get("added_tokens", []) if t.get("special")]
    try:
        vocab = {token_id: str_to_token(text) for text, token_id in model["vocab"].items()}
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
        merges = [(str_to_token(a), str_to_token(b)) for a, b in merges]
    except ValueError as e:
        raise UserError(f"{path}: not a byte-level vocabulary: {e}") from e
    for token in spec.get("added_tokens", []):  # added tokens are stored as raw text, not byte-mapped
        vocab[token["id"]] = token["content"].encode("utf-8")
    return vocab, merges, special
