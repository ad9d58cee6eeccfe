"""AdamW, Muon (re-exported from `cs336_basics.muon`), the cosine learning-rate schedule with warm-up, and
global-norm gradient clipping."""

import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor


def evaluate_closure(closure: Callable[[], float] | None) -> float | None:
    """The loss a `step(closure)` re-evaluates, with gradients on (the step itself runs under no_grad)."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class AdamW(torch.optim.Optimizer):
    """Adam with decoupled weight decay (Loshchilov & Hutter), bias correction folded into the step size.

    θ ← θ − lr·λ·θ;  m ← β₁m + (1−β₁)g;  v ← β₂v + (1−β₂)g²;  θ ← θ − lr·√(1−β₂ᵗ)/(1−β₁ᵗ) · m/(√v + ε)
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
    ):
        if lr < 0:
            raise ValueError(f"invalid learning rate {lr}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must lie in [0, 1), got {betas}")
        if eps <= 0 or weight_decay < 0:
            raise ValueError(f"need eps > 0 and weight_decay >= 0, got eps={eps}, weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = evaluate_closure(closure)
        for group in self.param_groups:
            adamw_group_step(self.state, group)
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """Also reads the state of `FusedAdamW` (a tensor step count): the implementations resume each other."""
        super().load_state_dict(state_dict)
        for state in self.state.values():
            state.pop("host_step", None)
            if isinstance(state.get("step"), Tensor):
                state["step"] = int(state["step"].item())


class FusedAdamW(torch.optim.AdamW):
    """`AdamW` above (ε added to √v, bias correction folded into the step size) run by torch's fused kernel:
    one multi-tensor kernel per step instead of seven passes over parameters and moments.

    torch's AdamW adds ε to √v̂ = √v/√(1−β₂ᵗ) instead, i.e. uses ε·√(1−β₂ᵗ) where ours uses ε. Passing it
    ε/√(1−β₂ᵗ) at step t makes the two updates equal (up to float rounding). Parameters are stepped in buckets
    of equal t (a parameter without a gradient is not stepped, so its t can lag), with t counted on the host:
    no device sync. The state dict holds torch's tensor step; `AdamW` and this class load each other's.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01):
        if eps <= 0:
            raise ValueError(f"need eps > 0, got eps={eps}")
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=True)

    @torch.no_grad()
    def clip_in_next_step(self, max_l2_norm: float, eps: float = 1e-6) -> Tensor:
        """`clip_gradients` without its pass over the gradients: the global norm is computed here, and the next
        `step` has torch's kernel divide each gradient by (‖g‖+eps)/max as it reads it (its `grad_scale`, meant
        for AMP's unscaling; the divided gradient is stored back, as clipping would have left it). Returns the
        norm before clipping."""
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return torch.zeros(())
        total_norm = grouped_norm(grouped(grads))
        self.grad_scale = clip_scale(total_norm, max_l2_norm, eps).reciprocal().float()
        return total_norm

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = evaluate_closure(closure)
        groups = self.param_groups
        try:
            for group in groups:
                buckets: dict[int, list[Tensor]] = {}
                for p in group["params"]:
                    if p.grad is not None:
                        buckets.setdefault(self.state[p].get("host_step", 0) + 1, []).append(p)
                for t, bucket in buckets.items():  # torch's step() sees just this bucket as its only group
                    eps = group["eps"] / math.sqrt(1.0 - group["betas"][1] ** t)
                    self.param_groups = [{**group, "params": bucket, "eps": eps}]
                    super().step()
                    for p in bucket:
                        self.state[p]["host_step"] = t
        finally:
            self.param_groups = groups
            self.__dict__.pop("grad_scale", None)  # a clipping scale is for one step only
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """Also reads the state of `AdamW` (an integer step count)."""
        states = state_dict["state"]
        converted = {key: {**state, "step": torch.tensor(float(state["step"]))}
                     if "step" in state and not isinstance(state["step"], Tensor) else state
                     for key, state in states.items()}
        # a group saved by `AdamW` lacks torch's flags (fused, decoupled weight decay...): this class's defaults
        groups = [{**self.defaults, **group} for group in state_dict["param_groups"]]
        super().load_state_dict({**state_dict, "state": converted, "param_groups": groups})
        for state in self.state.values():
            if "step" in state:
                state["host_step"] = int(state["step"].item())


def _local(t: Tensor) -> Tensor:
    """A DTensor's local shard (a view: in-place updates reach the DTensor), any other tensor itself."""
    return t.to_local() if hasattr(t, "to_local") and hasattr(t, "placements") else t


@torch.no_grad()
def adamw_group_step(state_of: dict, group: dict) -> None:
    """The AdamW update of one parameter group (shared by `AdamW` and `Muon`'s AdamW groups)."""
    lr, (beta1, beta2), eps, weight_decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    params, grads, exp_avgs, exp_avg_sqs, step_sizes = [], [], [], [], []
    for p in group["params"]:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            raise RuntimeError("AdamW does not support sparse gradients")
        state = state_of[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        t = state["step"]
        params.append(p)
        grads.append(p.grad)
        exp_avgs.append(state["exp_avg"])
        exp_avg_sqs.append(state["exp_avg_sq"])
        step_sizes.append(-lr * math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t))
    if not params:
        return
    # FSDP's parameters, gradients and moments are DTensors: the update is element-wise, so it runs on the local
    # shards (views of the same storage) without DTensor's per-operation dispatch
    params, grads, exp_avgs, exp_avg_sqs = ([_local(t) for t in ts] for ts in (params, grads, exp_avgs, exp_avg_sqs))
    # The same update as a per-parameter loop, as a few multi-tensor kernels (far fewer launches).
    torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
    denominators = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_add_(denominators, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denominators, step_sizes)


def get_lr_cosine_schedule(
    it: int, max_learning_rate: float, min_learning_rate: float, warmup_iters: int, cosine_cycle_iters: int
) -> float:
    """Linear warm-up to the max over `warmup_iters`, cosine decay to the min at `cosine_cycle_iters`, then flat."""
    if it < warmup_iters:
        return max_learning_rate * it / warmup_iters
    if it > cosine_cycle_iters:
        return min_learning_rate
    if cosine_cycle_iters == warmup_iters:
        return max_learning_rate
    progress = (it - warmup_iters) / (cosine_cycle_iters - warmup_iters)
    return min_learning_rate + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_learning_rate - min_learning_rate)


