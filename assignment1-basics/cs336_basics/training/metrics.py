"""Throughput accounting (FLOPs per token, MFU) and the JSONL metrics log."""

import json
import os
from typing import Any

import torch

from cs336_basics.model import TransformerLM

# Dense peak throughput in FLOP/s (no sparsity) by device-name fragment: (bf16, tf32, fp32).
PEAK_FLOPS = {
    "H200": (989e12, 494e12, 67e12),
    "H100": (989e12, 494e12, 67e12),
    "A100": (312e12, 156e12, 19.5e12),
    "L40S": (362e12, 183e12, 91.6e12),
    "A10G": (70e12, 35e12, 31.2e12),
    "4090": (165e12, 82.6e12, 82.6e12),
}


def training_flops_per_token(model: TransformerLM) -> float:
    """6·N for the weight matmuls (forward + backward) plus 12·L·d·T for attention scores and values."""
    c = model.config
    matmul_params = model.num_parameters() - model.token_embeddings.weight.numel()  # lookups are free
    return 6 * matmul_params + 12 * c.num_layers * c.d_model * c.context_length


def peak_flops(device: torch.device, precision: str, tf32: bool) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for fragment, (bf16, tf32_peak, fp32) in PEAK_FLOPS.items():
        if fragment in name:
            return bf16 if precision == "bf16" else (tf32_peak if tf32 else fp32)
    return None


class JsonlLog:
    """Appends one JSON object per line; on resume, drops records past the checkpoint's step."""

    def __init__(self, path: str, resume_from_step: int | None = None):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if resume_from_step is None:
            open(path, "w").close()
        elif os.path.exists(path):
            with open(path) as f:
                kept = [line for line in f if line.strip() and json.loads(line)["step"] <= resume_from_step]
            with open(path, "w") as f:
                f.writelines(kept)

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def read_jsonl(path: str) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
