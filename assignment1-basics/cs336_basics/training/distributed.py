"""Data-parallel training on every GPU of a node, with PyTorch's own engine (`torch.distributed`).

    torchrun --nproc_per_node 8 -m cs336_basics train --parallel fsdp --preset owt ...

`--parallel ddp` wraps the model in `DistributedDataParallel`; `--parallel fsdp` shards it with FSDP2
(`fully_shard` on every transformer block, then on the root), bf16 compute over fp32 parameters on CUDA with
`--precision bf16` (fp32 throughout on CPU). `batch_size` is the global batch: each of W ranks trains on
batch_size / W sequences per step, in `--grad-accum` micro-batches (gradients are reduced on the last one
only). Backend: nccl on CUDA, gloo on CPU; a small gloo group carries the per-step control flags (stop
signal, time limit), barriers and checkpoint planning, so no host sync is added to the CUDA stream.

Launch checks are torch-free (`read_launch`, `check_launch`) so a bad launch fails in a second with one line.
A collective that fails because another rank died becomes `RankFailed`, a one-line error on the surviving
ranks (the failing rank prints its own error); `--dist-timeout-s` bounds any wait, and torchrun's agent
tears down the remaining ranks of a job one of whose ranks exited.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cs336_basics.cli_support import UserError

if TYPE_CHECKING:
    import torch

    from cs336_basics.training.config import TrainConfig

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class RankFailed(UserError):
    """A collective failed on this rank, nearly always because another rank ended first (that rank reports
    its own error); one line here instead of a second traceback."""


@dataclass(frozen=True)
class Launch:
    """Where this process stands: rank, world size, local rank; `launched` when torchrun (or a caller that
    initialised the default process group itself) started it."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launched: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def read_launch(env: dict[str, str] | None = None) -> Launch:
    """The launch from torchrun's environment variables (or an initialised default group); without torch."""
    env = os.environ if env is None else env
    if "torch.distributed" in sys.modules:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            rank = dist.get_rank()
            return Launch(rank, dist.get_world_size(), int(env.get("LOCAL_RANK", rank)), True)
    if not all(name in env for name in TORCHRUN_ENV):
        return Launch()
    try:
        rank, world_size = int(env["RANK"]), int(env["WORLD_SIZE"])
        local_rank = int(env.get("LOCAL_RANK", rank))
    except ValueError as e:
        raise UserError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers (set by torchrun): {e}") from e
    if not 0 <= rank < world_size:
        raise UserError(f"RANK {rank} is not in [0, WORLD_SIZE={world_size})")
    return Launch(rank, world_size, local_rank, True)


def env_rank() -> int:
    """This process's rank under torchrun (0 otherwise): the CLI reports launch-wide errors on rank 0 only."""
    if not all(name in os.environ for name in TORCHRUN_ENV):
        return 0
    try:
        return int(os.environ["RANK"])
    except ValueError:
        return 0


def check_launch(config: TrainConfig, launch: Launch) -> None:
    """The combinations of flags and launch that cannot run, each one line naming what to change."""
    parallel = config.parallel
    if parallel != "none" and not launch.launched:
        raise UserError(f"--parallel {parallel} needs a torchrun launch ({', '.join(TORCHRUN_ENV)} are not set): "
                        f"torchrun --nproc_per_node N -m cs336_basics train --parallel {parallel} ...")
    if parallel == "none" and launch.world_size > 1:
        raise UserError(f"--parallel none in a launch of {launch.world_size} processes would train "
                        f"{launch.world_size} separate copies into one folder; pass --parallel ddp or fsdp")
    shards = launch.world_size * config.grad_accum
    if config.batch_size % shards:
        raise UserError(f"--batch-size {config.batch_size} (the global batch) is not divisible by world size "
                        f"{launch.world_size} x --grad-accum {config.grad_accum} = {shards}")
    if parallel == "fsdp" and config.optimizer == "muon":
        raise UserError("--optimizer muon orthogonalises whole matrices, which --parallel fsdp shards; "
                        "use --parallel ddp")
    if parallel == "fsdp" and config.precision == "fp16":
        raise UserError("--precision fp16 (dynamic loss scaling) is not supported with --parallel fsdp; use bf16")


