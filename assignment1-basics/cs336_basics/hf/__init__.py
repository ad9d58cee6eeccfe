"""Hugging Face interop: export a cs336 model as Llama / Mistral / DeepseekV3 (safetensors + a fast tokenizer)
and import such a folder back (`from_hf`, `import_hf`). `cli.add_commands` wires `export-hf` and `import-hf`."""

from cs336_basics.hf.architectures import architecture_for, config_from_hf, hf_config
from cs336_basics.hf.interop import export_hf, from_hf, import_hf, load_run
from cs336_basics.hf.weights import from_hf_state_dict, to_hf_state_dict

__all__ = [
    "architecture_for",
    "config_from_hf",
    "export_hf",
    "from_hf",
    "from_hf_state_dict",
    "hf_config",
    "import_hf",
    "load_run",
    "to_hf_state_dict",
]
