"""NF4 de-quantisation as one Triton kernel (CUDA): each program reads a run of packed bytes, looks both codes
up in the 16-value book, rebuilds its blocks' scales from the double quantisation and writes the values
interleaved, in the output dtype. The PyTorch version (`nf4.dequantize_nf4`) is the reference; the tests run
this kernel in Triton's CPU interpreter against it, and on CUDA where there is one.

`CS336_NF4_TRITON=0` turns the kernel off (PyTorch everywhere)."""

import os

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with CUDA builds of torch
    triton = None

BYTES_PER_PROGRAM = 1024

if triton is not None:

    @triton.jit
    def _nf4_dequantize_kernel(packed_ptr, scale_codes_ptr, scale_scales_ptr, offset_ptr, book_ptr, out_ptr,
                               n_bytes, BLOCK_SIZE: tl.constexpr, SCALE_BLOCK: tl.constexpr,
                               BYTES: tl.constexpr):
        pid = tl.program_id(0)
        byte_index = pid * BYTES + tl.arange(0, BYTES)
        valid = byte_index < n_bytes
        byte = tl.load(packed_ptr + byte_index, mask=valid, other=0).to(tl.int32)
        high = tl.load(book_ptr + (byte >> 4))  # element 2i
        low = tl.load(book_ptr + (byte & 15))  # element 2i + 1, in the same block (the block size is even)
        block = (byte_index * 2) // BLOCK_SIZE
        code = tl.load(scale_codes_ptr + block, mask=valid, other=0).to(tl.float32)
        scale_of_scales = tl.load(scale_scales_ptr + block // SCALE_BLOCK, mask=valid, other=0.0)
        scale = code / 127.0 * scale_of_scales + tl.load(offset_ptr)
        values = tl.interleave(high * scale, low * scale)
        element = pid * 2 * BYTES + tl.arange(0, 2 * BYTES)
        tl.store(out_ptr + element, values.to(out_ptr.dtype.element_ty), mask=element < 2 * n_bytes)


def triton_usable(tensor: Tensor) -> bool:
    """On CUDA tensors (or anywhere under TRITON_INTERPRET=1), unless CS336_NF4_TRITON=0."""
    if triton is None or os.environ.get("CS336_NF4_TRITON", "1") == "0":
        return False
    return tensor.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def dequantize_nf4_triton(packed: Tensor, scale_codes: Tensor, scale_scales: Tensor, scale_offset: Tensor,
                          book: Tensor, shape: tuple[int, ...], block_size: int, scale_block_size: int,
                          dtype: torch.dtype) -> Tensor:
    if triton is None:
        raise RuntimeError("triton is not installed")
    out = torch.empty(shape, dtype=dtype, device=packed.device)
    n_bytes = packed.numel()
    grid = (triton.cdiv(n_bytes, BYTES_PER_PROGRAM),)
    _nf4_dequantize_kernel[grid](packed, scale_codes, scale_scales, scale_offset.reshape(1), book, out, n_bytes,
                                 BLOCK_SIZE=block_size, SCALE_BLOCK=scale_block_size, BYTES=BYTES_PER_PROGRAM)
    return out
