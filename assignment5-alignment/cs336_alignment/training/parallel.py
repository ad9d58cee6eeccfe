"""Data-parallel SFT, EI, GRPO and DPO under `torchrun` (issue 21), on `cs336_basics.training.distributed`.

    torchrun --nproc_per_node 4 -m cs336_alignment grpo --parallel ddp --rollout-device cuda:4 ...

The machinery is `cs336-basics train`'s: the launch read from torchrun's environment, nccl on CUDA and gloo on
the CPU, the policy wrapped in `DistributedDataParallel`, a failed collective turned into a one-line
`RankFailed`, only rank 0 writing the run folder and showing progress. `train_batch_size` stays the global
batch and `gradient_accumulation_steps` its number of micro-batches (the micro-batch size is that of a
single-process run): rank r trains on the r-th contiguous share of each batch, `gradient_accumulation_steps / W`
micro-batches, and DDP's gradient mean over the ranks is then the single-process gradient.

Rollouts (GRPO, EI) are generated on rank 0 alone and broadcast with their rewards: one engine (vLLM or the
native one) on its own device is the handout's layout, the batch is the one a single-process run with the same
seed samples (group normalisation needs whole groups anyway), and the reward is graded once. The price is that
generation is not spread over the ranks: the others wait in the broadcast (`--dist-timeout-s` must cover
rollouts and evaluation). `--rollout-device` keeps the engine on its own device; `RolloutEngine` is the native
engine's copy of the policy there, refreshed by `load_policy_weights` after every step.
"""

import contextlib
import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from cs336_alignment.generation import NativeBackend
from cs336_basics.cli_support import UserError
from cs336_basics.training.distributed import Dist, Launch, read_launch, wrap_model

PARALLEL_LOOPS = ("sft", "ei", "grpo", "dpo")
PARALLEL_CHOICES = ("none", "ddp")


def single_process() -> Dist:
    """The no-op group of a `--parallel none` run: rank 0 of 1, every collective free."""
    return Dist(Launch(), "none", torch.device("cpu"), 1.0)


def start(parallel: str, device: torch.device, timeout_s: float, launch: Launch | None = None) -> Dist:
    """The loop's group (started, and agreed on by every rank before any of them writes the run folder)."""
    dist = Dist(launch or read_launch(), parallel, device, timeout_s)
    dist.start()
    dist.barrier()
    return dist


def check_launch(parallel: str, launch: Launch, loop: str, accumulation: int, batch_size: int) -> None:
    """The launches that cannot run, each one line naming what to change (raised identically on every rank)."""
    if parallel not in PARALLEL_CHOICES:
        raise UserError(f"--parallel must be one of {', '.join(PARALLEL_CHOICES)} for cs336-align {loop}, "
                        f"got {parallel!r}")
    if parallel != "none" and not launch.launched:
        raise UserError(f"--parallel {parallel} needs a torchrun launch (RANK, WORLD_SIZE, MASTER_ADDR, "
                        f"MASTER_PORT are not set): torchrun --nproc_per_node N -m cs336_alignment {loop} "
                        f"--parallel {parallel} ...")
    if parallel == "none" and launch.world_size > 1:
        raise UserError(f"--parallel none in a launch of {launch.world_size} processes would train "
                        f"{launch.world_size} separate copies into one folder; pass --parallel ddp")
    if accumulation % launch.world_size:
        raise UserError(f"--gradient-accumulation-steps {accumulation} (micro-batches of the global "
                        f"--train-batch-size {batch_size}) is not divisible by world size {launch.world_size}: "
                        "each rank trains on an equal share of the micro-batches")


