"""Fully sharded data parallelism: each rank stores 1/N of every Linear/Embedding weight (and so 1/N of its
gradient and optimizer state); a unit's full weights are all-gathered just before it runs, in `compute_dtype`,
and their gradients are reduce-scattered back to the shards as soon as backward produces them.

Other parameters (norm gains, biases) are small and stay replicated; their gradients are all-reduced like DDP.

A unit is a module whose forward gathers all the sharded weights under it at once: by default each
`cs336_basics` TransformerBlock (its SwiGLU and fused-QKV GEMMs read sibling weights directly, so gathering per
Linear would be too late), and any sharded Linear/Embedding outside such a block on its own. Autograd keeps a
unit's gathered weights alive until its backward has run; the shards, gradients and optimizer state are what
stay divided by N.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from cs336_basics.layers import Embedding, Linear
from cs336_basics.model import TransformerBlock
from cs336_systems.distributed.ddp import weak_grad_hook

# cs336_basics layers only: they have no bias, so casting the gathered weight is all compute_dtype needs
SHARDED_TYPES: tuple[type[nn.Module], ...] = (Linear, Embedding)


class _ShardedWeight:
    """Bookkeeping for one sharded weight: its owner module, full shape and this rank's flat shard."""

    def __init__(self, owner: nn.Module, name: str, full: torch.Tensor, rank: int, world_size: int):
        self.owner, self.name = owner, name
        self.shape, self.numel = full.shape, full.numel()
        self.chunk = math.ceil(self.numel / world_size)
        flat = torch.zeros(self.chunk * world_size, dtype=full.dtype, device=full.device)
        flat[: self.numel] = full.detach().reshape(-1)
        self.shard = nn.Parameter(flat[rank * self.chunk : (rank + 1) * self.chunk].clone(),
                                  requires_grad=full.requires_grad)

    def gather(self, dtype: torch.dtype) -> torch.Tensor:
        """The full weight in `dtype` (cast before communicating: a bf16 gather moves half the bytes)."""
        local = self.shard.detach().to(dtype)
        out = torch.empty(self.chunk * dist.get_world_size(), dtype=dtype, device=local.device)
        dist.all_gather_into_tensor(out, local)
        return out[: self.numel].view(self.shape)


class _GatherWeight(torch.autograd.Function):
    """Forward: shard -> full weight (all-gather). Backward: full-weight gradient -> async reduce-scatter whose
    result the wrapper attaches to the shard in `finish_gradient_synchronization` (autograd gets None)."""

    @staticmethod
    def forward(ctx, shard: torch.Tensor, entry: _ShardedWeight, dtype: torch.dtype, fsdp: FSDP) -> torch.Tensor:
        ctx.entry, ctx.fsdp = entry, fsdp
        return entry.gather(dtype)

    @staticmethod
    def backward(ctx, grad_full: torch.Tensor):
        ctx.fsdp._reduce_scatter(ctx.entry, grad_full)
        return None, None, None, None


