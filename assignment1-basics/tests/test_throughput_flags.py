"""The throughput flags of issue 25, each path against the plain one or a torch reference: the one-pass
cross-entropy (vs torch's, and its compiled backward free of autograd's scatter), the chunked LM head +
cross-entropy (loss and gradients vs torch.nn.functional.cross_entropy on the full logits, in float64 and
float32 and under bf16 autocast), the fused AdamW (vs our AdamW step by step, torch's convention shown to
differ), the batch prefetcher (exactly the batches of the plain path), --compile-mode / --compile-loss
wiring, the trainer with every flag on, and the benchmark script's CPU smoke mode."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cs336_basics import chunked_ce, onepass_ce
from cs336_basics.attention import MultiHeadSelfAttention
from cs336_basics.chunked_ce import chunk_loss_and_grad, chunked_linear_cross_entropy
from cs336_basics.cli import main
from cs336_basics.cli_support import UserError
from cs336_basics.data import Prefetcher, batch_at, batch_to_device, host_batch, step_batch_starts
from cs336_basics.model import TransformerConfig, TransformerLM
from cs336_basics.nn_utils import cross_entropy
from cs336_basics.onepass_ce import onepass_cross_entropy
from cs336_basics.optim import AdamW, FusedAdamW, clip_gradients
from cs336_basics.testing import one_thread  # noqa: F401 (autouse: one torch thread)
from cs336_basics.training import distributed
from cs336_basics.training.config import TrainConfig
from cs336_basics.training.metrics import read_jsonl, training_flops_per_token
from cs336_basics.training.trainer import build_optimizer, loss_function

ROOT = Path(__file__).resolve().parents[1]


def _full_reference(hidden, weight, targets):
    """Loss and gradients of the plain path, by autograd through the full logits."""
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    loss = F.cross_entropy((h @ w.T).reshape(-1, w.shape[0]), targets.reshape(-1))
    loss.backward()
    return loss.detach(), h.grad, w.grad


def _chunked(hidden, weight, targets, chunk, scale=1.0):
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    loss = chunked_linear_cross_entropy(h, w, targets, chunk)
    (loss * scale).backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("chunk", [1, 7, 16, 37, 1000])  # 37 tokens: one chunk, uneven tails, one per token
def test_chunked_ce_equals_torch_cross_entropy_and_its_gradients(dtype, tol, chunk):
    gen = torch.Generator().manual_seed(chunk)
    hidden = torch.randn(37, 12, generator=gen, dtype=dtype) * 2
    weight = torch.randn(50, 12, generator=gen, dtype=dtype)
    targets = torch.randint(0, 50, (37,), generator=gen)
    ref_loss, ref_dh, ref_dw = _full_reference(hidden.double(), weight.double(), targets)  # float64 truth
    loss, dh, dw = _chunked(hidden, weight, targets, chunk)
    assert loss.dtype == dh.dtype == dw.dtype == dtype
    torch.testing.assert_close(loss.double(), ref_loss, rtol=tol, atol=tol)
    torch.testing.assert_close(dh.double(), ref_dh, rtol=tol, atol=tol)
    torch.testing.assert_close(dw.double(), ref_dw, rtol=tol, atol=tol)
    # the same as our own cross_entropy on the logits
    torch.testing.assert_close(loss.float(), cross_entropy(hidden @ weight.T, targets), rtol=1e-5, atol=1e-6)


def test_chunked_ce_batched_shape_scaled_gradient_and_no_grad():
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(3, 11, 8, generator=gen, dtype=torch.float64)
    weight = torch.randn(20, 8, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, 20, (3, 11), generator=gen)
    ref_loss, ref_dh, ref_dw = _full_reference(hidden, weight, targets)
    loss, dh, dw = _chunked(hidden, weight, targets, chunk=5, scale=2.5)  # d(2.5·loss) = 2.5·d(loss)
    torch.testing.assert_close(loss, ref_loss)
    assert dh.shape == hidden.shape
    torch.testing.assert_close(dh, 2.5 * ref_dh)
    torch.testing.assert_close(dw, 2.5 * ref_dw)
    with torch.no_grad():
        torch.testing.assert_close(chunked_linear_cross_entropy(hidden, weight, targets, 4).double(), ref_loss)


def test_chunk_kernel_is_the_softmax_gradient():
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(9, 30, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 30, (9,), generator=gen)
    F.cross_entropy(logits, targets, reduction="sum").backward()
    loss, grad = chunk_loss_and_grad(logits.detach(), targets, 0.5)
    torch.testing.assert_close(loss.double(), F.cross_entropy(logits, targets, reduction="sum").detach())
    torch.testing.assert_close(grad, 0.5 * logits.grad, rtol=1e-6, atol=1e-7)  # float32 softmax inside


def test_chunked_ce_under_bf16_autocast_matches_the_plain_autocast_path():
    """The LM head in bf16 like the plain path; the hidden states and head weight stay float32."""
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(64, 32, generator=gen)
    weight = torch.randn(100, 32, generator=gen) * 0.2
    targets = torch.randint(0, 100, (64,), generator=gen)
    results = []
    for chunked in (False, True):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = chunked_linear_cross_entropy(h, w, targets, 24) if chunked else cross_entropy(h @ w.T, targets)
        loss.backward()
        results.append((loss.detach(), h.grad, w.grad))
        assert h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    (plain_loss, plain_dh, plain_dw), (loss, dh, dw) = results
    torch.testing.assert_close(loss, plain_loss, rtol=1e-5, atol=1e-5)  # same bf16 logits, float32 softmax
    torch.testing.assert_close(dh, plain_dh, rtol=2e-2, atol=1e-4)  # bf16 gradient matmuls on both sides
    torch.testing.assert_close(dw, plain_dw, rtol=2e-2, atol=1e-4)
    exact = _full_reference(hidden.double(), weight.double(), targets)[0]
    assert abs(loss.double() - exact) < 2e-2  # bf16 logits: close to, not equal to, the float64 loss


def test_model_return_hidden_gives_the_states_the_lm_head_reads():
    torch.manual_seed(0)
    model = TransformerLM(TransformerConfig(vocab_size=40, context_length=12, d_model=16, num_layers=2,
                                            num_heads=2, d_ff=32))
    x = torch.randint(0, 40, (2, 12))
    hidden = model(x, return_hidden=True)
    assert hidden.shape == (2, 12, 16)
    torch.testing.assert_close(hidden @ model.lm_head.weight.T, model(x))


def _stream_dtypes(model) -> list[torch.dtype]:
    seen = []
    for layer in model.layers:
        layer.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    return seen


def test_bf16_residual_stream_computes_what_the_all_bf16_model_does():
    """--residual-dtype bf16 under bf16 autocast over fp32 weights: every block sees a bf16 stream (autocast
    alone leaves it fp32), and the logits are those of the same model with its weights cast to bf16 and no
    autocast (torch's pure-bf16 model; the RoPE table rounded to bf16 there is the one difference)."""
    torch.manual_seed(0)
    config = TransformerConfig(vocab_size=64, context_length=16, d_model=32, num_layers=3, num_heads=4, d_ff=64)
    model = TransformerLM(config)
    for parameter in model.parameters():  # non-trivial norm gains, exactly representable in bf16
        if parameter.ndim == 1:
            parameter.data = (1 + torch.randn_like(parameter) / 4).bfloat16().float()
    pure = TransformerLM(config)
    pure.load_state_dict(model.state_dict())
    pure = pure.to(torch.bfloat16)
    x = torch.randint(0, 64, (2, 16))
    seen = _stream_dtypes(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)
        plain_dtypes = seen[:]
        model.residual_dtype = torch.bfloat16
        logits = model(x)
    assert plain_dtypes == [torch.float32] * 3 and seen[3:] == [torch.bfloat16] * 3
    torch.testing.assert_close(logits.float(), pure(x).float(), rtol=3e-2, atol=3e-2)


def test_residual_dtype_flag_needs_bf16_precision_and_keeps_the_loss_curve(data, tmp_path):
    with pytest.raises(UserError, match="needs bf16 precision"):
        TrainConfig(residual_dtype="bf16", precision="fp32")
    assert main(["train", "--train-data", str(data / "train.npy"), "--val-data", str(data / "val.npy"),
                 "--out-dir", str(tmp_path / "auto"), *TINY, "--residual-dtype", "bf16"]) == 2  # auto: fp32 on CPU
    plain = _losses(data, tmp_path / "plain", "--precision", "bf16")
    bf16 = _losses(data, tmp_path / "bf16", "--precision", "bf16", "--residual-dtype", "bf16")
    assert bf16 != plain  # another path: the stream rounded to bf16 ...
    np.testing.assert_allclose(bf16, plain, rtol=2e-2)  # ... and the same curve to bf16 rounding
    # --residual-dtype auto (the owt-leaderboard preset's) follows the run's precision: bf16 here, fp32 below
    assert _losses(data, tmp_path / "auto-bf16", "--precision", "bf16", "--residual-dtype", "auto") == bf16
    assert _losses(data, tmp_path / "auto-fp32", "--residual-dtype", "auto") == _losses(data, tmp_path / "fp32")


def _params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(6, 5), (5,), (3, 6), (3,), (4,)]
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]


