"""Parameter-efficient fine-tuning written from the papers: LoRA (Hu et al. 2021) and QLoRA's NF4 4-bit base
weights with double-quantised scales (Dettmers et al. 2023).

`config.py` (the settings), `layer.py` (`LoRALinear`, `NF4Linear`, `QLoRALinear`), `model.py` (inject by name
pattern, only adapters trainable, merge/unmerge, save/load adapters alone), `nf4.py` (the code book and the
block-wise quantiser), `nf4_triton.py` (de-quantisation as one Triton kernel on CUDA).
"""

from cs336_alignment.peft.config import DEFAULT_TARGETS, LoRAConfig
from cs336_alignment.peft.layer import LoRALinear, NF4Linear, QLoRALinear
from cs336_alignment.peft.model import (
    has_lora,
    inject_lora,
    linear_layers,
    load_adapters,
    lora_disabled,
    lora_layers,
    lora_state_dict,
    mark_only_lora_trainable,
    matches,
    merge_lora,
    save_adapters,
    unload_lora,
    unmerge_lora,
)
from cs336_alignment.peft.nf4 import NF4Tensor, dequantize_nf4, nf4_code_book, quantize_nf4

__all__ = [
    "DEFAULT_TARGETS",
    "LoRAConfig",
    "LoRALinear",
    "NF4Linear",
    "NF4Tensor",
    "QLoRALinear",
    "dequantize_nf4",
    "has_lora",
    "inject_lora",
    "linear_layers",
    "load_adapters",
    "lora_disabled",
    "lora_layers",
    "lora_state_dict",
    "mark_only_lora_trainable",
    "matches",
    "merge_lora",
    "nf4_code_book",
    "quantize_nf4",
    "save_adapters",
    "unload_lora",
    "unmerge_lora",
]