@torch.no_grad()
def clip_gradients(parameters: Iterable[torch.nn.Parameter], max_l2_norm: float, eps: float = 1e-6) -> Tensor:
    """Scales all gradients in place by max/(‖g‖+eps) when their global L2 norm ‖g‖ exceeds `max_l2_norm`.

    Returns the norm before clipping. No `.item()`: the decision stays on the device, so no host sync.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    groups = grouped(grads)
    total_norm = grouped_norm(groups)
    scale_grouped_(groups, clip_scale(total_norm, max_l2_norm, eps))
    return total_norm


def grouped(tensors: list[Tensor]) -> dict[tuple[torch.device, torch.dtype], list[Tensor]]:
    """Tensors by (device, dtype): the unit of one multi-tensor kernel. A 12-layer model has ~100 gradients:
    ~200 small launches a step otherwise."""
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    return groups


def grouped_norm(groups: dict[tuple[torch.device, torch.dtype], list[Tensor]]) -> Tensor:
    """The L2 norm over every tensor of every group, in fp32 (fp64 kept), on the first group's device."""
    norms = []
    for (_, dtype), group in groups.items():
        if dtype in (torch.float32, torch.float64):
            norms += [n.float() for n in torch._foreach_norm(group)]
        else:  # low-precision gradients: square and sum in fp32
            norms += [torch.linalg.vector_norm(g.float()) for g in group]
    return torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]))


def clip_scale(total_norm: Tensor, max_l2_norm: float, eps: float = 1e-6) -> Tensor:
    """max/(‖g‖+eps) where ‖g‖ exceeds the max, else 1, as a device tensor (no host sync)."""
    return torch.where(total_norm > max_l2_norm, max_l2_norm / (total_norm + eps), torch.ones_like(total_norm))


def scale_grouped_(groups: dict[tuple[torch.device, torch.dtype], list[Tensor]], scale: Tensor) -> None:
    for (device, dtype), group in groups.items():
        torch._foreach_mul_(group, scale.to(device=device, dtype=dtype))


def __getattr__(name: str):
    """Muon lives in its own module (it builds on `adamw_group_step` above) and is served from here too."""
    if name in ("Muon", "muon_param_groups", "newton_schulz"):
        from cs336_basics import muon

        return getattr(muon, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
