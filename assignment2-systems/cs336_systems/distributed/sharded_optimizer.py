"""ZeRO-1: each rank keeps optimizer state for its own parameter shard, then broadcasts updates."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


class ShardedOptimizer(torch.optim.Optimizer):
    """Wraps any optimizer class; parameter i is owned by rank i % world_size."""

    def __init__(self, params, optimizer_cls: type[torch.optim.Optimizer], **kwargs: Any):
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self._cls, self._kwargs = optimizer_cls, kwargs
        self._count = 0
        self.optimizer: torch.optim.Optimizer | None = None
        super().__init__(params, kwargs)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        params = self.param_groups[-1]["params"]
        owners = [(self._count + i) % self.world_size for i in range(len(params))]
        self._count += len(params)
        mine = {k: v for k, v in param_group.items() if k != "params"}
        mine["params"] = [p for p, r in zip(params, owners, strict=True) if r == self.rank]
        self.param_groups[-1]["owners"] = owners
        if not mine["params"]:
            return
        if self.optimizer is None:
            self.optimizer = self._cls([mine], **self._kwargs)
        else:
            self.optimizer.add_param_group(mine)

    def step(self, closure=None, **kwargs):
        loss = self.optimizer.step(closure, **kwargs) if self.optimizer is not None else None
        for group in self.param_groups:
            for p, owner in zip(group["params"], group["owners"], strict=True):
                dist.broadcast(p.data, src=owner)
        return loss