class FSDP(nn.Module):
    """Wrap `module` so its Linear/Embedding weights are sharded across the default process group.

    Call `finish_gradient_synchronization()` after backward and before the optimizer step.
    """

    def __init__(self, module: nn.Module, compute_dtype: torch.dtype | None = None,
                 unit_types: Iterable[type[nn.Module]] = (TransformerBlock,)):
        super().__init__()
        self.module = module
        self.compute_dtype = compute_dtype
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)
        self._pending: list[tuple[dist.Work, torch.Tensor, nn.Parameter]] = []

        unit_types = tuple(unit_types)
        units: dict[int, tuple[nn.Module, list[_ShardedWeight]]] = {}
        sharded_ids: set[int] = set()
        self._entries: dict[str, _ShardedWeight] = {}
        for unit, leaf_name, leaf in _sharded_leaves(module, unit_types):
            weight = leaf._parameters["weight"]
            entry = _ShardedWeight(leaf, "weight", weight, self.rank, self.world_size)
            leaf._parameters["weight"] = entry.shard
            sharded_ids.add(id(entry.shard))
            self._entries[f"{leaf_name}.weight" if leaf_name else "weight"] = entry
            units.setdefault(id(unit), (unit, []))[1].append(entry)
        self._units = list(units.values())
        for unit, entries in self._units:
            unit.register_forward_pre_hook(self._make_gather_hook(entries))
            unit.register_forward_hook(self._make_release_hook(entries))

        seen: set[int] = set()
        self._replicated: list[nn.Parameter] = []
        for p in module.parameters():
            if id(p) in sharded_ids or id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            self._replicated.append(p)
            p.register_post_accumulate_grad_hook(weak_grad_hook(self, "_all_reduce_hook"))

    # ---- forward: swap shards for gathered full weights while a unit runs

    def _make_gather_hook(self, entries: list[_ShardedWeight]):
        def hook(unit: nn.Module, args) -> None:
            for e in entries:
                dtype = self.compute_dtype or e.shard.dtype
                full = _GatherWeight.apply(e.shard, e, dtype, self)
                del e.owner._parameters[e.name]
                e.owner.__dict__[e.name] = full  # plain attribute: the module's forward reads it as usual

        return hook

    def _make_release_hook(self, entries: list[_ShardedWeight]):
        def hook(unit: nn.Module, args, output) -> None:
            for e in entries:
                e.owner.__dict__.pop(e.name, None)
                e.owner._parameters[e.name] = e.shard

        return hook

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    # ---- backward: gradients back to shards (sum over ranks, then mean)

    def _reduce_scatter(self, entry: _ShardedWeight, grad_full: torch.Tensor) -> None:
        if not entry.shard.requires_grad:
            return
        flat = torch.zeros(entry.chunk * self.world_size, dtype=entry.shard.dtype, device=grad_full.device)
        flat[: entry.numel] = grad_full.reshape(-1)
        out = torch.empty(entry.chunk, dtype=entry.shard.dtype, device=grad_full.device)
        self._pending.append((dist.reduce_scatter_tensor(out, flat, async_op=True), out, entry.shard))

    def _all_reduce_hook(self, p: torch.Tensor) -> None:
        self._pending.append((dist.all_reduce(p.grad, async_op=True), p.grad, None))

    def finish_gradient_synchronization(self) -> None:
        """Wait for outstanding collectives; shards receive their (accumulated) gradient, everything is averaged."""
        for work, buf, shard in self._pending:
            work.wait()
            buf.div_(self.world_size)
            if shard is not None:
                shard.grad = buf if shard.grad is None else shard.grad + buf
        self._pending.clear()

    # ---- inspection

    def gather_full_params(self) -> dict[str, torch.Tensor]:
        """Every parameter at full shape, by its name in the wrapped module (collective: all ranks call it)."""
        out = {}
        for name, p in self.module.named_parameters():
            entry = self._entries.get(name)
            out[name] = entry.gather(entry.shard.dtype).clone() if entry is not None else p.detach().clone()
        return out


def _sharded_leaves(module: nn.Module, unit_types: tuple[type[nn.Module], ...]):
    """(unit, leaf name, leaf) for each shardable leaf; the unit is the leaf's outermost ancestor of
    a unit type, else the leaf itself."""

    def inside(name: str, ancestor: str) -> bool:
        return ancestor == "" or name.startswith(ancestor + ".")

    units: list[tuple[str, nn.Module]] = []
    seen: set[int] = set()
    for name, m in module.named_modules():
        weight = m._parameters.get("weight") if isinstance(m, SHARDED_TYPES) else None
        if isinstance(weight, nn.Parameter):
            if id(weight) in seen:
                raise ValueError(f"FSDP: {name}.weight is tied to another module's weight, which is not supported")
            seen.add(id(weight))
            yield next((u for un, u in units if inside(name, un)), m), name, m
        elif unit_types and isinstance(m, unit_types) and not any(inside(name, un) for un, _ in units):
            units.append((name, m))
