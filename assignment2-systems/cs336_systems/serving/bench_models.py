"""Random-weight models for the serving benchmark, written as Hugging Face folders (config.json, safetensors,
tokenizer.json) so that the server (`--hf-model`), Hugging Face `generate` and our own decoding all load the same
weights. Nothing is downloaded.

The tokenizer is a synthetic byte-level BPE whose vocabulary fills the model's: the 256 bytes, then two-byte
merges, then `<|endoftext|>` as the last id. Every id a random model can emit thus decodes to text, which the
server's incremental detokenizer needs.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from cs336_basics.hf.tokenizer_files import EOS


def synthetic_bpe(vocab_size: int) -> tuple[dict[int, bytes], list[tuple[bytes, bytes]]]:
    """A vocabulary of exactly `vocab_size` ids once `<|endoftext|>` is added (id vocab_size - 1): 256 single
    bytes and vocab_size - 257 two-byte tokens, each made by one merge."""
    if not 257 <= vocab_size <= 256 + 256 * 256 + 1:
        raise ValueError(f"vocab_size must lie in [257, 65793] for a byte + two-byte vocabulary, got {vocab_size}")
    vocab = {i: bytes([i]) for i in range(256)}
    merges: list[tuple[bytes, bytes]] = []
    for k in range(vocab_size - 257):
        a, b = bytes([k // 256]), bytes([k % 256])
        merges.append((a, b))
        vocab[256 + k] = a + b
    return vocab, merges


def write_tokenizer(out_dir: str | os.PathLike, vocab_size: int, model_max_length: int) -> int:
    """tokenizer.json + tokenizer_config.json for `synthetic_bpe(vocab_size)`; returns the eos id."""
    from cs336_basics.hf.tokenizer_files import write_tokenizer_files

    vocab, merges = synthetic_bpe(vocab_size)
    write_tokenizer_files(vocab, merges, [EOS], model_max_length, out_dir)
    return vocab_size - 1


def write_random_llama(
    out_dir: str | os.PathLike,
    *,
    hidden_size: int = 768,
    num_layers: int = 12,
    num_heads: int = 12,
    num_kv_heads: int | None = None,
    intermediate_size: int = 2048,
    vocab_size: int = 32_000,
    max_position: int = 2048,
    dtype: str = "bfloat16",
    seed: int = 0,
) -> dict[str, Any]:
    """A randomly initialised `LlamaForCausalLM` (transformers' own init) saved with `save_pretrained`, with the
    synthetic tokenizer. Defaults: the ~125M-parameter Llama shape of the serving benchmark."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    eos = vocab_size - 1
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads or num_heads, max_position_embeddings=max_position,
        tie_word_embeddings=False, bos_token_id=eos, eos_token_id=eos, pad_token_id=None,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    write_tokenizer(out_dir, vocab_size, max_position)
    return {"source": "transformers LlamaConfig, random init", "hf_dir": os.fspath(out_dir),
            "parameters": sum(p.numel() for p in model.parameters()), "dtype": dtype, "eos_token_id": eos,
            "context_length": max_position, "vocab_size": vocab_size}


def write_random_preset(
    out_dir: str | os.PathLike, preset: str, *, context_length: int | None = None, dtype: str = "bfloat16",
    seed: int = 0,
) -> dict[str, Any]:
    """A `cs336_basics` preset's architecture with random weights (our init), exported with `export_hf`.

    `context_length` overrides the preset's (random weights and RoPE: only the longest servable sequence
    changes, not the parameters)."""
    import torch

    from cs336_basics.hf import export_hf
    from cs336_basics.model import TransformerLM
    from cs336_basics.tokenizer import save_tokenizer
    from cs336_basics.training.config import config_from_preset

    overrides = {} if context_length is None else {"context_length": context_length}
    config = config_from_preset(preset, **overrides).model_config()
    torch.manual_seed(seed)
    model = TransformerLM(config)
    vocab, merges = synthetic_bpe(config.vocab_size)
    with tempfile.TemporaryDirectory(prefix="cs336-bench-tok-") as tok_dir:
        save_tokenizer(vocab, merges, tok_dir)
        summary = export_hf((model, config), tok_dir, out_dir, overwrite=True, dtype=dtype)
    return {"source": f"cs336_basics preset {preset!r}, random init", "preset": preset, "hf_dir": os.fspath(out_dir),
            "parameters": summary["parameters"], "dtype": dtype, "eos_token_id": summary["eos_token_id"],
            "context_length": config.context_length, "preset_context_length": config_from_preset(preset).context_length,
            "vocab_size": config.vocab_size}


def kv_bytes_per_token(hf_dir: str | os.PathLike, dtype_bytes: int = 2) -> int:
    """K and V bytes one token of one sequence costs over all layers, from config.json (Llama/Mistral shapes)."""
    import json

    cfg = json.loads((Path(hf_dir) / "config.json").read_text())
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    return 2 * cfg["num_hidden_layers"] * kv_heads * head_dim * dtype_bytes
