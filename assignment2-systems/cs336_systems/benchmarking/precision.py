"""The handout's mixed-precision experiments (§1.1.5): summing 0.01 a thousand times with different accumulator
and addend dtypes, and which dtypes torch.autocast gives each stage of its ToyModel."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# (accumulator dtype, addend dtype, cast the addend to the accumulator's dtype before adding)
ACCUMULATION_CASES: list[tuple[str, str, bool]] = [
    ("float32", "float32", False),
    ("float16", "float16", False),
    ("float32", "float16", False),
    ("float32", "float16", True),
    ("bfloat16", "bfloat16", False),
    ("float32", "bfloat16", True),
]


def accumulate(acc_dtype: str, add_dtype: str, cast: bool, n: int = 1000, value: float = 0.01) -> dict[str, Any]:
    """The handout's loop: s += tensor(value) n times; error against the exact n·value."""
    s = torch.tensor(0, dtype=getattr(torch, acc_dtype))
    for _ in range(n):
        x = torch.tensor(value, dtype=getattr(torch, add_dtype))
        s += x.type(s.dtype) if cast else x
    exact = n * value
    # what the sum would be with no rounding at all in the accumulator: n times the addend as stored
    stored = float(torch.tensor(value, dtype=getattr(torch, add_dtype)).double()) * n
    result = float(s)
    return {"accumulator": acc_dtype, "addend": add_dtype, "cast": cast, "result": result,
            "abs_error": abs(result - exact), "rel_error": abs(result - exact) / exact,
            "n_times_stored_addend": stored, "result_dtype": str(s.dtype).removeprefix("torch.")}


class ToyModel(nn.Module):
    """The handout's toy network: linear, ReLU, LayerNorm, linear."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, 10, bias=False)
        self.ln = nn.LayerNorm(10)
        self.fc2 = nn.Linear(10, out_features, bias=False)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.ln(self.relu(self.fc1(x))))


def autocast_dtypes(device: str, dtype: torch.dtype) -> dict[str, str]:
    """Dtypes seen inside `torch.autocast(device, dtype)`: parameters, fc1/ln outputs, logits, loss, grads."""
    torch.manual_seed(0)
    model = ToyModel(8, 4).to(device)
    seen: dict[str, str] = {}

    def hook(name: str):
        def record(_module, _inputs, output):
            seen[name] = str(output.dtype).removeprefix("torch.")
        return record

    model.fc1.register_forward_hook(hook("fc1 output"))
    model.ln.register_forward_hook(hook("layer norm output"))
    x, y = torch.randn(16, 8, device=device), torch.randint(0, 4, (16,), device=device)
    with torch.autocast(device_type=device, dtype=dtype):
        seen["parameters (inside autocast)"] = str(model.fc1.weight.dtype).removeprefix("torch.")
        logits = model(x)
        seen["logits"] = str(logits.dtype).removeprefix("torch.")
        loss = nn.functional.cross_entropy(logits, y)
        seen["loss"] = str(loss.dtype).removeprefix("torch.")
    loss.backward()
    seen["gradients"] = str(model.fc1.weight.grad.dtype).removeprefix("torch.")
    return seen
