"""4-bit NormalFloat (NF4) block-wise quantisation with double-quantised scales (QLoRA, Dettmers et al. 2023).

The code book holds the quantiles of N(0, 1) rescaled to [-1, 1], asymmetric so that 0 is exact: 8 positive
and 7 negative values plus 0 (`nf4_code_book`). A weight is cut into blocks of 64 values; each block is divided
by its absolute maximum and every value replaced by the index of the nearest code (4 bits, two per byte). The
fp32 absmax scales are quantised again ("double quantisation"): their mean is subtracted and the rest stored as
int8 in blocks of 256, each with one fp32 scale. That is 4 + 8/64 + 32/(64·256) ≈ 4.127 bits per weight.

The paper stores the second-level scales as 8-bit floats; we use symmetric linear int8, whose error bound is
simple: |c - ĉ| ≤ s₂ / 254 for a block of scales with absmax s₂. So every de-quantised weight satisfies
|w - ŵ| ≤ c · g/2 + s₂/254, with c its block's absmax and g the largest gap between adjacent codes.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from cs336_basics.cli_support import UserError

# δ: the outermost quantile level. Taking Φ⁻¹ at exactly 1 would be infinite; the paper centres the extreme
# level between those of the 15- and 16-level grids: δ = 1 - (1/30 + 1/32) / 2 ≈ 0.9677.
NF4_OFFSET = 1.0 - 0.5 * (1.0 / 30.0 + 1.0 / 32.0)


def nf4_code_book(dtype: torch.dtype = torch.float32) -> Tensor:
    """The 16 NF4 values in ascending order, computed in float64 from the construction.

    Positive half: Φ⁻¹ at 9 evenly spaced probabilities from 1/2 to δ (the first is 0); negative half: -Φ⁻¹ at
    8 evenly spaced probabilities from 1/2 to δ (the first is 0 again). The union without the duplicate zero,
    divided by its largest magnitude, has 16 values with -1, 0 and 1 exact.
    """
    positive = torch.special.ndtri(torch.linspace(0.5, NF4_OFFSET, 9, dtype=torch.float64))
    negative = -torch.special.ndtri(torch.linspace(0.5, NF4_OFFSET, 8, dtype=torch.float64))[1:]
    values = torch.sort(torch.cat([negative, positive])).values
    return (values / values.abs().max()).to(dtype)


_BOOKS: dict[torch.device, Tensor] = {}


def _book(device: torch.device) -> Tensor:
    """The fp32 code book on `device`, built once per device."""
    if device not in _BOOKS:
        _BOOKS[device] = nf4_code_book().to(device)
    return _BOOKS[device]


def nf4_max_half_gap() -> float:
    """Half the largest gap between adjacent code values: the worst rounding error of a normalised weight."""
    book = nf4_code_book(torch.float64)
    return float((book[1:] - book[:-1]).max() / 2)


@dataclass
class NF4Tensor:
    """A quantised weight: packed 4-bit codes, int8 scale codes with their fp32 block scales and offset."""

    packed: Tensor  # uint8 (numel / 2,): code of element 2i in the high nibble, 2i+1 in the low one
    scale_codes: Tensor  # int8 (blocks,): the absmax of each block, centred and quantised
    scale_scales: Tensor  # fp32 (ceil(blocks / scale_block_size),): absmax of each block of centred scales
    scale_offset: Tensor  # fp32 (): the mean absmax, subtracted before quantising
    shape: tuple[int, ...]
    block_size: int
    scale_block_size: int

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize_nf4(self, dtype)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scale_codes, self.scale_scales,
                                                           self.scale_offset))


def check_quantizable(shape: tuple[int, ...], block_size: int = 64, name: str = "weight") -> None:
    """A `UserError` (one line) unless the weight splits into whole blocks."""
    numel = 1
    for size in shape:
        numel *= size
    if block_size <= 0 or block_size % 2:
        raise UserError(f"NF4 block size must be a positive even number, got {block_size}")
    if numel == 0 or numel % block_size:
        raise UserError(f"4-bit NF4 cannot store {name} of shape {tuple(shape)}: {numel} values are not a "
                        f"multiple of the block size {block_size}")


def _quantize_scales(scales: Tensor, block: int) -> tuple[Tensor, Tensor, Tensor]:
    offset = scales.mean()
    centred = scales - offset
    blocks = -(-centred.numel() // block)
    padded = torch.zeros(blocks * block, dtype=torch.float32, device=scales.device)
    padded[: centred.numel()] = centred
    padded = padded.view(blocks, block)
    absmax = padded.abs().amax(dim=1)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    codes = torch.round(padded / safe[:, None] * 127).clamp(-127, 127).to(torch.int8)
    return codes.flatten()[: centred.numel()].contiguous(), absmax, offset


def quantize_nf4(weight: Tensor, block_size: int = 64, scale_block_size: int = 256, name: str = "weight") -> NF4Tensor:
    """Block-wise absmax NF4 quantisation of `weight` (any shape whose size is a multiple of `block_size`)."""
    check_quantizable(tuple(weight.shape), block_size, name)
    if scale_block_size <= 0:
        raise UserError(f"scale block size must be positive, got {scale_block_size}")
    flat = weight.detach().float().reshape(-1, block_size)
    absmax = flat.abs().amax(dim=1)
    normalised = flat / torch.where(absmax > 0, absmax, torch.ones_like(absmax))[:, None]
    book = _book(weight.device)
    codes = torch.bucketize(normalised, (book[1:] + book[:-1]) / 2).to(torch.uint8).flatten()
    packed = (codes[0::2] << 4) | codes[1::2]
    scale_codes, scale_scales, offset = _quantize_scales(absmax, scale_block_size)
    return NF4Tensor(packed, scale_codes, scale_scales, offset, tuple(weight.shape), block_size, scale_block_size)


def dequantize_scales(q: NF4Tensor) -> Tensor:
    """The fp32 absmax of every block, recovered from the double quantisation."""
    index = torch.arange(q.scale_codes.numel(), device=q.scale_codes.device) // q.scale_block_size
    return q.scale_codes.float() / 127 * q.scale_scales[index] + q.scale_offset


def dequantize_nf4(q: NF4Tensor, dtype: torch.dtype = torch.float32, use_triton: bool | None = None) -> Tensor:
    """Codes → code values × block scale, in `dtype`, with the original shape; by one Triton kernel on CUDA
    (`peft.nf4_triton`, unless `use_triton=False` or CS336_NF4_TRITON=0), else in PyTorch."""
    from cs336_alignment.peft.nf4_triton import dequantize_nf4_triton, triton_usable

    if use_triton is None:
        use_triton = triton_usable(q.packed)
    if use_triton:
        return dequantize_nf4_triton(q.packed, q.scale_codes, q.scale_scales, q.scale_offset, _book(q.packed.device),
                                     q.shape, q.block_size, q.scale_block_size, dtype)
    codes = torch.stack((q.packed >> 4, q.packed & 0x0F), dim=-1).flatten().long()
    book = _book(q.packed.device)
    values = book[codes].view(-1, q.block_size) * dequantize_scales(q)[:, None]
    return values.view(q.shape).to(dtype)
