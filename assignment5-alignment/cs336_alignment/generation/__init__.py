"""Text generation behind one interface: `backend.generate(prompts, SamplingParams) -> list[Completion]`."""

from typing import Any

from torch import nn

from cs336_alignment.generation.native import NativeBackend
from cs336_alignment.generation.params import Completion, GenerationBackend, SamplingParams

__all__ = ["Completion", "GenerationBackend", "NativeBackend", "SamplingParams", "make_backend"]


def make_backend(kind: str, model: nn.Module | str, tokenizer: Any = None, **kwargs: Any) -> GenerationBackend:
    """"native" takes a loaded model and tokenizer; "vllm" takes a model path (and imports vLLM now)."""
    if kind == "native":
        if isinstance(model, str) or tokenizer is None:
            raise ValueError("the native backend needs a loaded model and its tokenizer")
        return NativeBackend(model, tokenizer, **kwargs)
    if kind == "vllm":
        from cs336_alignment.generation.vllm_backend import VLLMBackend

        if not isinstance(model, str):
            raise ValueError("the vllm backend needs a model path, not a loaded model")
        return VLLMBackend(model, **kwargs)
    raise ValueError(f"unknown backend {kind!r}; expected 'native' or 'vllm'")
