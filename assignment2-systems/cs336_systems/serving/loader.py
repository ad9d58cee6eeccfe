"""What the server serves: a model, its tokenizer, its end-of-text ids and chat template, from a
`cs336-basics train` run, a Hugging Face causal-LM folder (converted to a `cs336_basics` model, so every
architecture that `cs336_basics.hf` imports can be paged), or random weights for tests."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cs336_basics.cli_support import UserError

END_OF_TEXT = "<|endoftext|>"


@dataclass
class ServedModel:
    model: Any  # cs336_basics.model.TransformerLM
    tokenizer: Any  # encode(str) -> list[int], decode(list[int]) -> str
    name: str
    eos_token_ids: list[int] = field(default_factory=list)
    chat_renderer: Callable[[list[dict]], str] | None = None  # None: chat.py's plain template
    model_config: Any = None  # the model's config where `model` is None (`without_weights`)

    @property
    def config(self) -> Any:
        return self.model.config if self.model is not None else self.model_config

    @property
    def context_length(self) -> int:
        return self.config.context_length

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def without_weights(self) -> ServedModel:
        """A copy for processes that tokenize and render chats but never run the model (the engine's clients):
        no tensors, and picklable for a spawned process as long as the tokenizer and renderer are."""
        return dataclasses.replace(self, model=None, model_config=self.config)

    def apply_chat_template(self, messages: list[dict]) -> str:
        if self.chat_renderer is not None:
            return self.chat_renderer(messages)
        from cs336_systems.serving.chat import render_plain

        return render_plain(messages)


class ByteTokenizer:
    """256 byte tokens + <|endoftext|> (id 256): the tokenizer of test models, made by `cs336_basics`' BPE
    tokenizer with no merges."""

    def __new__(cls):
        from cs336_basics.tokenizer import Tokenizer

        vocab = {i: bytes([i]) for i in range(256)} | {256: END_OF_TEXT.encode()}
        return Tokenizer(vocab, [], [END_OF_TEXT])


def tiny_served_model(seed: int = 0, name: str = "tiny", **config_overrides) -> ServedModel:
    """A random-weight model over the byte tokenizer, small enough for CPU tests."""
    import torch

    from cs336_basics.model import TransformerConfig, TransformerLM

    settings = dict(vocab_size=257, context_length=128, d_model=64, num_layers=2, num_heads=4, d_ff=128)
    settings.update(config_overrides)
    torch.manual_seed(seed)
    model = TransformerLM(TransformerConfig(**settings)).eval()
    return ServedModel(model, ByteTokenizer(), name, eos_token_ids=[256])


def load_run_model(run_dir: str, tokenizer_dir: str | None = None, name: str | None = None) -> ServedModel:
    """A trained run; its tokenizer is `tokenizer_dir`, or the `tokenizer/` folder beside the run (quickstart's
    layout) when none is given."""
    from cs336_basics.artifacts import load_tokenizer
    from cs336_basics.hf.interop import load_run

    if tokenizer_dir is None:
        beside = os.path.join(os.path.dirname(os.path.abspath(run_dir)), "tokenizer")
        if not os.path.isdir(beside):
            raise UserError(f"no tokenizer given and none beside the run ({beside}); pass --tokenizer DIR")
        tokenizer_dir = beside
    model, _ = load_run(run_dir)
    tokenizer = load_tokenizer(tokenizer_dir, [END_OF_TEXT])
    eos = tokenizer.encode(END_OF_TEXT)
    return ServedModel(model, tokenizer, name or os.path.basename(os.path.abspath(run_dir)), eos_token_ids=eos)


class HFTokenizer:
    """A transformers tokenizer behind the two calls the engine makes."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def decode_batch(self, batch: list[list[int]]) -> list[str]:
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None:
            return [self.decode(ids) for ids in batch]
        vocab = backend.get_vocab_size(with_added_tokens=True)
        # The Rust decoder rejects ids past its vocabulary (models often pad theirs): those become U+FFFD.
        if max(map(max, filter(None, batch)), default=-1) >= vocab:
            return [self.decode([i for i in ids if i < vocab]) + "\ufffd" * sum(i >= vocab for i in ids)
                    for ids in batch]
        return backend.decode_batch(batch, skip_special_tokens=True)


def load_hf_model(hf_dir: str, name: str | None = None) -> ServedModel:
    """A Hugging Face folder (config.json, safetensors, tokenizer files), read offline."""
    from cs336_basics.hf.interop import from_hf

    try:
        from transformers import AutoTokenizer
    except ImportError as e:
        raise UserError("--hf-model needs the `transformers` package (pip install transformers)") from e
    model, _ = from_hf(hf_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the tokenizer in {hf_dir}: {str(e).splitlines()[0]}") from e
    eos = _eos_ids(hf_dir, tokenizer)
    renderer = None
    if getattr(tokenizer, "chat_template", None):
        from cs336_systems.serving.chat import render_hf

        renderer = functools.partial(render_hf, tokenizer)  # picklable, unlike a closure: HTTP workers get it
    return ServedModel(model.eval(), HFTokenizer(tokenizer), name or os.path.basename(os.path.abspath(hf_dir)),
                       eos_token_ids=eos, chat_renderer=renderer)


def _eos_ids(hf_dir: str, tokenizer) -> list[int]:
    ids: list[int] = []
    for file in ("generation_config.json", "config.json"):
        path = os.path.join(hf_dir, file)
        if os.path.isfile(path):
            with open(path) as f:
                value = json.load(f).get("eos_token_id")
            if value is not None:
                ids += value if isinstance(value, list) else [value]
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(ids))
