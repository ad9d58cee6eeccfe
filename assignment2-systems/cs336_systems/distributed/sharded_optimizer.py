"""ZeRO-1: each rank keeps optimizer state for its own parameter shard, then broadcasts updates."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


class ShardedOptimizer(torch.optim.Optimizer):
    """Wraps any optimizer class. Each parameter is owned by the rank holding the fewest parameter bytes so far
    (greedy, in order), which balances optimizer state far better than round-robin when sizes vary."""

    def __init__(self, params, optimizer_cls: type[torch.optim.Optimizer], **kwargs: Any):
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self._cls, self._kwargs = optimizer_cls, kwargs
        self._load = [0] * self.world_size
        self.optimizer: torch.optim.Optimizer | None = None
        super().__init__(params, kwargs)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        params = self.param_groups[-1]["params"]
        owners = []
        for p in params:
            owner = min(range(self.world_size), key=self._load.__getitem__)
            self._load[owner] += p.numel() * p.element_size()
            owners.append(owner)
        mine = {k: v for k, v in param_group.items() if k != "params"}
        mine["params"] = [p for p, r in zip(params, owners, strict=True) if r == self.rank]
        self.param_groups[-1]["owners"] = owners
        self.param_groups[-1]["local_group"] = None
        if not mine["params"]:
            return
        if self.optimizer is None:
            self.optimizer = self._cls([mine], **self._kwargs)
        else:
            self.optimizer.add_param_group(mine)
        self.param_groups[-1]["local_group"] = len(self.optimizer.param_groups) - 1

    def step(self, closure=None, **kwargs):
        # hyperparameters set on this wrapper (an LR schedule) reach the local optimizer's groups
        for group in self.param_groups:
            if group["local_group"] is not None:
                local = self.optimizer.param_groups[group["local_group"]]
                local.update({k: v for k, v in group.items() if k not in ("params", "owners", "local_group")})
        loss = self.optimizer.step(closure, **kwargs) if self.optimizer is not None else None
        for group in self.param_groups:
            for p, owner in zip(group["params"], group["owners"], strict=True):
                dist.broadcast(p.data, src=owner)
        return loss
