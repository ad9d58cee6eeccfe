"""DDP wrappers: gradients all-reduced asynchronously while backward still runs, averaged over ranks."""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn


def weak_grad_hook(owner: object, method: str) -> Callable[[torch.Tensor], None]:
    """A gradient hook calling `owner.method` through a weak reference. Tensor hooks live in C++, where Python's
    garbage collector cannot see them, so a hook holding its wrapper strongly would keep wrapper, model and
    gradients alive forever (parameter -> hook -> wrapper -> module -> parameter)."""
    ref = weakref.ref(owner)

    def hook(p: torch.Tensor) -> None:
        target = ref()
        if target is not None:
            getattr(target, method)(p)

    return hook


def _broadcast_from_rank0(module: nn.Module) -> None:
    """Every rank starts from rank 0's parameters and buffers, whatever its own init was."""
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src=0)


def _unique_trainable(module: nn.Module) -> list[nn.Parameter]:
    """Parameters needing gradients, each once (tied weights share one Parameter object)."""
    seen: set[int] = set()
    out = []
    for p in module.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


class DDPNaive(nn.Module):
    """The baseline: after backward, one blocking all-reduce per parameter gradient (no overlap)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module
        self.world_size = dist.get_world_size()
        self._params = _unique_trainable(module)
        _broadcast_from_rank0(module)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def finish_gradient_synchronization(self) -> None:
        for p in self._params:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad.div_(self.world_size)


class DDPFlat(nn.Module):
    """After backward, all gradients flattened into one buffer and all-reduced in a single call:
    fewer, larger messages than DDPNaive, still no overlap with backward."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module
        self.world_size = dist.get_world_size()
        self._params = _unique_trainable(module)
        _broadcast_from_rank0(module)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def finish_gradient_synchronization(self) -> None:
        grads = [p.grad for p in self._params if p.grad is not None]
        if not grads:
            return
        flat = torch._utils._flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        flat.div_(self.world_size)
        for g, s in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads), strict=True):
            g.copy_(s)


class DDPIndividualParameters(nn.Module):
    """One async all-reduce per parameter, launched by its post-accumulate-grad hook."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module
        self.world_size = dist.get_world_size()
        self._handles: list[tuple[dist.Work, torch.Tensor]] = []
        _broadcast_from_rank0(module)
        for p in _unique_trainable(module):
            p.register_post_accumulate_grad_hook(weak_grad_hook(self, "_hook"))

    def _hook(self, p: torch.Tensor) -> None:
        p.grad.div_(self.world_size)  # averaging before the sum keeps the wait in finish_... free of compute
        self._handles.append((dist.all_reduce(p.grad, async_op=True), p.grad))

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def finish_gradient_synchronization(self) -> None:
        """Wait for the outstanding all-reduces and turn sums into means."""
        for work, _ in self._handles:
            work.wait()
        self._handles.clear()


class DDPBucketed(nn.Module):
    """Gradients grouped into ~bucket_size_mb buckets in reverse parameter order; each bucket's
    flattened all-reduce starts as soon as its last gradient is ready."""

    def __init__(self, module: nn.Module, bucket_size_mb: float | None = None):
        super().__init__()
        self.module = module
        self.world_size = dist.get_world_size()
        _broadcast_from_rank0(module)
        limit = float("inf") if bucket_size_mb is None else bucket_size_mb * 1024 * 1024
        self._buckets: list[list[nn.Parameter]] = []
        size = 0.0
        for p in reversed(_unique_trainable(module)):
            nbytes = p.numel() * p.element_size()
            if not self._buckets or (size + nbytes > limit and self._buckets[-1]):
                self._buckets.append([])
                size = 0.0
            self._buckets[-1].append(p)
            size += nbytes
        self._bucket_of = {id(p): i for i, b in enumerate(self._buckets) for p in b}
        self._pending = [0] * len(self._buckets)
        self._works: list[tuple[dist.Work, torch.Tensor, int]] = []
        self.reset()
        for p in _unique_trainable(module):
            p.register_post_accumulate_grad_hook(weak_grad_hook(self, "_hook"))

    def reset(self) -> None:
        """Call at the start of each train step."""
        self._pending = [len(b) for b in self._buckets]
        self._works.clear()

    def _hook(self, p: torch.Tensor) -> None:
        i = self._bucket_of[id(p)]
        self._pending[i] -= 1
        if self._pending[i] == 0:
            grads = [q.grad for q in self._buckets[i]]
            flat = torch._utils._flatten_dense_tensors(grads).div_(self.world_size)
            self._works.append((dist.all_reduce(flat, async_op=True), flat, i))

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def finish_gradient_synchronization(self) -> None:
        for work, flat, i in self._works:
            work.wait()
            grads = [q.grad for q in self._buckets[i]]
            for g, s in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads), strict=True):
                g.copy_(s)
        self.reset()
