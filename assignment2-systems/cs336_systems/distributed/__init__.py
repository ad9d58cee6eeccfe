"""Data-parallel training: DDP variants and the ZeRO-1 sharded optimizer."""

from cs336_systems.distributed.ddp import DDPBucketed, DDPIndividualParameters
from cs336_systems.distributed.sharded_optimizer import ShardedOptimizer

__all__ = ["DDPBucketed", "DDPIndividualParameters", "ShardedOptimizer"]