def _run(optimizer_class, steps, weight_decay, eps, optimizer=None, params=None, start=0, **kwargs):
    params = params if params is not None else _params()
    groups = [{"params": params[:3]}, {"params": params[3:], "lr": 2e-3}]  # second group: its own lr
    optimizer = optimizer or optimizer_class(groups, lr=1e-2, betas=(0.9, 0.95), eps=eps,
                                             weight_decay=weight_decay, **kwargs)
    for t in range(start, start + steps):
        gen = torch.Generator().manual_seed(100 + t)
        for i, p in enumerate(params):
            p.grad = torch.randn(p.shape, generator=gen) * (i + 1)
        params[-1].grad = None  # never a gradient: never stepped, never decayed
        if t % 3 == 1:
            params[1].grad = None  # sometimes none: its step count lags the others'
        optimizer.step()
    return params, optimizer


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("eps", [1e-8, 1e-2])  # a large eps: where the eps conventions differ visibly
def test_fused_adamw_steps_equal_ours(weight_decay, eps):
    ours, _ = _run(AdamW, 12, weight_decay, eps)
    fused, _ = _run(FusedAdamW, 12, weight_decay, eps)
    initial = _params()
    for p, q in zip(ours, fused, strict=True):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)
    assert torch.equal(fused[-1], initial[-1]) and torch.equal(ours[-1], initial[-1])
    assert not torch.equal(ours[1], initial[1])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="torch's CUDA fused AdamW kernel needs a GPU"))])