def rank_device(device: torch.device, launch: Launch, parallel: str) -> torch.device:
    """Rank r of a ddp/fsdp run takes cuda:LOCAL_RANK (made current); CPU ranks share the CPU."""
    import torch

    if parallel == "none":
        return device
    if device.type == "mps":
        raise UserError("--parallel ddp/fsdp runs on CUDA (nccl) or the CPU (gloo), not on MPS")
    if device.type != "cuda":
        return device
    if device.index is not None and launch.world_size > 1:
        raise UserError(f"--device {device} would put every rank on one GPU; pass --device cuda "
                        "(rank r then uses cuda:LOCAL_RANK)")
    index = launch.local_rank if device.index is None else device.index
    if index >= torch.cuda.device_count():
        raise UserError(f"rank {launch.rank}: LOCAL_RANK {index} but only {torch.cuda.device_count()} CUDA "
                        "device(s) are visible; use --nproc_per_node <= the number of GPUs")
    device = torch.device("cuda", index)
    torch.cuda.set_device(device)
    return device


COLLECTIVE_FAILURE = ("connection closed", "connection reset", "broken pipe", "gloo", "nccl", "timed out",
                      "timeout", "processgroup", "peer")


def is_peer_failure(error: BaseException) -> bool:
    """What a collective raises when another rank has gone: a `DistError`, a checkpoint that failed on some
    rank, or gloo's RuntimeError about a closed connection. Any other exception is this rank's own."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.api import CheckpointException

    if isinstance(error, dist.DistError | CheckpointException):
        return True
    return type(error) is RuntimeError and any(k in str(error).lower() for k in COLLECTIVE_FAILURE)


class Dist:
    """The process group of a ddp/fsdp run; for `--parallel none` every collective is a no-op."""

    def __init__(self, launch: Launch, parallel: str, device: torch.device, timeout_s: float):
        self.launch = launch
        self.enabled = parallel != "none"
        self.rank, self.world_size = (launch.rank, launch.world_size) if self.enabled else (0, 1)
        self.device = device
        self.timeout_s = timeout_s
        self.created = False
        self.control = None  # gloo group: flags, barriers, checkpoint planning

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def start(self) -> None:
        if not self.enabled:
            return
        from datetime import timedelta

        import torch.distributed as dist

        timeout = timedelta(seconds=self.timeout_s)
        if not dist.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            kwargs: dict[str, Any] = {}
            if self.device.type == "cuda":  # init_process_group wants an indexed device ("cuda" alone is refused)
                import torch

                index = self.device.index if self.device.index is not None else torch.cuda.current_device()
                kwargs["device_id"] = torch.device("cuda", index)
            dist.init_process_group(backend, timeout=timeout, **kwargs)
            self.created = True
        self.control = dist.new_group(backend="gloo", timeout=timeout) if dist.get_backend() != "gloo" else None

    def close(self) -> None:
        """Ends a process group this run started (after success; on failure the process exit does it)."""
        if self.created:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.created = False

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier(group=self.control)

    def all_sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(tensor)
        return tensor

    def all_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        return self.all_sum_(tensor.detach().clone()) / self.world_size

    def any(self, *flags: bool) -> list[bool]:
        """Each flag true on some rank, agreed by all (one tiny gloo all-reduce; free at world size 1)."""
        if self.world_size == 1:
            return list(flags)
        import torch
        import torch.distributed as dist

        values = torch.tensor([float(f) for f in flags])
        dist.all_reduce(values, op=dist.ReduceOp.MAX, group=self.control)
        return [bool(v) for v in values.tolist()]

    @contextlib.contextmanager
    def failures_as_one_line(self) -> Iterator[None]:
        """A collective that fails in a multi-rank run (a peer died, or --dist-timeout-s passed) becomes
        `RankFailed`; the rank that failed first raised its own error, reported by itself."""
        if self.world_size == 1:
            yield
            return
        try:
            yield
        except UserError:
            raise
        except BaseException as e:
            if not is_peer_failure(e):
                raise
            lines = str(e).strip().splitlines()
            reason = lines[0][:200] if lines else type(e).__name__
            raise RankFailed(f"rank {self.rank}: a collective failed ({reason}); another rank probably failed "
                             "first and reported its error") from e


class Wrapped:
    """The model as a ddp/fsdp run trains it: `forward` (maybe compiled), `state_module` (what checkpoints
    read), `sync(last)` (the context of a micro-step: gradients are reduced only on the last)."""

    def __init__(self, forward: Callable, state_module: Any, sync: Callable[[bool], Any]):
        self.forward, self.state_module, self.sync = forward, state_module, sync


def compiled(fn, mode: str = "default"):
    """torch.compile(fn) with a --compile-mode ("default" passes no mode at all, as before the flag existed)."""
    import torch

    return torch.compile(fn) if mode == "default" else torch.compile(fn, mode=mode)


def wrap_model(model, parallel: str, device: torch.device, precision: str, compile: bool,
               compile_mode: str = "default", fsdp_reshard: str = "auto", fsdp_units: str = "auto") -> Wrapped:
    """DDP, FSDP2 (blocks then root, or the whole model as one unit; bf16 compute with fp32 master weights on
    CUDA bf16) or the model itself."""
    import torch

    if parallel == "ddp":
        import inspect

        from torch.nn.parallel import DistributedDataParallel

        # buffers (RoPE tables, MoE biases) are equal on every rank and kept so; not re-sent every forward
        no_buffer_sync = ({"forward_sync_buffers": False}
                          if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                          else {"broadcast_buffers": False})
        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                      **no_buffer_sync)

        def ddp_sync(last: bool):
            return contextlib.nullcontext() if last else ddp.no_sync()

        return Wrapped(compiled(ddp, compile_mode) if compile else ddp, ddp, ddp_sync)
    if parallel == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if device.type == "cuda" and precision == "bf16":
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        else:
            policy = MixedPrecisionPolicy()
        world_size = torch.distributed.get_world_size()
        reshard = {"always": True, "never": False}.get(fsdp_reshard, world_size > 1)
        if fsdp_units == "model" or (fsdp_units == "auto" and world_size == 1 and fsdp_reshard != "always"):
            # One unit: one gather before forward and one reduce after backward, no per-block hooks; the
            # forward compiles whole (the unit's hooks run in the module's __call__, outside the graph), as
            # with --parallel none. On one rank nothing could overlap the gathers anyway.
            fully_shard(model, mp_policy=policy, reshard_after_forward=reshard)
            if compile:
                model.forward = compiled(model.forward, compile_mode)
        else:
            for index, block in enumerate(model.layers):
                if compile:  # per block, the FSDP hooks outside the compiled graphs (as torchtitan does)
                    block = compiled(block, compile_mode)
                    model.layers.register_module(str(index), block)
                # by default one rank keeps the gathered bf16 blocks for backward instead of copying and casting
                # them a second time: it holds every weight anyway
                fully_shard(block, mp_policy=policy, reshard_after_forward=reshard)
            fully_shard(model, mp_policy=policy, reshard_after_forward=False)  # gathered again at once by backward

        def fsdp_sync(last: bool):
            model.set_requires_gradient_sync(last)
            return contextlib.nullcontext()

        return Wrapped(model, model, fsdp_sync)
    return Wrapped(compiled(model, compile_mode) if compile else model, model, lambda last: contextlib.nullcontext())


def clip_sharded_gradients(parameters, max_l2_norm: float, dist: Dist, eps: float = 1e-6) -> torch.Tensor:
    """`clip_gradients` for FSDP's sharded (DTensor) gradients: the squared norms of the local shards summed
    over the ranks, then every shard scaled by the same factor. Returns the global norm before clipping."""
    import torch
    from torch.distributed.tensor import DTensor

    from cs336_basics.optim import clip_scale, grouped, grouped_norm, scale_grouped_

    grads = [p.grad for p in parameters if p.grad is not None]
    groups = grouped([g.to_local() if isinstance(g, DTensor) else g for g in grads])
    squares = grouped_norm(groups) ** 2 if groups else torch.zeros((), device=dist.device, dtype=torch.float32)
    total = dist.all_sum_(squares).sqrt()
    scale_grouped_(groups, clip_scale(total, max_l2_norm, eps))
    return total
