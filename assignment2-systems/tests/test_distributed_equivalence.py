"""DDP variants, ZeRO-1 and FSDP reproduce single-process training (2-process gloo, free port per test).

The single-process reference trains on the whole batch; each rank trains on its half. For the bitwise FSDP
check the reference instead averages the two half-batch gradients in one process, which is the same arithmetic
data parallelism does: a full-batch gradient sums the batch in another order, so it can differ in the last bit
(on this machine's BLAS it does), and only closeness can be asked of it.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from copy import deepcopy

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from cs336_basics.layers import Embedding, Linear, RMSNorm
from cs336_basics.model import TransformerConfig, TransformerLM
from cs336_basics.nn_utils import cross_entropy
from cs336_systems.distributed import FSDP, DDPBucketed, DDPFlat, DDPIndividualParameters, DDPNaive, ShardedOptimizer

WORLD = 2
STEPS = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Toy(nn.Module):
    """Linear/Embedding (sharded by FSDP), a norm and a frozen layer (replicated), a parameter without grad."""

    def __init__(self):
        super().__init__()
        self.embed = Embedding(32, 16)
        self.norm = RMSNorm(16)
        self.fc1 = Linear(16, 24)
        self.frozen = nn.Linear(24, 24)
        self.frozen.requires_grad_(False)
        self.fc2 = Linear(24, 32)

    def forward(self, x):
        h = self.fc1(self.norm(self.embed(x)))
        return self.fc2(torch.relu(self.frozen(h.float())).to(h.dtype))[:, -1]  # nn.Linear's weights stay fp32


def _tiny_lm() -> TransformerLM:
    return TransformerLM(TransformerConfig(vocab_size=32, context_length=8, d_model=16, num_layers=2,
                                           num_heads=2, d_ff=24))


MODELS: dict[str, Callable[[], nn.Module]] = {"toy": _Toy, "lm": _tiny_lm}


def _batch(g: torch.Generator, model: str) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randint(0, 32, (8, 8), generator=g)
    y = torch.randint(0, 32, (8,) if model == "toy" else (8, 8), generator=g)
    return x, y


def _loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return cross_entropy(out.float().reshape(-1, out.shape[-1]), y.reshape(-1))


def _wrap(variant: str, model: nn.Module) -> nn.Module:
    wrappers = {"naive": DDPNaive, "flat": DDPFlat, "individual": DDPIndividualParameters,
                "bucketed": lambda m: DDPBucketed(m, bucket_size_mb=0.002), "fsdp": FSDP,
                "fsdp-bf16": lambda m: FSDP(m, compute_dtype=torch.bfloat16)}
    return wrappers[variant](model)


def _worker(rank: int, port: int, variant: str, model_name: str, ref: dict, opt_name: str, out: dict) -> None:
    # a forked child must not enter the OpenMP pool the parent already started (it would deadlock)
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.manual_seed(rank)  # a different init per rank: every wrapper must start from rank 0's weights
    model = MODELS[model_name]()
    if rank == 0:
        model.load_state_dict(ref)
    if variant == "zero1":
        dist.broadcast_object_list(lst := [ref], src=0)
        model.load_state_dict(lst[0])
        opt = ShardedOptimizer(model.parameters(), torch.optim.AdamW, lr=1e-2)
    else:
        model = _wrap(variant, model)
        opt = _optimizer(opt_name, model.parameters())
    g = torch.Generator().manual_seed(0)
    for step in range(STEPS):
        _schedule_lr(opt, step)
        x, y = _batch(g, model_name)
        opt.zero_grad()
        _loss(model(x.chunk(WORLD)[rank]), y.chunk(WORLD)[rank]).backward()
        if variant == "zero1":
            for p in model.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= WORLD
        else:
            model.finish_gradient_synchronization()
        opt.step()
    full = model.gather_full_params() if isinstance(model, FSDP) else None
    if rank == 0:
        inner = getattr(model, "module", model)
        out.update(full if full is not None else {k: v.detach().clone() for k, v in inner.named_parameters()})
    dist.destroy_process_group()


def _optimizer(name: str, params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.05) if name == "sgd" else torch.optim.AdamW(params, lr=1e-2)


def _schedule_lr(opt: torch.optim.Optimizer, step: int) -> None:
    """A warm-up schedule set on the (possibly sharded) optimizer's groups, as a training loop would."""
    for group in opt.param_groups:
        group.setdefault("base_lr", group["lr"])
        group["lr"] = group["base_lr"] * (step + 1) / STEPS


def _reference(model_name: str, opt_name: str, half_batches: bool,
               compute_dtype: torch.dtype | None = None) -> tuple[dict, dict]:
    """(initial state, parameters after STEPS) of one process: full-batch gradients, or the mean of the two
    half-batch gradients (`half_batches`). `compute_dtype` rounds Linear/Embedding weights as FSDP computes."""
    torch.manual_seed(0)
    model = MODELS[model_name]()
    init = deepcopy(model.state_dict())
    opt = _optimizer(opt_name, model.parameters())
    g = torch.Generator().manual_seed(0)
    for step in range(STEPS):
        _schedule_lr(opt, step)
        x, y = _batch(g, model_name)
        opt.zero_grad()
        parts = list(zip(x.chunk(WORLD), y.chunk(WORLD), strict=True)) if half_batches else [(x, y)]
        grads = []
        for xs, ys in parts:
            for p in model.parameters():
                p.grad = None
            with _weights_in(model, compute_dtype):
                _loss(model(xs), ys).backward()
            grads.append([p.grad for p in model.parameters()])
        for i, p in enumerate(model.parameters()):
            if p.requires_grad:
                p.grad = sum(gs[i] for gs in grads) / len(grads) if len(grads) > 1 else grads[0][i]
        opt.step()
    return init, {k: v.detach().clone() for k, v in model.named_parameters()}