@pytest.mark.parametrize("max_norm", [0.5, 1e9])  # clipping active / a no-op
def test_clip_in_the_fused_step_equals_clipping_then_stepping(max_norm, device):
    clipped_first = [torch.nn.Parameter(p.detach().to(device)) for p in _params()]
    clipping_within = [torch.nn.Parameter(p.detach().to(device)) for p in _params()]
    separate = FusedAdamW(clipped_first, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    fused = FusedAdamW(clipping_within, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    for t in range(5):
        gen = torch.Generator().manual_seed(t)
        grads = [(torch.randn(p.shape, generator=gen) * (i + 1)).to(device) for i, p in enumerate(clipped_first)]
        for p, q, g in zip(clipped_first, clipping_within, grads, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        want_norm = clip_gradients(clipped_first, max_norm)
        norm = fused.clip_in_next_step(max_norm)
        torch.testing.assert_close(norm, want_norm, rtol=0, atol=0)
        assert (norm > max_norm) == (max_norm == 0.5)
        separate.step()
        fused.step()
        for p, q in zip(clipped_first, clipping_within, strict=True):
            torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-6, atol=1e-7)  # left clipped, as clipping leaves it
        assert not hasattr(fused, "grad_scale")  # the scale was for that step only
    # a step without clip_in_next_step is unscaled
    for p, q in zip(clipped_first, clipping_within, strict=True):
        p.grad = q.grad = torch.ones_like(p)
    separate.step()
    fused.step()
    for p, q in zip(clipped_first, clipping_within, strict=True):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)


def test_clip_in_optimizer_flag_is_checked_and_keeps_the_clipped_curve(data, tmp_path):
    with pytest.raises(UserError, match="needs --adamw-impl fused"):
        TrainConfig(clip_in_optimizer=True)
    for bad in (dict(parallel="fsdp"), dict(precision="fp16")):
        with pytest.raises(UserError, match="--clip-in-optimizer works"):
            TrainConfig(clip_in_optimizer=True, adamw_impl="fused", **bad)
    clip = ["--adamw-impl", "fused", "--grad-clip", "0.05"]  # small enough that every step clips
    plain = _losses(data, tmp_path / "plain", *clip)
    within = _losses(data, tmp_path / "within", *clip, "--clip-in-optimizer")
    np.testing.assert_allclose(within, plain, rtol=1e-5)
    norms = [r["grad_norm"] for r in read_jsonl(str(tmp_path / "within" / "metrics.jsonl")) if r["split"] == "train"]
    assert min(norms) > 0.05
    assert within != _losses(data, tmp_path / "unclipped", "--adamw-impl", "fused", "--grad-clip", "inf")


def test_torch_adamw_convention_differs_from_ours_where_eps_matters():
    """Why FusedAdamW rescales eps: torch.optim.AdamW(fused=True) as is would not be our update."""
    ours, _ = _run(AdamW, 12, 0.1, 1e-2)
    theirs, _ = _run(torch.optim.AdamW, 12, 0.1, 1e-2, fused=True)
    assert max((p - q).abs().max().item() for p, q in zip(ours, theirs, strict=True)) > 1e-4


def test_adamw_implementations_resume_each_other():
    ours_through, _ = _run(AdamW, 10, 0.1, 1e-2)
    for first, second in ((AdamW, FusedAdamW), (FusedAdamW, AdamW)):
        params, optimizer = _run(first, 6, 0.1, 1e-2)
        saved = optimizer.state_dict()
        groups = [{"params": params[:3]}, {"params": params[3:]}]
        resumed = second(groups, lr=1.0, eps=1.0)  # hyperparameters come from the state dict
        resumed.load_state_dict(saved)
        params, _ = _run(second, 4, 0.1, 1e-2, optimizer=resumed, params=params, start=6)
        for p, q in zip(ours_through, params, strict=True):
            torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)


