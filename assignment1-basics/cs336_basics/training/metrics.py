"""Throughput accounting (FLOPs per token, MFU) and the JSONL metrics log."""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

from cs336_basics.cli_support import atomic_write, read_jsonl_tolerant

if TYPE_CHECKING:
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
    """6·N for the weight matmuls (forward + backward; a mixture of experts counts the experts a token uses)
    plus 12·L·d·T for attention scores and values."""
    c = model.config
    matmul_params = model.num_active_parameters() - model.token_embeddings.weight.numel()  # lookups are free
    return 6 * matmul_params + 12 * c.num_layers * c.d_model * c.context_length


def peak_flops(device: torch.device, precision: str, tf32: bool) -> float | None:
    if device.type != "cuda":
        return None
    import torch

    name = torch.cuda.get_device_name(device)
    for fragment, (bf16, tf32_peak, fp32) in PEAK_FLOPS.items():
        if fragment in name:
            return bf16 if precision == "bf16" else (tf32_peak if tf32 else fp32)
    return None


class JsonlLog:
    """Appends one JSON object per line. A new run starts an empty log; a resumed one keeps the records up to
    the checkpoint's step (a half-written last line from a killed run is dropped with a warning), rewritten
    atomically so a failure while resuming cannot lose the history."""

    def __init__(self, path: str, resume_from_step: int | None = None):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        kept = []
        if resume_from_step is not None and os.path.exists(path):
            kept = [r for r in read_jsonl_tolerant(path)
                    if not isinstance(r, dict) or r.get("step", 0) <= resume_from_step]
        with atomic_write(path) as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """The records of a metrics log, also while its run is still writing (or was killed mid-line)."""
    return read_jsonl_tolerant(path)
