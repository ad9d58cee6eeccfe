"""Hugging Face interop: export a cs336 model as Llama / Mistral / DeepseekV3 (safetensors + a fast tokenizer)
and import such a folder back (`from_hf`, `import_hf`). `cli.add_commands` wires `export-hf` and `import-hf`.

The names below load on first use, so that building the CLI's parser (which imports `cs336_basics.hf.cli`)
does not import torch.
"""

import importlib

_HOMES = {
    "architecture_for": "architectures",
    "config_from_hf": "architectures",
    "hf_config": "architectures",
    "export_hf": "interop",
    "from_hf": "interop",
    "import_hf": "interop",
    "load_run": "interop",
    "from_hf_state_dict": "weights",
    "to_hf_state_dict": "weights",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
