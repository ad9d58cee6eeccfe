"""DDP variants and ZeRO-1 match single-process training (2-process gloo, free port per test)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cs336_systems.distributed import DDPBucketed, DDPIndividualParameters, ShardedOptimizer


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _toy() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))


def _worker(rank: int, world: int, port: int, variant: str, ref: dict, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(rank)  # different init per rank: the wrap must broadcast rank 0's
    model = _toy()
    if rank == 0:
        model.load_state_dict(ref)
    if variant == "individual":
        model = DDPIndividualParameters(model)
    elif variant == "bucketed":
        model = DDPBucketed(model, bucket_size_mb=0.0005)
    else:
        dist.broadcast_object_list(lst := [ref], src=0)
        model.load_state_dict(lst[0])
    opt = (ShardedOptimizer(model.parameters(), torch.optim.AdamW, lr=1e-2) if variant == "zero1"
           else torch.optim.AdamW(model.parameters(), lr=1e-2))
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        x, y = torch.randn(8, 8, generator=g), torch.randn(8, 4, generator=g)
        xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(xs), ys).backward()
        if variant == "zero1":
            for p in model.parameters():
                dist.all_reduce(p.grad)
                p.grad /= world
        else:
            model.finish_gradient_synchronization()
        opt.step()
    if rank == 0:
        inner = getattr(model, "module", model)
        out.update({k: v.clone() for k, v in inner.state_dict().items()})
    dist.destroy_process_group()


@pytest.mark.parametrize("variant", ["individual", "bucketed", "zero1"])
def test_matches_single_process(variant: str) -> None:
    torch.manual_seed(0)
    ref_model = _toy()
    ref = {k: v.clone() for k, v in ref_model.state_dict().items()}
    opt = torch.optim.AdamW(ref_model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        x, y = torch.randn(8, 8, generator=g), torch.randn(8, 4, generator=g)
        opt.zero_grad()
        torch.nn.functional.mse_loss(ref_model(x), y).backward()
        opt.step()
    out = mp.Manager().dict()
    # fork, not spawn: children inherit this module, which pytest's importlib mode makes unimportable by name
    mp.start_processes(_worker, args=(2, _free_port(), variant, ref, out), nprocs=2, join=True,
                       start_method="fork")
    for k, v in ref_model.state_dict().items():
        torch.testing.assert_close(out[k], v, rtol=1e-5, atol=1e-6)