def test_build_optimizer_picks_the_implementation():
    model = torch.nn.Linear(3, 2)
    assert type(build_optimizer(model, TrainConfig())) is AdamW
    assert type(build_optimizer(model, TrainConfig(adamw_impl="fused"))) is FusedAdamW
    with pytest.raises(UserError, match="--adamw-impl"):
        TrainConfig(adamw_impl="fused", optimizer="muon")
    with pytest.raises(UserError, match="--parallel none"):
        TrainConfig(loss_impl="chunked", parallel="ddp")
    with pytest.raises(UserError, match="--compile-mode"):
        TrainConfig(compile_mode="fastest")


def test_prefetcher_returns_exactly_the_plain_batches_across_a_jump():
    tokens = np.arange(5_000, dtype=np.uint16) * 7 % 997
    calls = []

    def build(i):
        calls.append(i)
        starts = step_batch_starts(len(tokens), 4, 16, 3, i)
        return host_batch(tokens, starts, 16, pin=False)

    prefetcher = Prefetcher(build, depth=2)
    try:
        for i in [0, 1, 2, 3, 10, 11, 12, 5]:  # 10 and 5: jumps (a resume) rebuild on the spot
            x, y = batch_to_device(prefetcher.get(i), torch.device("cpu"))
            px, py = batch_at(tokens, step_batch_starts(len(tokens), 4, 16, 3, i), 16, "cpu")
            assert torch.equal(x, px) and torch.equal(y, py)
    finally:
        prefetcher.close()
    assert calls[:3] == [0, 1, 2]  # the first call builds on the spot, then the next two are prefetched


@pytest.mark.parametrize("dtype, tol", [(torch.float64, (1e-12, 1e-15)), (torch.float32, (1e-6, 1e-6)),
                                        (torch.bfloat16, (1e-5, 2e-3))])
def test_onepass_ce_equals_torch_cross_entropy_and_its_gradient(dtype, tol):
    """Loss and scaled gradient against autograd through F.cross_entropy in float64 on the same (rounded)
    logits; large logits, so a softmax without the max shift would overflow."""
    torch.manual_seed(0)
    logits = (torch.randn(3, 11, 97, dtype=torch.float64) * 30).to(dtype)
    targets = torch.randint(0, 97, (3, 11))
    x = logits.clone().requires_grad_(True)
    loss = onepass_cross_entropy(x, targets)
    (2.5 * loss).backward()
    ref = logits.double().requires_grad_(True)
    ref_loss = F.cross_entropy(ref.reshape(-1, 97), targets.reshape(-1))
    (2.5 * ref_loss).backward()
    loss_tol, grad_tol = tol
    torch.testing.assert_close(loss.double(), ref_loss.detach(), rtol=loss_tol, atol=loss_tol)
    assert x.grad.dtype == dtype and x.grad.shape == logits.shape
    torch.testing.assert_close(x.grad.double(), ref.grad, rtol=0, atol=grad_tol)


