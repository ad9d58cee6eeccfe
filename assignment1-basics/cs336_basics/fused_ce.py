"""Cross-entropy's loss and its gradient in one Triton pass over the logits, the gradient written in place.

The compiled one-pass loss (`onepass_ce.py`) still reads the [tokens, vocab] logits twice: a reduction for
the log-normaliser in the forward, then the pointwise gradient in the backward (1.03 + 1.40 ms at the
leaderboard shape on an H100, for 2.1 GB of bf16 logits read twice and a 2.1 GB gradient written once). Inside
`chunked_ce`'s autograd function the logits of a chunk are needed for nothing else once their gradient exists,
so here one program per row reads its logits from memory once (an online maximum and normaliser over blocks of
the row; the second pass over a block, which writes scale · (softmax − onehot) over it, reads from L2, or from
registers when the row is one block). The loss per row goes to a small float32 vector. The vocabulary size is
a compile-time constant of the kernel (one compilation per vocabulary).

Evaluation takes the same kernel without the gradient (`summed_nll`: one read, nothing written). A target
outside [0, vocab) gives that row a NaN loss instead of reading outside the row.
"""

import os

import torch
from torch import Tensor

from cs336_basics.chunked_ce import chunk_loss, chunk_loss_and_grad

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with torch's Linux wheels
    triton = None

KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# the largest block: a row of the leaderboard's 32 000 classes in two blocks of 16 384 (the second read from L2)
# ran 1.57 ms on an H100 against 1.86 ms for the whole row in registers (benchmarks/loss_kernels.py)
MAX_BLOCK = 16384


def triton_usable(logits: Tensor) -> bool:
    """A CUDA tensor with contiguous rows, of a dtype the kernel takes (anywhere under TRITON_INTERPRET=1, for the
    CPU tests)."""
    on_device = logits.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    return triton is not None and on_device and logits.dtype in KERNEL_DTYPES and logits.stride(-1) == 1


if triton is not None:

    @triton.jit
    def _softmax_grad_rows(logits_ptr, targets_ptr, losses_ptr, row_stride, scale, n_cols: tl.constexpr,
                           BLOCK: tl.constexpr, WHOLE_ROW: tl.constexpr, WRITE_GRAD: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        row_ptr = logits_ptr + row * row_stride
        target = tl.load(targets_ptr + row).to(tl.int64)
        in_range = (target >= 0) & (target < n_cols)
        picked = tl.load(row_ptr + target, mask=in_range, other=float("nan")).to(tl.float32)
        if WHOLE_ROW:  # the row stays in registers between the reduction and the store
            cols = tl.arange(0, BLOCK)
            x = tl.load(row_ptr + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
            row_max = tl.max(x, axis=0)
            p = tl.exp(x - row_max)
            total = tl.sum(p, axis=0)
            if WRITE_GRAD:
                grad = p * (scale / total) - tl.where(cols == target, scale, 0.0)
                tl.store(row_ptr + cols, grad.to(logits_ptr.dtype.element_ty), mask=cols < n_cols)
            log_normaliser = row_max + tl.log(total)
        else:  # online maximum and normaliser block by block, then a second pass for the gradient
            row_max = float("-inf")
            total = 0.0
            for start in range(0, n_cols, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                x = tl.load(row_ptr + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
                new_max = tl.maximum(row_max, tl.max(x, axis=0))
                total = total * tl.exp(row_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
                row_max = new_max
            log_normaliser = row_max + tl.log(total)
            if WRITE_GRAD:
                for start in range(0, n_cols, BLOCK):
                    cols = start + tl.arange(0, BLOCK)
                    x = tl.load(row_ptr + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
                    grad = tl.exp(x - log_normaliser) * scale - tl.where(cols == target, scale, 0.0)
                    tl.store(row_ptr + cols, grad.to(logits_ptr.dtype.element_ty), mask=cols < n_cols)
        tl.store(losses_ptr + row, log_normaliser - picked)


def launch_config(n_cols: int, block: int | None = None) -> tuple[int, bool, int]:
    """(BLOCK, WHOLE_ROW, num_warps): the whole row in registers up to MAX_BLOCK classes, blocks of MAX_BLOCK
    beyond (at most 32 values a thread); `block` forces a block size (the benchmark's sweep)."""
    if block is None:
        block = min(1 << max(n_cols - 1, 1).bit_length(), MAX_BLOCK)
    whole_row = block >= n_cols
    num_warps = max(4, min(32, block // (32 * 32)))
    return block, whole_row, num_warps


def softmax_grad_(logits: Tensor, targets: Tensor, scale: float, block: int | None = None
                  ) -> tuple[Tensor, Tensor]:
    """(summed NLL over the rows, `logits` overwritten by scale · (softmax(logits) − onehot(targets))).

    The contract of `chunked_ce.chunk_loss_and_grad`, with the gradient in the logits' own storage; the
    softmax in float32. `logits`: [rows, vocab] with contiguous rows."""
    return _launch(logits, targets, scale, block, write_grad=True), logits


def summed_nll(logits: Tensor, targets: Tensor, block: int | None = None) -> Tensor:
    """The summed NLL alone (evaluation): one read of the logits, which are left as they were."""
    return _launch(logits, targets, 1.0, block, write_grad=False)


def _launch(logits: Tensor, targets: Tensor, scale: float, block: int | None, write_grad: bool) -> Tensor:
    if logits.ndim != 2 or logits.stride(-1) != 1:
        raise ValueError(f"need [rows, vocab] logits with contiguous rows, got shape {tuple(logits.shape)} "
                         f"and strides {logits.stride()}")
    if targets.shape != logits.shape[:1]:
        raise ValueError(f"need one target per row: {tuple(targets.shape)} targets for {logits.shape[0]} rows")
    n_rows, n_cols = logits.shape
    losses = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    if n_rows:
        block_size, whole_row, num_warps = launch_config(n_cols, block)
        _softmax_grad_rows[(n_rows,)](logits, targets, losses, logits.stride(0), float(scale), n_cols=n_cols,
                                      BLOCK=block_size, WHOLE_ROW=whole_row, WRITE_GRAD=write_grad,
                                      num_warps=num_warps)
    return losses.sum()


def fused_chunk_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """`summed_nll` where the Triton kernel runs, else `chunk_loss` (a float32 log-softmax)."""
    if triton_usable(logits):
        return summed_nll(logits, targets)
    return chunk_loss(logits, targets)


def fused_chunk_loss_and_grad(logits: Tensor, targets: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """`softmax_grad_` where the Triton kernel runs, else `chunk_loss_and_grad` (the same quantities, not in
    place: a CPU run of --loss-impl fused, float64 logits)."""
    if triton_usable(logits):
        return softmax_grad_(logits, targets, scale)
    return chunk_loss_and_grad(logits, targets, scale)
