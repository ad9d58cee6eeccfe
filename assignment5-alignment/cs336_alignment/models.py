"""Loading a model and tokenizer for generation: a Hugging Face directory or a cs336_basics training run."""

import os
from typing import Any

import torch
from torch import nn

from cs336_alignment.lm import BasicsCausalLM
from cs336_alignment.text_tokenizer import DEFAULT_EOS, BasicsTokenizer


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as e:
        from cs336_basics.cli_support import UserError

        raise UserError(f"--device {device!r} is not a device (cpu, cuda, cuda:1, mps, auto)") from e


def load_hf(path: str, device: str = "auto", dtype: str = "auto") -> tuple[nn.Module, Any]:
    """AutoModelForCausalLM + AutoTokenizer from a local directory (offline: nothing is downloaded)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model directory {path} does not exist")
    target = resolve_device(device)
    torch_dtype = {"auto": torch.bfloat16 if target.type == "cuda" else torch.float32, "float32": torch.float32,
                   "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
    if torch_dtype is None:
        raise ValueError(f"unknown dtype {dtype!r}; expected auto, float32, bfloat16 or float16")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, local_files_only=True)
    return model.to(target).eval(), tokenizer


def load_basics(run_dir: str, tokenizer_dir: str, device: str = "auto", eos_token: str = DEFAULT_EOS):
    """A `cs336-basics train` run (config + checkpoint) and its BPE files (vocab.json, merges.txt)."""
    from cs336_basics.checkpoint import load_checkpoint_state
    from cs336_basics.model import TransformerConfig, TransformerLM
    from cs336_basics.tokenizer import Tokenizer

    state = load_checkpoint_state(os.path.join(run_dir, "checkpoint.pt"), map_location="cpu")
    config = state.get("extra", {}).get("model_config")
    if config is None:
        raise ValueError(f"{run_dir}/checkpoint.pt does not record its model configuration")
    model = TransformerLM(TransformerConfig(**config))
    model.load_state_dict(state["model"])
    paths = [os.path.join(tokenizer_dir, name) for name in ("vocab.json", "merges.txt")]
    for p in paths:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{p} not found")
    tokenizer = BasicsTokenizer(Tokenizer.from_files(*paths, special_tokens=[eos_token]), eos_token)
    return BasicsCausalLM(model).to(resolve_device(device)).eval(), tokenizer


def load_model(
    model: str | None, basics_run: str | None, basics_tokenizer: str | None, device: str = "auto",
    dtype: str = "auto",
) -> tuple[nn.Module, Any]:
    """The CLI's model flags: a Hugging Face directory (`--model`), or a cs336-basics run with its tokenizer."""
    if model:
        return load_hf(model, device, dtype)
    if basics_run and basics_tokenizer:
        return load_basics(basics_run, basics_tokenizer, device)
    raise ValueError("give --model DIR, or --basics-run DIR with --basics-tokenizer DIR")
