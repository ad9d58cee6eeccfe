"""The attention-backend registry: every backend computes the same attention (values and gradients) as a
per-head brute-force float64 reference, the model gives the same logits and gradients with any backend, a
short training run's losses agree across backends, and unknown names fail with the list of known ones."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from cs336_basics import attention_backends as ab
from cs336_basics.attention_backends import (
    UnknownAttentionBackend,
    available_attention_backends,
    get_attention_backend,
    register_attention_backend,
)
from cs336_basics.model import ConfigError, TransformerConfig, TransformerLM
from cs336_basics.training.metrics import read_jsonl

CPU_BACKENDS = ["ours", "sdpa", "sdpa-flash", "sdpa-math"]
CUDA_ONLY = ["sdpa-efficient", "sdpa-cudnn"]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="a CUDA-only backend; no GPU here")


def brute_force(q, k, v, causal: bool, scale: float | None = None):
    """Head by head, query by query, in float64: query head h reads KV head h // (heads / kv_heads)."""
    q, k, v = q.double(), k.double(), v.double()
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    group = q.shape[1] // k.shape[1]
    out = torch.zeros_like(q)
    for h in range(q.shape[1]):
        for i in range(q.shape[2]):
            keys = slice(0, i + 1) if causal else slice(None)
            scores = (k[:, h // group, keys] @ q[:, h, i, :, None]).squeeze(-1) * scale
            out[:, h, i] = (torch.softmax(scores, dim=-1)[..., None] * v[:, h // group, keys]).sum(-2)
    return out


def _qkv(heads=4, kv_heads=4, seq=13, d=8, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(2, heads, seq, d), (2, kv_heads, seq, d), (2, kv_heads, seq, d)]
    return [torch.randn(s, generator=g, dtype=torch.float64).to(device, dtype).requires_grad_() for s in shapes]


def counted(monkeypatch, name: str) -> list[int]:
    """Counts the calls of backend `name` (so a test knows the backend, not the default path, ran)."""
    backend, calls = ab._REGISTRY[name], []

    def fn(*args, **kwargs):
        calls.append(1)
        return backend.fn(*args, **kwargs)

    monkeypatch.setitem(ab._REGISTRY, name, dataclasses.replace(backend, fn=fn))
    return calls


def _grads(out, inputs, seed=1):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return torch.autograd.grad(out, inputs, g.to(out.device, out.dtype))


@pytest.mark.parametrize("name", CPU_BACKENDS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_backend_equals_brute_force_values_and_gradients(name, causal, kv_heads, dtype):
    q, k, v = _qkv(kv_heads=kv_heads, dtype=dtype)
    out = get_attention_backend(name)(q, k, v, causal=causal)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = brute_force(q64, k64, v64, causal)
    # "ours" takes its softmax in float32 (as the course's softmax does), so it is float32-accurate at best
    tol = {} if dtype == torch.float64 and name != "ours" else dict(atol=2e-5, rtol=2e-5)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.double(), ref, **tol)
    for got, want in zip(_grads(out, (q, k, v)), _grads(ref, (q64, k64, v64)), strict=True):
        torch.testing.assert_close(got.double(), want, **tol)


@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_a_custom_scale_is_honoured(name):
    q, k, v = _qkv(kv_heads=2)
    out = get_attention_backend(name)(q, k, v, causal=True, scale=0.3)
    torch.testing.assert_close(out, brute_force(q, k, v, True, scale=0.3))


def test_a_registered_backend_gets_what_it_declares_it_can_take():
    """A backend without "gqa"/"scale" sees equal head counts and the default scale; the result is still right."""
    seen = []

    def plain(q, k, v, *, causal, scale):
        seen.append((k.shape[1], scale))
        assert q.shape == k.shape == v.shape
        return brute_force(q, k, v, causal)  # uses 1/√d itself

    register_attention_backend("test-plain", plain)
    try:
        q, k, v = _qkv(heads=4, kv_heads=2)
        out = get_attention_backend("test-plain")(q, k, v, causal=True, scale=0.5)
        torch.testing.assert_close(out, brute_force(q, k, v, True, scale=0.5))
        assert seen == [(4, 1 / math.sqrt(8))]
    finally:
        ab._REGISTRY.pop("test-plain")


def test_unknown_backend_lists_the_available_ones():
    with pytest.raises(UnknownAttentionBackend, match=r"unknown attention backend 'nope'; available: .*sdpa-math"):
        get_attention_backend("nope")
    with pytest.raises(ConfigError, match="unknown attention backend 'nope'"):
        TransformerConfig(**SMALL, attention_backend="nope")
    with pytest.raises(ValueError, match="unknown backend features"):
        register_attention_backend("x", lambda *a, **k: None, supports=("masks",))
    assert set(CPU_BACKENDS + CUDA_ONLY) <= set(available_attention_backends())


def test_backend_needs_plain_causal_attention():
    for variant in (dict(sliding_window=4), dict(position="alibi"), dict(attention="linear", position="none")):
        with pytest.raises(ConfigError, match="plain causal MHA/GQA only"):
            TransformerConfig(**SMALL, **variant, attention_backend="sdpa")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
@pytest.mark.parametrize("name", CUDA_ONLY)
def test_cuda_only_backend_on_cpu_names_itself(name):
    q, k, v = _qkv()
    with pytest.raises(RuntimeError, match=f"{name}.*cuda"):
        get_attention_backend(name)(q, k, v, causal=True)


def _rel_errors(name, q, k, v, ref, ref_grads):
    """‖got − want‖ / ‖want‖ of the output and of dq, dk, dv."""
    out = get_attention_backend(name)(q, k, v, causal=True)
    grads = _grads(out, (q, k, v))
    return [((got.double() - want).norm() / want.norm()).item()
            for got, want in zip((out, *grads), (ref, *ref_grads), strict=True)]


@needs_cuda
@pytest.mark.parametrize("name", CPU_BACKENDS + CUDA_ONLY)
@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_backend_is_as_accurate_as_sdpa_math(name, kv_heads, dtype):
    """Relative errors against float64 within twice those of SDPA's math kernel at the same dtype (plus a floor
    of bf16's / fp16's rounding)."""
    q, k, v = _qkv(kv_heads=kv_heads, seq=200, d=64, dtype=dtype, device="cuda")
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = brute_force(q64, k64, v64, True)
    ref_grads = _grads(ref, (q64, k64, v64))
    floor = 1e-2 if dtype == torch.bfloat16 else 2e-3
    baseline = _rel_errors("sdpa-math", q, k, v, ref, ref_grads)
    for what, err, base in zip(("out", "dq", "dk", "dv"), _rel_errors(name, q, k, v, ref, ref_grads), baseline,
                               strict=True):
        assert err <= 2 * base + floor, f"{name} {what}: error {err:.3g} vs sdpa-math {base:.3g}"


# ------------------------------------------------------------------------------------------------- the model
SMALL = dict(vocab_size=64, context_length=32, d_model=32, num_layers=2, num_heads=4, d_ff=64)


@pytest.mark.parametrize("name", ["ours", "sdpa-math", "sdpa-flash"])
@pytest.mark.parametrize("num_kv_heads", [None, 2])
def test_model_with_backend_equals_default_model(name, num_kv_heads, monkeypatch):
    calls = counted(monkeypatch, name)
    base = TransformerConfig(**SMALL, num_kv_heads=num_kv_heads)
    torch.manual_seed(0)
    default = TransformerLM(base).double()
    other = TransformerLM(TransformerConfig(**{**base.to_dict(), "attention_backend": name})).double()
    assert other.state_dict().keys() == default.state_dict().keys()
    other.load_state_dict(default.state_dict())
    x = torch.randint(0, 64, (3, 20), generator=torch.Generator().manual_seed(1))
    tol = dict(atol=1e-6, rtol=1e-5)  # the default path's softmax runs in float32
    torch.testing.assert_close(other(x), default(x), **tol)
    default(x).logsumexp(-1).sum().backward()
    other(x).logsumexp(-1).sum().backward()
    for (key, p), q in zip(default.named_parameters(), other.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, **tol, msg=key)
    assert len(calls) == 2 * SMALL["num_layers"]


def test_cached_decoding_keeps_working_with_a_backend():
    """Decoding steps (offset > 0) take the default path; prefill takes the backend: same tokens as recomputing."""
    config = TransformerConfig(**SMALL, attention_backend="sdpa-math")
    torch.manual_seed(0)
    model = TransformerLM(config).double().eval()
    prompt = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(2))
    caches = model.new_kv_caches(1, 32)
    with torch.no_grad():
        step_logits = [model(prompt, kv_caches=caches)[:, -1]]
        tokens = prompt
        for _ in range(4):
            nxt = step_logits[-1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, nxt], dim=1)
            step_logits.append(model(nxt, kv_caches=caches)[:, -1])
        full = model(tokens)
    # the decoding steps' default path takes its softmax in float32
    torch.testing.assert_close(torch.stack(step_logits, 1), full[:, prompt.shape[1] - 1:], atol=1e-5, rtol=1e-5)


# -------------------------------------------------------------------------------------------------- training
def _train(tmp_path, run: str, *extra) -> list[float]:
    from cs336_basics.cli import main

    data = tmp_path / "tokens.npy"
    if not data.exists():
        np.save(data, np.random.default_rng(0).integers(0, 64, 4000).astype(np.uint16))
    out = tmp_path / run
    assert main(["train", "--train-data", str(data), "--val-data", str(data), "--out-dir", str(out),
                 "--vocab-size", "64", "--d-model", "32", "--num-layers", "2", "--num-heads", "4", "--d-ff", "64",
                 "--context-length", "16", "--batch-size", "4", "--max-steps", "6", "--log-interval", "1",
                 "--eval-interval", "6", "--eval-batches", "1", "--device", "cpu", "--precision", "fp32",
                 "--no-progress", *extra]) == 0
    return [r["loss"] for r in read_jsonl(str(out / "metrics.jsonl")) if r["split"] == "train"]


def test_training_losses_agree_across_backends_and_the_checkpoint_is_portable(tmp_path, monkeypatch):
    reference = _train(tmp_path, "default", "--no-use-torch-sdpa")
    calls = counted(monkeypatch, "sdpa-math")
    with_backend = _train(tmp_path, "sdpa-math", "--attention-backend", "sdpa-math")
    assert len(calls) >= 6 * 2  # every training step's two layers
    assert len(reference) == 6
    np.testing.assert_allclose(with_backend, reference, rtol=1e-4)
    saved = torch.load(tmp_path / "sdpa-math" / "checkpoint.pt", weights_only=False)["extra"]["model_config"]
    assert saved["attention_backend"] is None  # loads on any machine
    assert json.loads((tmp_path / "sdpa-math" / "config.json").read_text())["attention_backend"] == "sdpa-math"


def test_resume_under_another_backend(tmp_path):
    straight = _train(tmp_path, "straight", "--attention-backend", "ours")
    _train(tmp_path, "split", "--attention-backend", "sdpa-math", "--stop-after-steps", "3")
    split = _train(tmp_path, "split", "--attention-backend", "ours", "--resume")
    np.testing.assert_allclose(split, straight, rtol=1e-4)


def test_cli_rejects_an_unknown_backend_before_training(tmp_path, capsys):
    from cs336_basics.cli import main

    assert main(["train", "--train-data", "x.npy", "--out-dir", str(tmp_path / "r"), "--attention-backend", "nope",
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--attention-backend: unknown attention backend 'nope'; available:" in err[0]
