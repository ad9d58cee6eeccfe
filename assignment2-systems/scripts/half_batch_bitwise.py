"""Why the 2026 course test `test_fsdp_correctness[fp32]` cannot pass on every CPU: it asserts `torch.equal`
between FSDP training on two half batches and one process on the full batch. Without any distributed code,
averaging the two half-batch gradients of the course's toy model already differs from the full-batch gradient
in the last bits wherever the BLAS sums the batch in another grouping (printed per parameter).

    PYTHONPATH=assignment1-basics python assignment2-systems/scripts/half_batch_bitwise.py
"""

import platform

import torch
from torch import nn

from cs336_basics.model import Embedding, Linear, RMSNorm


class ToyModel(nn.Module):
    """The course test's model: embedding, RMSNorm, Linear, ReLU, RMSNorm, Linear, LM head."""

    def __init__(self, vocab_size: int = 100, d_model: int = 64, d_ff: int = 128):
        super().__init__()
        self.embedding = Embedding(vocab_size, d_model)
        self.norm1 = RMSNorm(d_model)
        self.linear1 = Linear(d_model, d_ff)
        self.norm2 = RMSNorm(d_ff)
        self.linear2 = Linear(d_ff, d_model)
        self.lm_head = Linear(d_model, vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.linear1(self.norm1(self.embedding(x))))
        return self.lm_head(self.linear2(self.norm2(h)))


def main() -> None:
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(42)
    model = ToyModel()
    torch.manual_seed(123)
    x, y = torch.randint(0, 100, (20, 8)), torch.randint(0, 100, (20,))

    def grads(xb: torch.Tensor, yb: torch.Tensor) -> dict[str, torch.Tensor]:
        model.zero_grad()
        nn.functional.cross_entropy(model(xb)[:, -1, :], yb).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    full, first, second = grads(x, y), grads(x[:10], y[:10]), grads(x[10:], y[10:])
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}")
    for name, g in full.items():
        averaged = (first[name] + second[name]) / 2
        print(f"{name:16s} bitwise equal: {torch.equal(g, averaged)!s:5s}  max |diff| {(g - averaged).abs().max():.2e}")


if __name__ == "__main__":
    main()