def _backward_ops(loss_fn, logits, targets):
    """The aten operators of the backward graph torch.compile builds for loss_fn (and its output's gradient)."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    ops = []

    def forward_compiler(graph, _):
        return make_boxed_func(graph.forward)

    def backward_compiler(graph, _):
        ops.extend(str(node.target) for node in graph.graph.nodes if node.op == "call_function")
        return make_boxed_func(graph.forward)

    torch._dynamo.reset()
    x = logits.clone().requires_grad_(True)
    loss = torch.compile(loss_fn, backend=aot_autograd(fw_compiler=forward_compiler,
                                                       bw_compiler=backward_compiler))(x, targets)
    loss.backward()
    return ops, loss.detach(), x.grad


def test_onepass_ce_compiles_to_a_backward_without_a_scatter():
    """The reason for the flag: compiled, the plain loss's backward scatters into a zero tensor of the logits'
    size and runs log-softmax's backward reduction; the one-pass one compares class indices instead, with the
    same result."""
    torch.manual_seed(0)
    logits, targets = torch.randn(16, 40), torch.randint(0, 40, (16,))
    plain_ops, plain_loss, plain_grad = _backward_ops(cross_entropy, logits, targets)
    ops, loss, grad = _backward_ops(onepass_cross_entropy, logits, targets)
    assert any("scatter" in op for op in plain_ops)  # what the flag removes is there without it
    assert not any("scatter" in op or "softmax_backward" in op for op in ops)
    assert any("eq" in op for op in ops) and any("exp" in op for op in ops)
    torch.testing.assert_close(loss, plain_loss)
    torch.testing.assert_close(grad, plain_grad)


def test_onepass_loss_function_equals_the_full_one_eagerly_and_under_compile_loss(monkeypatch):
    torch.manual_seed(0)
    model = TransformerLM(TransformerConfig(vocab_size=30, context_length=8, d_model=16, num_layers=1,
                                            num_heads=2, d_ff=32))
    wrapped = distributed.wrap_model(model, "none", torch.device("cpu"), "fp32", False)
    x, y = torch.randint(0, 30, (2, 8)), torch.randint(0, 30, (2, 8))

    def loss_and_grads(config):
        model.zero_grad()
        loss = loss_function(model, wrapped, config)(x, y)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    plain_loss, plain_grads = loss_and_grads(TrainConfig())
    for config in (TrainConfig(loss_impl="onepass"), TrainConfig(loss_impl="onepass", compile=True, compile_loss=True)):
        loss, grads = loss_and_grads(config)
        torch.testing.assert_close(loss, plain_loss)
        for grad, plain_grad in zip(grads, plain_grads, strict=True):
            torch.testing.assert_close(grad, plain_grad, rtol=1e-5, atol=1e-7)
    TrainConfig(loss_impl="onepass", parallel="ddp")  # a plain function of the logits: any --parallel

def test_compile_mode_and_compile_loss_reach_torch_compile(monkeypatch):
    seen = []

    def fake_compile(fn, **kwargs):
        seen.append((fn, kwargs))
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(chunked_ce, "_compiled_chunk_fn", None)  # built afresh through the fake
    torch.manual_seed(0)
    model = TransformerLM(TransformerConfig(vocab_size=30, context_length=8, d_model=16, num_layers=1,
                                            num_heads=2, d_ff=32))
    wrapped = distributed.wrap_model(model, "none", torch.device("cpu"), "fp32", True)
    assert seen[-1] == (model, {})  # the default mode passes no mode: exactly the old call
    wrapped = distributed.wrap_model(model, "none", torch.device("cpu"), "fp32", True, "reduce-overhead")
    assert seen[-1] == (model, {"mode": "reduce-overhead"})
    x, y = torch.randint(0, 30, (2, 8)), torch.randint(0, 30, (2, 8))
    plain = cross_entropy(model(x), y)
    config = TrainConfig(compile=True, compile_loss=True, compile_mode="max-autotune-no-cudagraphs")
    loss_fn = loss_function(model, wrapped, config)
    assert seen[-1][1] == {"mode": "max-autotune-no-cudagraphs"} and seen[-1][0] is loss_fn
    torch.testing.assert_close(loss_fn(x, y), plain)
    chunked = loss_function(model, wrapped, TrainConfig(compile=True, compile_loss=True, loss_impl="chunked",
                                                        loss_chunk_tokens=5))
    torch.testing.assert_close(chunked(x, y), plain)  # its per-chunk kernel went through torch.compile too
    assert any(fn is chunk_loss_and_grad for fn, _ in seen)


VOCAB = 64
TINY = ["--vocab-size", str(VOCAB), "--d-model", "32", "--num-layers", "2", "--num-heads", "4", "--d-ff", "64",
        "--context-length", "16", "--batch-size", "8", "--device", "cpu", "--no-progress", "--log-interval", "1",
        "--eval-interval", "100", "--eval-batches", "1", "--warmup-steps", "2", "--lr-max", "3e-3", "--seed", "1",
        "--max-steps", "6"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokens")
    rng = np.random.default_rng(0)
    ids = (np.cumsum(rng.integers(1, 3, 20_000)) % VOCAB).astype(np.uint16)
    np.save(root / "train.npy", ids[:16_000])
    np.save(root / "val.npy", ids[16_000:])
    return root


def _losses(data, out, *extra):
    assert main(["train", "--train-data", str(data / "train.npy"), "--val-data", str(data / "val.npy"),
                 "--out-dir", str(out), *TINY, *extra]) == 0
    return [r["loss"] for r in read_jsonl(str(out / "metrics.jsonl")) if r["split"] == "train"]


def test_trainer_flags_keep_the_loss_curve(data, tmp_path, monkeypatch):
    plain = _losses(data, tmp_path / "plain")
    assert len(plain) == 6
    # the same batches in the same order: bit-identical losses
    assert _losses(data, tmp_path / "prefetch", "--prefetch", "--grad-accum", "1") == plain
    assert _losses(data, tmp_path / "prefetch-accum", "--prefetch", "--grad-accum", "2") == \
        _losses(data, tmp_path / "accum", "--grad-accum", "2")
    calls = {"prefetch": 0, "chunked": 0, "fused": 0, "onepass": 0}

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(Prefetcher, "get", counting("prefetch", Prefetcher.get))
    monkeypatch.setattr(chunked_ce, "chunked_linear_cross_entropy",
                        counting("chunked", chunked_ce.chunked_linear_cross_entropy))
    monkeypatch.setattr(FusedAdamW, "step", counting("fused", FusedAdamW.step))
    monkeypatch.setattr(onepass_ce, "onepass_cross_entropy", counting("onepass", onepass_ce.onepass_cross_entropy))
    # other arithmetic, the same curve up to float32 rounding
    for flags in (["--loss-impl", "chunked", "--loss-chunk-tokens", "48"], ["--adamw-impl", "fused"],
                  ["--loss-impl", "onepass"], ["--loss-impl", "fused", "--loss-chunk-tokens", "48"],
                  ["--loss-impl", "chunked", "--adamw-impl", "fused", "--prefetch", "--compile-loss"]):
        np.testing.assert_allclose(_losses(data, tmp_path / "-".join(flags).strip("-"), *flags), plain,
                                   rtol=1e-4, err_msg=str(flags))
    # each path ran (chunked and fused: 6 steps + 1 evaluation; onepass: the 6 steps, its evaluation is the
    # plain loss)
    assert calls == {"prefetch": 6, "chunked": 21, "fused": 12, "onepass": 6}


def test_fused_run_resumes_from_a_checkpoint_of_ours(data, tmp_path):
    through = _losses(data, tmp_path / "through")
    _losses(data, tmp_path / "split", "--stop-after-steps", "3")
    resumed = _losses(data, tmp_path / "split", "--resume", "--adamw-impl", "fused")
    np.testing.assert_allclose(resumed, through, rtol=1e-4)


def test_profile_counts_kernels_not_the_gpu_copies_of_record_function_ranges():
    """The optimizer's `Optimizer.step#...` range also appears as a device event spanning its kernels and the
    gaps between them; counted, it doubled the optimizer's time in the H200 profiles (2.7 ms of 5.7)."""
    import importlib.util

    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import FunctionEvent

    spec = importlib.util.spec_from_file_location("train_step_flags", ROOT / "benchmarks" / "train_step_flags.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    events = [FunctionEvent(0, "Optimizer.step#AdamW.step", 0, 100, 400, device_type=DeviceType.CUDA,
                            is_user_annotation=True),
              FunctionEvent(1, "multi_tensor_apply_kernel", 0, 100, 150, device_type=DeviceType.CUDA),
              FunctionEvent(2, "multi_tensor_apply_kernel", 0, 350, 400, device_type=DeviceType.CUDA),
              FunctionEvent(3, "aten::mul", 0, 90, 95)]  # a host op
    assert script.device_spans(events) == [("multi_tensor_apply_kernel", 100, 150),
                                           ("multi_tensor_apply_kernel", 350, 400)]


