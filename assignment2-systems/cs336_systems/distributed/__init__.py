"""Data-parallel training: DDP variants, the ZeRO-1 sharded optimizer and FSDP."""

from cs336_systems.distributed.ddp import DDPBucketed, DDPFlat, DDPIndividualParameters, DDPNaive
from cs336_systems.distributed.fsdp import FSDP
from cs336_systems.distributed.sharded_optimizer import ShardedOptimizer

__all__ = ["FSDP", "DDPBucketed", "DDPFlat", "DDPIndividualParameters", "DDPNaive", "ShardedOptimizer"]