class _weights_in:
    """Within the block, Linear/Embedding weights are rounded to `dtype` for compute (grads flow back in fp32)."""

    def __init__(self, model: nn.Module, dtype: torch.dtype | None):
        self.model, self.dtype, self.saved = model, dtype, []

    def __enter__(self):
        if self.dtype is None:
            return
        for m in self.model.modules():
            if isinstance(m, (Linear, Embedding)):
                w = m._parameters.pop("weight")
                self.saved.append((m, w))
                m.weight = _RoundTrip.apply(w, self.dtype)

    def __exit__(self, *exc):
        for m, w in self.saved:
            del m.weight
            m._parameters["weight"] = w


class _RoundTrip(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, dtype):
        return w.to(dtype)

    @staticmethod
    def backward(ctx, g):
        return g.float(), None


def _run(variant: str, model_name: str, ref_init: dict, opt_name: str) -> dict:
    out = mp.Manager().dict()
    # fork, not spawn: children inherit this module, which pytest's importlib mode makes unimportable by name
    mp.start_processes(_worker, args=(_free_port(), variant, model_name, ref_init, opt_name, out), nprocs=WORLD,
                       join=True, start_method="fork")
    return dict(out)


@pytest.mark.parametrize("model_name", ["toy", "lm"])
@pytest.mark.parametrize("variant", ["naive", "flat", "individual", "bucketed", "zero1", "fsdp"])
def test_matches_single_process_training(variant: str, model_name: str) -> None:
    init, expected = _reference(model_name, "adamw", half_batches=False)
    got = _run(variant, model_name, init, "adamw")
    assert got.keys() == expected.keys()
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{variant} {k}: {m}")


@pytest.mark.parametrize("model_name", ["toy", "lm"])
def test_fsdp_is_bitwise_data_parallel_sgd(model_name: str) -> None:
    init, expected = _reference(model_name, "sgd", half_batches=True)
    got = _run("fsdp", model_name, init, "sgd")
    for k, v in expected.items():
        assert torch.equal(got[k], v), f"{k}: max diff {(got[k] - v).abs().max().item()}"


def test_fsdp_bf16_compute_matches_rounded_weights_reference() -> None:
    init, expected = _reference("toy", "sgd", half_batches=True, compute_dtype=torch.bfloat16)
    _, fp32 = _reference("toy", "sgd", half_batches=True)
    got = _run("fsdp-bf16", "toy", init, "sgd")
    for k, v in expected.items():
        assert got[k].dtype == torch.float32  # master weights stay fp32
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-5)
    # and bf16 compute is visibly not fp32 compute, so the check above can tell them apart
    assert any(not torch.allclose(expected[k], fp32[k], rtol=1e-5, atol=1e-5) for k in expected)


def _shard_worker(rank: int, port: int, out: dict) -> None:
    # a forked child must not enter the OpenMP pool the parent already started (it would deadlock)
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.manual_seed(0)
    model = FSDP(_Toy())
    out[rank] = {n: (tuple(p.shape), p.requires_grad) for n, p in model.module.named_parameters()}
    dist.destroy_process_group()


def test_fsdp_shards_linear_and_embedding_weights_only() -> None:
    torch.manual_seed(0)
    full = {n: p for n, p in _Toy().named_parameters()}
    out = mp.Manager().dict()
    mp.start_processes(_shard_worker, args=(_free_port(), out), nprocs=WORLD, join=True, start_method="fork")
    for rank in range(WORLD):
        shapes = out[rank]
        for name in ("embed.weight", "fc1.weight", "fc2.weight"):
            assert shapes[name] == ((-(-full[name].numel() // WORLD),), True)  # flat, ceil(numel / world)
        for name in ("norm.weight", "frozen.weight", "frozen.bias"):
            assert shapes[name] == (tuple(full[name].shape), full[name].requires_grad)


def _release_worker(rank: int, port: int, out: dict) -> None:
    import gc
    import weakref

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    refs = {}
    for name in ("naive", "flat", "individual", "bucketed", "fsdp"):
        model = _wrap(name, _Toy())
        _loss(model(torch.randint(0, 32, (2, 8))), torch.randint(0, 32, (2,))).backward()
        model.finish_gradient_synchronization()
        refs[name] = weakref.ref(model)
        del model
    gc.collect()
    out[rank] = [name for name, r in refs.items() if r() is not None]
    dist.destroy_process_group()


def test_wrappers_are_freed_when_dropped() -> None:
    """Gradient hooks must not pin a dropped wrapper (and its model) in memory."""
    out = mp.Manager().dict()
    mp.start_processes(_release_worker, args=(_free_port(), out), nprocs=WORLD, join=True, start_method="fork")
    assert out[0] == [] and out[1] == []