def test_profile_categories_read_inductor_kernel_names_by_their_ops():
    """Inductor's fused kernels carry a dtype cast ("_to_copy") in most names, which put the cross-entropy's
    backward and the RMSNorm kernels under "copy" in the H100 profile; kernel names from that profile."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_step_flags", ROOT / "benchmarks" / "train_step_flags.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    expected = {
        "triton_red_fused__to_copy__unsafe_view_add_div_eq_exp_expand_mul_neg_sub_sum_unsqueeze_2": "cross_entropy",
        "triton_poi_fused_div_expand_neg_new_zeros_scatter_add_unsqueeze_0": "cross_entropy",
        "triton_per_fused__to_copy__unsafe_view_add_mean_mul_pow_rsqrt_9": "norm_activation",
        "triton_poi_fused__unsafe_view_add_cat_mul_sigmoid_sigmoid_backward_split_view_6": "norm_activation",
        "triton_poi_fused__unsafe_view_clone_permute_view_14": "copy",
        "triton_poi_fused__to_copy_cat_transpose_6": "copy",
        "triton_poi_fused__to_copy_t_7": "copy",
        "nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT": "matmul",
        "triton_tem_fused_mm_0": "matmul",
        "Memcpy HtoD (Pinned -> Device)": "copy",
        "void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda": "copy",
    }
    assert {name: script.categorise(name) for name in expected} == expected

def test_the_leaderboard_preset_carries_the_matched_flags_and_the_benchmark_baseline_stays_old():
    """The preset takes the flags whose 2,000-step curve matched; the benchmark's baseline and single-flag
    variants still start from the old settings, so its table keeps comparing one change at a time."""
    import argparse
    import importlib.util

    from cs336_basics.training.config import config_from_preset

    preset = config_from_preset("owt-leaderboard")
    assert (preset.loss_impl, preset.compile_loss, preset.adamw_impl, preset.prefetch) == ("fused", True, "fused",
                                                                                           True)
    assert preset.loss_chunk_tokens == 32_768  # the whole leaderboard batch as one chunk
    assert (preset.residual_dtype, preset.attention_layout, preset.rope_layout) == ("auto", "bshd", "halves")
    spec = importlib.util.spec_from_file_location("train_step_flags", ROOT / "benchmarks" / "train_step_flags.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    args = argparse.Namespace(tiny=False, overrides={}, batch_size=None, preset="owt-leaderboard", device="cpu",
                              compile=True)
    baseline, fused = script.make_config(args, "baseline"), script.make_config(args, "fused")
    assert (baseline.compile_loss, baseline.adamw_impl, baseline.prefetch) == (False, "ours", False)
    assert (fused.compile_loss, fused.adamw_impl, fused.prefetch) == (False, "fused", False)
    for config in (baseline, fused):
        assert (config.loss_impl, config.residual_dtype, config.attention_layout, config.rope_layout) == \
            ("full", "param", "bhsd", "pairs")
    assert script.make_config(args, "ddp").compile_loss is False  # --compile-loss would refuse --parallel ddp

def test_benchmark_script_smoke_on_cpu(tmp_path):
    out = tmp_path / "flags.json"
    profile = tmp_path / "profile.json"
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_step_flags.py"), "--tiny", "--device", "cpu",
                    "--steps", "2", "--windows", "1", "--warmup", "1", "--variants", "baseline,chunked,fused,all",
                    "--profile", "--profile-out", str(profile), "--out", str(out)],
                   check=True, env=env, timeout=300, capture_output=True)
    result = json.loads(out.read_text())
    rows = {r["variant"]: r for r in result["rows"]}
    assert set(rows) == {"baseline", "chunked", "fused", "all"}
    assert all(r["ms_per_step"] > 0 and not r.get("error") for r in rows.values())
    categories = json.loads(profile.read_text())["profiles"][0]["categories_ms"]
    assert categories["matmul"] > 0 and "idle_gap" in categories


def test_benchmark_script_runs_the_preset_and_its_fused_loss_in_bf16_on_cpu(tmp_path):
    """The preset's flags (bf16 residual among them, hence --precision bf16 on a CPU) and --loss-impl fused start
    from the same weights and batch, so their first losses agree; the profile names the callers of aten::sum."""
    out, profile = tmp_path / "flags.json", tmp_path / "profile.json"
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_step_flags.py"), "--tiny", "--device", "cpu",
                    "--precision", "bf16", "--steps", "2", "--windows", "1", "--warmup", "1",
                    "--variants", "onepass-bf16-residual-bshd-halves,preset-fused,preset-fused-separate-v", "--profile",
                    "--profile-variants", "preset-fused", "--profile-stacks", "aten::sum",
                    "--profile-out", str(profile), "--out", str(out)],
                   check=True, env=env, timeout=300, capture_output=True)
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    assert not any(r.get("error") for r in rows.values())
    assert rows["preset-fused"]["first_step_loss"] == pytest.approx(
        rows["onepass-bf16-residual-bshd-halves"]["first_step_loss"], rel=1e-3)  # bf16 logits on both sides
    assert rows["preset-fused-separate-v"]["first_step_loss"] == pytest.approx(rows["preset-fused"]["first_step_loss"],
                                                                               rel=1e-3)
    sites = json.loads(profile.read_text())["profiles"][0]["stacks"]["aten::sum"]
    assert any(any("chunked_ce.py" in frame for frame in site["callers"]) for site in sites)  # the chunk losses


def test_rope_benchmark_smoke_on_cpu(tmp_path):
    """The RoPE micro-benchmark runs the three forms (it checks them equal before timing) and writes its rows."""
    out = tmp_path / "rope.json"
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "rope_kernels.py"), "--device", "cpu", "--batch-size",
                    "2", "--seq-len", "16", "--num-heads", "2", "--head-dim", "8", "--iters", "2", "--out", str(out)],
                   check=True, env=env, timeout=300, capture_output=True)
    rows = json.loads(out.read_text())["rows"]
    assert [r["form"] for r in rows] == ["textbook stack", "pair swap (ours)", "halves (--rope-layout halves)"]
    assert all(r["ms_per_layer"] > 0 for r in rows)


def test_benchmark_ddp_and_fsdp_variants_train_like_the_plain_step(tmp_path):
    """The script's ddp/fsdp variants (a one-process gloo group on the CPU) start from the same weights and batch
    as the plain step, so their losses must agree with it; --set reaches every variant's model."""
    out = tmp_path / "flags.json"
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_step_flags.py"), "--tiny", "--device", "cpu",
                    "--steps", "2", "--windows", "1", "--warmup", "1",
                    "--variants", "baseline,ddp,fsdp,fsdp-blocks,fsdp-reshard",
                    "--set", "num_layers=3", "--out", str(out)],
                   check=True, env=env, timeout=300, capture_output=True)
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    assert not any(r.get("error") for r in rows.values())
    base = rows["baseline"]
    three_layers = TransformerConfig(vocab_size=512, context_length=32, d_model=64, num_layers=3, num_heads=4,
                                     d_ff=128)  # the script's --tiny shape with the override
    assert base["flops_per_token"] == training_flops_per_token(TransformerLM(three_layers, device="meta"))
    for variant in ("ddp", "fsdp", "fsdp-blocks", "fsdp-reshard"):
        assert rows[variant]["first_step_loss"] == pytest.approx(base["first_step_loss"], rel=1e-6)
        assert rows[variant]["last_loss"] == pytest.approx(base["last_loss"], rel=1e-4)


