"""Paged decode attention: the PyTorch reference against contiguous float64 attention written out independently,
the Triton kernel against the reference (CUDA only), `write_kv` slot placement and the argument checks.

Caches are filled with NaN before the real keys are written, so any read of a slot outside a sequence's
context (scratch block 0, a block's unused tail, another sequence's blocks) shows up as NaN."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from cs336_systems.serving import paged_attention as pa
from cs336_systems.serving.paged_attention import (
    paged_attention,
    paged_attention_reference,
    paged_attention_triton,
    write_kv,
)

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="Triton paged attention kernel needs a CUDA GPU")


@dataclass
class Case:
    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor | None
    block_tables: torch.Tensor
    context_lens: torch.Tensor
    keys: list[torch.Tensor]  # per sequence (ctx, kv_heads, d_k), float64
    values: list[torch.Tensor]  # per sequence (ctx, kv_heads, d_v), float64
    kwargs: dict


def make_case(
    lens: list[int],
    heads: int,
    kv_heads: int,
    d_k: int,
    d_v: int | None,
    block_size: int,
    *,
    mla_value_dim: int | None = None,
    sliding_window: int | None = None,
    alibi: bool = False,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    seed: int = 0,
    extra_table_cols: int = 1,
) -> Case:
    """Random sequences scattered over a randomly permuted block pool (block 0 = scratch, never used)."""
    gen = torch.Generator().manual_seed(seed)
    batch = len(lens)
    need = [math.ceil(n / block_size) for n in lens]
    num_blocks = 1 + sum(need) + 3
    perm = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    max_blocks = max(need) + extra_table_cols
    tables = torch.zeros(batch, max_blocks, dtype=torch.int32)
    k_cache = torch.full((num_blocks, block_size, kv_heads, d_k), float("nan"), dtype=dtype)
    v_cache = None if d_v is None else torch.full((num_blocks, block_size, kv_heads, d_v), float("nan"), dtype=dtype)
    keys, values = [], []
    for b, n in enumerate(lens):
        blocks = [perm.pop() for _ in range(need[b])]
        tables[b, : need[b]] = torch.tensor(blocks, dtype=torch.int32)
        k = torch.randn(n, kv_heads, d_k, generator=gen).to(dtype)
        pos = torch.arange(n)
        blk = torch.tensor(blocks, dtype=torch.long)[pos // block_size]
        k_cache[blk, pos % block_size] = k
        keys.append(k.double())
        if v_cache is None:
            values.append(k.double()[..., :mla_value_dim])
        else:
            v = torch.randn(n, kv_heads, d_v, generator=gen).to(dtype)
            v_cache[blk, pos % block_size] = v
            values.append(v.double())
    q = torch.randn(batch, heads, d_k, generator=gen).to(dtype)
    kwargs: dict = {"scale": d_k**-0.5, "sliding_window": sliding_window}
    if mla_value_dim is not None:
        kwargs["value_dim"] = mla_value_dim
    if alibi:
        kwargs["alibi_slopes"] = (0.5 + torch.rand(heads, generator=gen)).to(device)
    return Case(
        q.to(device),
        k_cache.to(device),
        None if v_cache is None else v_cache.to(device),
        tables.to(device),
        torch.tensor(lens, dtype=torch.int32, device=device),
        keys,
        values,
        kwargs,
    )


def contiguous_attention(case: Case) -> torch.Tensor:
    """Per sequence, per head, in float64 on the contiguous keys: softmax(q·K^T·scale + bias) V."""
    q = case.q.double().cpu()
    batch, heads, _ = q.shape
    kv_heads = case.keys[0].shape[1]
    group = heads // kv_heads
    window = case.kwargs.get("sliding_window")
    slopes = case.kwargs.get("alibi_slopes")
    outs = []
    for b in range(batch):
        k, v = case.keys[b], case.values[b]
        ctx = k.shape[0]
        lo = 0 if window is None else max(0, ctx - window)
        rows = []
        for h in range(heads):
            kh, vh = k[lo:, h // group], v[lo:, h // group]
            s = kh @ q[b, h] * case.kwargs["scale"]
            if slopes is not None:
                key_pos = torch.arange(lo, ctx, dtype=torch.float64)
                s = s - slopes[h].double().cpu() * ((ctx - 1) - key_pos)
            rows.append(torch.softmax(s, dim=0) @ vh)
        outs.append(torch.stack(rows))
    return torch.stack(outs)


def run_ref(case: Case) -> torch.Tensor:
    return paged_attention_reference(
        case.q, case.k_cache, case.v_cache, case.block_tables, case.context_lens, **case.kwargs
    )


# name -> (heads, kv_heads, d_k, d_v or None for MLA, mla value dim, extra kwargs)
SHAPES = {
    "mha": (4, 4, 16, 16, None, {}),
    "gqa": (8, 2, 24, 24, None, {}),  # non-power-of-two head dim
    "mqa": (6, 1, 32, 32, None, {}),
    "dk_ne_dv": (4, 2, 16, 8, None, {}),
    "mla": (8, 1, 48, None, 40, {}),  # latent 40 + rope 8, values = first 40 columns
    "window": (8, 2, 16, 16, None, {"sliding_window": 5}),
    "alibi": (4, 4, 16, 16, None, {"alibi": True}),
    "gqa_window_alibi": (8, 4, 16, 16, None, {"sliding_window": 7, "alibi": True}),
}


def build(name: str, lens: list[int], block_size: int, **kw) -> Case:
    heads, kv_heads, d_k, d_v, mla, extra = SHAPES[name]
    return make_case(lens, heads, kv_heads, d_k, d_v, block_size, mla_value_dim=mla, **extra, **kw)


# ------------------------------------------------------------------------------------------------ CPU


@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("block_size", [4, 16])
def test_reference_matches_contiguous_attention(name, block_size):
    lens = [1, 3, block_size, block_size + 1, 37, 2 * block_size]
    case = build(name, lens, block_size, seed=hash((name, block_size)) % 1000)
    out = run_ref(case)
    assert out.shape == (len(lens), case.q.shape[1], case.values[0].shape[-1])
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), contiguous_attention(case), atol=1e-5, rtol=1e-5)


def test_reference_keeps_dtype_and_auto_backend_on_cpu():
    case = build("gqa", [5, 9], 4, dtype=torch.bfloat16)
    out = paged_attention(
        case.q, case.k_cache, case.v_cache, case.block_tables, case.context_lens, backend="auto", **case.kwargs
    )
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, run_ref(case))
    torch.testing.assert_close(out.double(), contiguous_attention(case), atol=3e-2, rtol=3e-2)


def test_window_larger_than_context_is_full_attention():
    case = build("gqa", [3, 11], 4)
    full = run_ref(case)
    case.kwargs["sliding_window"] = 100
    torch.testing.assert_close(run_ref(case), full)
    case.kwargs["sliding_window"] = 1  # only the query's own key: output = that key's value
    out = run_ref(case)
    for b, v in enumerate(case.values):
        torch.testing.assert_close(out[b].double(), v[-1].repeat_interleave(4, dim=0), atol=1e-6, rtol=1e-6)


def test_write_kv_writes_exactly_the_given_slots():
    gen = torch.Generator().manual_seed(0)
    k_cache = torch.randn(5, 4, 2, 8, generator=gen)
    v_cache = torch.randn(5, 4, 2, 6, generator=gen)
    k0, v0 = k_cache.clone(), v_cache.clone()
    slots = torch.tensor([17, 4, 19, 8], dtype=torch.int64)
    k = torch.randn(4, 2, 8, generator=gen)
    v = torch.randn(4, 2, 6, generator=gen)
    write_kv(k_cache, v_cache, k, v, slots)
    touched = torch.zeros(20, dtype=torch.bool)
    touched[slots] = True
    kf, vf = k_cache.view(20, 2, 8), v_cache.view(20, 2, 6)
    torch.testing.assert_close(kf[slots], k, rtol=0, atol=0)
    torch.testing.assert_close(vf[slots], v, rtol=0, atol=0)
    torch.testing.assert_close(kf[~touched], k0.view(20, 2, 8)[~touched], rtol=0, atol=0)
    torch.testing.assert_close(vf[~touched], v0.view(20, 2, 6)[~touched], rtol=0, atol=0)
    assert k_cache[4, 1].equal(k[0]) and k_cache[1, 0].equal(k[1])  # slot = block·block_size + offset


def test_write_kv_mla_latent_pool_and_dtype_cast():
    cache = torch.zeros(3, 2, 1, 12, dtype=torch.bfloat16)
    latent = torch.randn(2, 1, 12)
    write_kv(cache, None, latent, None, torch.tensor([5, 0]))
    assert cache[2, 1].equal(latent[0].bfloat16()) and cache[0, 0].equal(latent[1].bfloat16())
    assert cache.view(6, 1, 12)[1:5].abs().sum() == 0


def test_write_kv_then_attention_roundtrip():
    """Tokens written one decode step at a time with write_kv give the same attention as contiguous K/V."""
    case = build("gqa", [6, 13], 4, seed=3)
    k_cache = torch.full_like(case.k_cache, float("nan"))
    v_cache = torch.full_like(case.v_cache, float("nan"))
    for b, (k, v) in enumerate(zip(case.keys, case.values, strict=True)):
        pos = torch.arange(k.shape[0])
        slots = case.block_tables[b].long()[pos // 4] * 4 + pos % 4
        write_kv(k_cache, v_cache, k.float(), v.float(), slots)
    out = paged_attention_reference(case.q, k_cache, v_cache, case.block_tables, case.context_lens, **case.kwargs)
    torch.testing.assert_close(out.double(), contiguous_attention(case), atol=1e-5, rtol=1e-5)


def test_write_kv_errors():
    k_cache = torch.zeros(2, 4, 2, 8)
    with pytest.raises(ValueError, match="both"):
        write_kv(k_cache, torch.zeros(2, 4, 2, 8), torch.zeros(1, 2, 8), None, torch.tensor([0]))
    with pytest.raises(ValueError, match="fit"):
        write_kv(k_cache, None, torch.zeros(1, 2, 4), None, torch.tensor([0]))
    with pytest.raises(ValueError, match="slot_mapping"):
        write_kv(k_cache, None, torch.zeros(2, 2, 8), None, torch.tensor([0]))


def _args(**over):
    base = dict(
        q=torch.zeros(2, 8, 16),
        k_cache=torch.zeros(4, 4, 2, 16),
        v_cache=torch.zeros(4, 4, 2, 16),
        block_tables=torch.zeros(2, 3, dtype=torch.int32),
        context_lens=torch.ones(2, dtype=torch.int32),
    )
    base.update(over)
    return base


@pytest.mark.parametrize(
    ("over", "kwargs", "match"),
    [
        ({"q": torch.zeros(2, 7, 16)}, {}, "multiple of kv heads"),
        ({"q": torch.zeros(2, 8, 16, dtype=torch.float16)}, {}, "same dtype"),
        ({"v_cache": torch.zeros(4, 4, 2, 16, dtype=torch.float16)}, {}, "same dtype"),
        ({"block_tables": torch.zeros(2, 3, dtype=torch.int64)}, {}, "int32"),
        ({"block_tables": torch.zeros(3, 3, dtype=torch.int32)}, {}, "block_tables"),
        ({"context_lens": torch.ones(2, dtype=torch.int64)}, {}, "context_lens"),
        ({"q": torch.zeros(2, 8, 12)}, {}, "head dim"),
        ({"v_cache": torch.zeros(4, 2, 2, 16)}, {}, "share"),
        ({}, {"value_dim": 8}, "value_dim"),
        ({"v_cache": None}, {"value_dim": 32}, "value_dim"),
        ({}, {"sliding_window": 0}, "sliding_window"),
        ({}, {"alibi_slopes": torch.ones(2)}, "alibi_slopes"),
        ({}, {"backend": "cuda"}, "backend"),
    ],
)
def test_bad_arguments_raise_value_error(over, kwargs, match):
    args = _args(**over)
    with pytest.raises(ValueError, match=match):
        paged_attention(*args.values(), scale=0.25, **kwargs)


def test_triton_rejects_cpu_tensors(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises((ValueError, RuntimeError)):
        paged_attention_triton(*_args().values(), scale=0.25)


@pytest.mark.skipif(not CUDA, reason="device mismatch needs a CUDA device")
def test_device_mismatch_raises():
    args = _args(context_lens=torch.ones(2, dtype=torch.int32, device="cuda"))
    with pytest.raises(ValueError, match="is on"):
        paged_attention(*args.values(), scale=0.25)


# ------------------------------------------------------------------------------------------------ CUDA

TOL = {
    torch.float32: {"atol": 2e-5, "rtol": 2e-5},
    torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2},
    torch.float16: {"atol": 4e-3, "rtol": 4e-3},
}


def _ragged_lens(batch: int, max_len: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, max_len + 1, (batch,), generator=gen).tolist()
    lens[0], lens[-1] = 1, max_len
    return lens


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("name", list(SHAPES))
def test_triton_matches_reference(name, block_size, dtype):
    case = build(name, _ragged_lens(7, 300, block_size), block_size, dtype=dtype, device="cuda", seed=block_size)
    ref = run_ref(case)
    for splits in (None, 1, 3):
        out = paged_attention_triton(
            case.q, case.k_cache, case.v_cache, case.block_tables, case.context_lens, num_splits=splits, **case.kwargs
        )
        assert out.dtype == dtype and out.shape == ref.shape
        torch.testing.assert_close(out, ref, **TOL[dtype], msg=lambda m, s=splits: f"splits={s}: {m}")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "shape", [(32, 8, 128, 128, None), (12, 12, 64, 64, None), (16, 1, 96, 96, None), (16, 1, 80, None, 64)]
)
def test_triton_long_contexts(shape, dtype):
    """Contexts 1..2000 on model-like shapes (Llama GQA, 125M MHA, MQA, MLA-like latent 64+16)."""
    heads, kv_heads, d_k, d_v, mla = shape
    lens = _ragged_lens(6, 2000, 1)
    for window, alibi in ((None, False), (257, True)):
        case = make_case(
            lens, heads, kv_heads, d_k, d_v, 16, mla_value_dim=mla, sliding_window=window, alibi=alibi, dtype=dtype,
            device="cuda", seed=7,
        )  # fmt: skip
        ref = run_ref(case)
        out = paged_attention(
            case.q, case.k_cache, case.v_cache, case.block_tables, case.context_lens, backend="triton", **case.kwargs
        )
        torch.testing.assert_close(out, ref, **TOL[dtype])
        if dtype == torch.float32:
            torch.testing.assert_close(out.double().cpu(), contiguous_attention(case), atol=1e-4, rtol=1e-4)


@needs_cuda
@pytest.mark.parametrize("splits", [1, 4])
def test_triton_cuda_graph_replay(splits):
    """Capture once; new lengths and new block tables written in place are picked up by replay."""
    heads, kv_heads, d, bs = 8, 2, 64, 16
    first = make_case([40, 1, 130, 77], heads, kv_heads, d, d, bs, dtype=torch.bfloat16, device="cuda", seed=1)
    second = make_case([200, 16, 3, 160], heads, kv_heads, d, d, bs, dtype=torch.bfloat16, device="cuda", seed=2)
    max_blocks = 16  # both cases' tables fit; static buffers sized once
    blocks = max(first.k_cache.shape[0], second.k_cache.shape[0])
    k_cache = torch.zeros(blocks, bs, kv_heads, d, dtype=torch.bfloat16, device="cuda")
    v_cache = torch.zeros_like(k_cache)
    q = torch.zeros_like(first.q)
    tables = torch.zeros(4, max_blocks, dtype=torch.int32, device="cuda")
    lens = torch.zeros(4, dtype=torch.int32, device="cuda")

    def load(case: Case) -> None:
        k_cache.zero_()
        v_cache.zero_()
        k_cache[: case.k_cache.shape[0]] = case.k_cache.nan_to_num(0.0)
        v_cache[: case.v_cache.shape[0]] = case.v_cache.nan_to_num(0.0)
        q.copy_(case.q)
        tables.zero_()
        tables[:, : case.block_tables.shape[1]] = case.block_tables
        lens.copy_(case.context_lens)

    def call() -> torch.Tensor:
        return paged_attention_triton(q, k_cache, v_cache, tables, lens, scale=d**-0.5, num_splits=splits)

    load(first)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        call()  # compile outside capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call()
    for case in (first, second):
        load(case)
        graph.replay()
        torch.cuda.synchronize()
        expected = paged_attention_reference(q, k_cache, v_cache, tables, lens, scale=d**-0.5)
        torch.testing.assert_close(out, expected, **TOL[torch.bfloat16])


@needs_cuda
@pytest.mark.parametrize("mha_dot", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["mha", "alibi"])
def test_triton_mha_both_paths(name, dtype, mha_dot, monkeypatch):
    """Group-of-one heads: the tensor-core path (head tile padded to 16) and the elementwise path agree."""
    monkeypatch.setitem(pa._settings, "mha_dot", mha_dot)
    case = build(name, _ragged_lens(5, 700, 3), 16, dtype=dtype, device="cuda", seed=4)
    ref = run_ref(case)
    for splits in (1, 4):
        out = paged_attention_triton(
            case.q, case.k_cache, case.v_cache, case.block_tables, case.context_lens, num_splits=splits, **case.kwargs
        )
        torch.testing.assert_close(out, ref, **TOL[dtype])