def check_rollout_device(rollout_device: str | None, parallel: str, launch: Launch) -> None:
    """A rollout GPU must not be one a training rank uses (rank r trains on cuda:LOCAL_RANK)."""
    if rollout_device is None:
        return
    try:
        device = torch.device(rollout_device)
    except RuntimeError as e:
        raise UserError(f"--rollout-device {rollout_device!r} is not a device ({e})") from None
    if parallel != "none" and device.type == "cuda" and (device.index or 0) < launch.world_size:
        raise UserError(f"--rollout-device {rollout_device} is rank {device.index or 0}'s training GPU; with "
                        f"{launch.world_size} ranks give the engine its own, e.g. cuda:{launch.world_size}")


def shard(items: Sequence[Any], accumulation: int, dist: Dist) -> tuple[Sequence[Any], int]:
    """This rank's contiguous share of a global batch and its number of micro-batches."""
    per_rank = len(items) // dist.world_size
    return items[dist.rank * per_rank : (dist.rank + 1) * per_rank], accumulation // dist.world_size


def train_module(policy: nn.Module, dist: Dist) -> nn.Module:
    """What the training forwards go through: the policy in DDP (buffers not re-sent), or the policy itself."""
    if not dist.enabled:
        return policy
    return wrap_model(policy, "ddp", dist.device, "fp32", compile=False).forward


def micro_step(model: nn.Module, last: bool) -> contextlib.AbstractContextManager:
    """A micro-batch's forward and backward: DDP reduces gradients on the last micro-batch of a step only."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel) and not last:
        return model.no_sync()
    return contextlib.nullcontext()


def reduce_metrics(dist: Dist, means: dict[str, float], sums: dict[str, float] | None = None) -> dict[str, float]:
    """Per-rank metrics of one step as the whole batch's: `means` averaged over the ranks, `sums` added."""
    sums = sums or {}
    if dist.world_size == 1:
        return {**means, **sums}
    keys = list(means) + list(sums)
    values = torch.tensor([means[k] / dist.world_size for k in means] + [sums[k] for k in sums],
                          dtype=torch.float64, device=dist.device)
    return dict(zip(keys, dist.all_sum_(values).tolist(), strict=True))


def from_rank_0(dist: Dist, make: Callable[[], Any]) -> Any:
    """`make()` run on rank 0 alone, its (picklable) result sent to every rank."""
    if dist.world_size == 1:
        return make()
    import torch.distributed as tdist

    box = [make() if dist.is_main else None]
    tdist.broadcast_object_list(box, src=0, device=dist.device if dist.device.type == "cuda" else None)
    return box[0]


def gather_rows(dist: Dist, rows: int, compute: Callable[[int, int], torch.Tensor]) -> torch.Tensor:
    """`compute(start, stop)` over all `rows` rows, each rank computing its contiguous share, gathered."""
    if dist.world_size == 1:
        return compute(0, rows)
    import torch.distributed as tdist

    per_rank = rows // dist.world_size
    local = compute(dist.rank * per_rank, (dist.rank + 1) * per_rank).contiguous()
    parts = [torch.empty_like(local) for _ in range(dist.world_size)]
    tdist.all_gather(parts, local)
    return torch.cat(parts)


def agree_to_stop(dist: Dist, *flags: bool) -> bool:
    """True on every rank when any flag is true on some rank (a signal or a time budget that ran out on one
    rank ends every rank after the same step)."""
    return any(dist.any(*flags))


class RolloutEngine(NativeBackend):
    """The native engine on its own device (`--rollout-device`, the handout's vLLM layout without vLLM): a copy
    of the policy there, which `load_policy_weights` overwrites with the policy's weights after every step."""

    def __init__(self, policy: nn.Module, tokenizer: Any, device: str | torch.device, batch_size: int = 16):
        model = copy.deepcopy(policy).to(device).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        super().__init__(model, tokenizer, batch_size=batch_size)
        self.pushes = 0

    @torch.no_grad()
    def load_policy_weights(self, policy: nn.Module) -> None:
        source = policy.state_dict()
        for name, tensor in self.model.state_dict().items():
            tensor.copy_(source[name], non_blocking=True)
        self.pushes += 1