@pytest.mark.parametrize("separate_value", [False, True])  # --value-proj fused / separate
@pytest.mark.parametrize("rope_halves", [False, True])  # --rope-layout pairs / halves
@pytest.mark.parametrize("num_kv_heads", [4, 2])  # plain multi-head and grouped-query attention
def test_sequence_major_attention_computes_what_the_heads_major_path_does(num_kv_heads, rope_halves, separate_value,
                                                                          monkeypatch):
    """--attention-layout bshd: the logits and every parameter's gradient equal the heads-major path's in
    float64, and SDPA receives q, k, v whose heads sit next to each other within a token (stride d_head).
    With --rope-layout halves the q/k features reach SDPA reordered, and nothing else changes; with
    --value-proj separate v is a dense (batch, seq, heads, d) tensor, not a slice of the fused projection."""
    torch.manual_seed(0)
    config = TransformerConfig(vocab_size=64, context_length=16, d_model=32, num_layers=2, num_heads=4, d_ff=64,
                               num_kv_heads=num_kv_heads, use_torch_sdpa=True)
    model = TransformerLM(config).double()
    x = torch.randint(0, 64, (3, 16))

    def logits_and_grads(sequence_major):
        for layer in model.layers:
            layer.attn.sequence_major = sequence_major
            layer.attn.rope_halves = rope_halves
            layer.attn.separate_value_proj = separate_value
        model.zero_grad()
        logits = model(x)
        (logits * torch.linspace(-1, 1, 64, dtype=torch.float64)).sum().backward()  # every logit its own weight
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    head_strides, dense_values = [], []
    sdpa = F.scaled_dot_product_attention

    def recording_sdpa(q, k, v, **kwargs):
        head_strides.append((q.stride(1), k.stride(1), v.stride(1)))
        dense_values.append(v.transpose(1, 2).is_contiguous())
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording_sdpa)
    sequence_major_calls = []
    path = MultiHeadSelfAttention._sdpa_sequence_major
    monkeypatch.setattr(MultiHeadSelfAttention, "_sdpa_sequence_major",
                        lambda self, x: sequence_major_calls.append(1) or path(self, x))
    plain_logits, plain_grads = logits_and_grads(False)
    assert len(head_strides) == 2 and not sequence_major_calls
    head_strides.clear()
    logits, grads = logits_and_grads(True)
    assert head_strides == [(8, 8, 8)] * 2 and len(sequence_major_calls) == 2  # heads d_head = 8 apart
    assert dense_values[-2:] == [separate_value] * 2
    torch.testing.assert_close(logits, plain_logits, rtol=1e-12, atol=1e-12)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-10, atol=1e-12, msg=name)


