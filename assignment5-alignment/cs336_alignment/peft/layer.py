"""The wrapped layers: `LoRALinear` (a frozen linear + B·A), `NF4Linear` (a frozen 4-bit linear) and
`QLoRALinear` (LoRA over an `NF4Linear`)."""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cs336_alignment.peft.nf4 import NF4Tensor, dequantize_nf4, quantize_nf4
from cs336_basics.cli_support import UserError
from cs336_basics.layers import Linear as BasicsLinear

LINEAR_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, BasicsLinear)


class _NF4MatMul(torch.autograd.Function):
    """x Wᵀ with W de-quantised on the fly; backward de-quantises again instead of keeping W alive (otherwise
    autograd would hold every layer's full-precision weight until backward, undoing the 4-bit saving)."""

    @staticmethod
    def forward(ctx, x: Tensor, layer: "NF4Linear") -> Tensor:
        ctx.layer, ctx.x_dtype = layer, x.dtype
        return x @ layer.dequantize(x.dtype).mT

    @staticmethod
    def backward(ctx, grad: Tensor):
        weight = ctx.layer.dequantize(grad.dtype)
        return (grad @ weight).to(ctx.x_dtype), None


class NF4Linear(nn.Module):
    """A frozen linear layer stored in NF4 (`peft.nf4`), computing in `compute_dtype`; keeps an fp bias if any.

    Its state lives in buffers, so `.to(device)` and `state_dict()` carry it; it has no trainable parameters.
    """

    def __init__(self, q: NF4Tensor, bias: Tensor | None = None, compute_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.block_size, self.scale_block_size = q.block_size, q.scale_block_size
        self.compute_dtype = compute_dtype
        self.register_buffer("packed", q.packed)
        self.register_buffer("scale_codes", q.scale_codes)
        self.register_buffer("scale_scales", q.scale_scales)
        self.register_buffer("scale_offset", q.scale_offset)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Module, block_size: int = 64, scale_block_size: int = 256,
                    name: str = "weight") -> "NF4Linear":
        weight = linear.weight
        q = quantize_nf4(weight, block_size, scale_block_size, name=name)
        return cls(q, getattr(linear, "bias", None), compute_dtype=weight.dtype)

    def quantized(self) -> NF4Tensor:
        return NF4Tensor(self.packed, self.scale_codes, self.scale_scales, self.scale_offset,
                         (self.out_features, self.in_features), self.block_size, self.scale_block_size)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        return dequantize_nf4(self.quantized(), dtype or self.compute_dtype)

    @property
    def weight(self) -> Tensor:
        """The de-quantised weight (a new tensor; read by parents that fuse projections into one GEMM)."""
        return self.dequantize()

    def forward(self, x: Tensor) -> Tensor:
        out = _NF4MatMul.apply(x, self)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4 block={self.block_size}"


class LoRALinear(nn.Module):
    """y = base(x) + (alpha / rank) · B A dropout(x): `base` frozen, A (rank, d_in) Kaiming-uniform like
    `nn.Linear`, B (d_out, rank) zeros, so the wrapped model starts out equal to the base model.

    `base` is a `torch.nn.Linear`, a `cs336_basics.layers.Linear` or an `NF4Linear`. The adapters live in
    `adapter_dtype` (default: the base's dtype, fp32 for a half-precision or 4-bit base). `weight` is the
    effective weight W + (alpha/rank) B A: cs336_basics' attention and SwiGLU read their projections' weights
    directly to run one fused GEMM, and get the update that way (without dropout, which only the forward path
    applies). `merge()` folds B A into W (not possible for a 4-bit base); `unmerge()` takes it out again.
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
                 adapter_dtype: torch.dtype | None = None):
        super().__init__()
        if rank <= 0:
            raise UserError(f"LoRA rank must be positive, got {rank}")
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        reference = base.packed if isinstance(base, NF4Linear) else base.weight
        base_dtype = base.compute_dtype if isinstance(base, NF4Linear) else base.weight.dtype
        if adapter_dtype is None:
            adapter_dtype = torch.float32 if isinstance(base, NF4Linear) or base_dtype in (
                torch.float16, torch.bfloat16) else base_dtype
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=reference.device, dtype=adapter_dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=reference.device, dtype=adapter_dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.disabled = False
        for p in base.parameters():
            p.requires_grad_(False)

    @property
    def bias(self) -> Tensor | None:
        return getattr(self.base, "bias", None)

    def delta_weight(self) -> Tensor:
        """(alpha / rank) · B A, in the adapters' dtype."""
        return (self.lora_B @ self.lora_A) * self.scaling

    @property
    def weight(self) -> Tensor:
        base = self.base.weight
        if self.merged or self.disabled:
            return base
        return base + self.delta_weight().to(base.dtype)

    def forward(self, x: Tensor) -> Tensor:
        out = self.base(x)
        if self.merged or self.disabled:
            return out
        h = self.dropout(x).to(self.lora_A.dtype)
        return out + (F.linear(F.linear(h, self.lora_A), self.lora_B) * self.scaling).to(out.dtype)

    def _base_weight(self, action: str) -> nn.Parameter:
        if isinstance(self.base, NF4Linear):
            raise UserError(f"cannot {action} LoRA into a 4-bit NF4 base weight (it would need re-quantising); "
                            "save the adapters instead")
        return self.base.weight

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            weight = self._base_weight("merge")
            weight += self.delta_weight().to(weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            weight = self._base_weight("unmerge")
            weight -= self.delta_weight().to(weight.dtype)
            self.merged = False

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}, merged={self.merged}"


class QLoRALinear(LoRALinear):
    """LoRA over a frozen NF4 copy of `linear`'s weight (the full-precision weight is not kept)."""

    def __init__(self, linear: nn.Module, rank: int, alpha: float, dropout: float = 0.0, block_size: int = 64,
                 scale_block_size: int = 256, name: str = "weight"):
        super().__init__(NF4Linear.from_linear(linear, block_size, scale_block_size, name=name), rank, alpha, dropout)