def test_attention_layout_flag_is_checked_and_keeps_the_loss_curve(data, tmp_path):
    for bad in (dict(use_torch_sdpa=False), dict(attention="mla"), dict(attention_backend="sdpa-math")):
        with pytest.raises(UserError, match="attention-layout bshd"):
            TrainConfig(attention_layout="bshd", **bad)
    plain = _losses(data, tmp_path / "plain")
    bshd = _losses(data, tmp_path / "bshd", "--attention-layout", "bshd")
    np.testing.assert_allclose(bshd, plain, rtol=1e-5)  # fp32: the same arithmetic, other memory strides
    for bad in (dict(attention_layout="bhsd"), dict(attention_layout="bshd", position="none")):
        with pytest.raises(UserError, match="rope-layout halves"):
            TrainConfig(rope_layout="halves", **bad)
    halves = _losses(data, tmp_path / "halves", "--attention-layout", "bshd", "--rope-layout", "halves")
    np.testing.assert_allclose(halves, plain, rtol=1e-5)  # q·k summed over the features in another order
    with pytest.raises(UserError, match="value-proj separate"):
        TrainConfig(value_proj="separate")
    separate = _losses(data, tmp_path / "separate", "--attention-layout", "bshd", "--rope-layout", "halves",
                       "--value-proj", "separate")
    np.testing.assert_allclose(separate, plain, rtol=1e-5)  # v = x Wv by its own GEMM
