"""Our FlashAttention-2 as a cs336_basics attention backend: found through its entry points (or the fallback
module list where no package metadata exists), equal to a float64 dense reference in values and gradients,
and a model / a short training run with it equal to the default attention's."""

from __future__ import annotations

import dataclasses
import importlib.metadata

import numpy as np
import pytest
import torch

from cs336_basics import attention_backends as ab
from cs336_basics.attention_backends import get_attention_backend
from cs336_basics.model import TransformerConfig, TransformerLM
from cs336_systems.flash_attention import attention_with_lse

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="the Triton kernels need a CUDA GPU")
SMALL = dict(vocab_size=64, context_length=96, d_model=64, num_layers=2, num_heads=4, d_ff=128)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def _reference(q, k, v, causal: bool) -> torch.Tensor:
    """Dense float64 attention (cs336_systems' reference), KV heads repeated over their query-head group."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return attention_with_lse(q, k, v, causal)[0]


def _qkv(heads, kv_heads, seq, d, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(2, heads, seq, d), (2, kv_heads, seq, d), (2, kv_heads, seq, d), (2, heads, seq, d)]
    q, k, v, do = (torch.randn(s, generator=g, dtype=torch.float64).to(device, dtype) for s in shapes)
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), do


def _errors(name, q, k, v, do, causal):
    """Relative errors of out, dq, dk, dv of backend `name` against the float64 reference."""
    out = get_attention_backend(name)(q, k, v, causal=causal)
    grads = torch.autograd.grad(out, (q, k, v), do)
    x64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = _reference(*x64, causal)
    ref_grads = torch.autograd.grad(ref, x64, do.double())
    assert out.dtype == q.dtype and out.shape == q.shape
    return [_rel(a, b) for a, b in zip((out, *grads), (ref, *ref_grads), strict=True)]


def test_entry_points_declare_every_backend_register_adds(monkeypatch):
    """A name `register()` adds but pyproject does not declare would be missing from --attention-backend's list
    and found only by the fallback import."""
    try:
        names = {ep.name for ep in importlib.metadata.entry_points(group=ab.ENTRY_POINT_GROUP)}
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover
        names = set()
    if not names:
        pytest.skip("no installed package metadata (packages used from PYTHONPATH): the fallback test covers it")
    from cs336_systems import attention_backend

    monkeypatch.setattr(ab, "_REGISTRY", {k: v for k, v in ab._REGISTRY.items() if not k.startswith("cs336-")})
    before = set(ab._REGISTRY)
    attention_backend.register()
    registered = set(ab._REGISTRY) - before
    assert {"cs336-fa2", "cs336-fa2-torch", "cs336-fa3"} <= registered
    assert registered == names
    assert names <= set(ab.available_attention_backends())


def test_found_without_package_metadata(monkeypatch):
    """On a machine that uses the packages from PYTHONPATH there are no entry points: the fallback import finds them."""
    monkeypatch.setattr(ab, "_plugin_entry_points", lambda: [])
    monkeypatch.setattr(ab, "_REGISTRY", {k: v for k, v in ab._REGISTRY.items() if not k.startswith("cs336-")})
    assert "cs336-fa2" not in ab.available_attention_backends()
    assert get_attention_backend("cs336-fa2-torch").name == "cs336-fa2-torch"
    assert "cs336-fa2" in ab.available_attention_backends()


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_fa2_torch_backend_equals_dense_reference(causal, kv_heads):
    q, k, v, do = _qkv(4, kv_heads, seq=150, d=16, dtype=torch.float64, device="cpu")  # 3 tiles, the last partial
    for what, err in zip(("out", "dq", "dk", "dv"), _errors("cs336-fa2-torch", q, k, v, do, causal), strict=True):
        assert err < 1e-10, f"{what}: relative error {err:.2e}"


@pytest.mark.skipif(CUDA, reason="checks the message on a machine without CUDA")
def test_triton_backend_on_cpu_says_it_needs_cuda():
    q, k, v, _ = _qkv(2, 2, seq=8, d=16, dtype=torch.float32, device="cpu")
    with pytest.raises(RuntimeError, match="'cs336-fa2' runs on cuda tensors only"):
        get_attention_backend("cs336-fa2")(q, k, v, causal=True)


def _counted(monkeypatch, name: str) -> list[int]:
    backend, calls = get_attention_backend(name), []

    def fn(*args, **kwargs):
        calls.append(1)
        return backend.fn(*args, **kwargs)

    monkeypatch.setitem(ab._REGISTRY, name, dataclasses.replace(backend, fn=fn))
    return calls


@pytest.mark.parametrize("num_kv_heads", [None, 2])
def test_model_with_fa2_torch_equals_default_model(num_kv_heads, monkeypatch):
    calls = _counted(monkeypatch, "cs336-fa2-torch")
    base = TransformerConfig(**SMALL, num_kv_heads=num_kv_heads, use_torch_sdpa=True)
    torch.manual_seed(0)
    default = TransformerLM(base)
    ours = TransformerLM(dataclasses.replace(base, attention_backend="cs336-fa2-torch"))
    ours.load_state_dict(default.state_dict())
    x = torch.randint(0, 64, (2, 90), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ours(x), default(x), atol=1e-5, rtol=1e-5)
    default(x).logsumexp(-1).sum().backward()
    ours(x).logsumexp(-1).sum().backward()
    for (key, p), q in zip(default.named_parameters(), ours.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=key)
    assert len(calls) == 2 * SMALL["num_layers"]


def _train_losses(tmp_path, run: str, device: str, *extra: str) -> list[float]:
    from cs336_basics.cli import main
    from cs336_basics.training.metrics import read_jsonl

    data = tmp_path / "tokens.npy"
    if not data.exists():
        np.save(data, np.random.default_rng(0).integers(0, 64, 20_000).astype(np.uint16))
    out = tmp_path / run
    assert main(["train", "--train-data", str(data), "--val-data", str(data), "--out-dir", str(out),
                 "--vocab-size", "64", "--d-model", "64", "--num-layers", "2", "--num-heads", "4", "--d-ff", "128",
                 "--context-length", "96", "--batch-size", "4", "--max-steps", "8", "--log-interval", "1",
                 "--eval-interval", "8", "--eval-batches", "1", "--device", device, "--no-progress", *extra]) == 0
    return [r["loss"] for r in read_jsonl(str(out / "metrics.jsonl")) if r["split"] == "train"]


def test_training_with_fa2_torch_matches_sdpa(tmp_path, monkeypatch):
    reference = _train_losses(tmp_path, "sdpa", "cpu", "--precision", "fp32", "--attention-backend", "sdpa")
    calls = _counted(monkeypatch, "cs336-fa2-torch")
    ours = _train_losses(tmp_path, "fa2", "cpu", "--precision", "fp32", "--attention-backend", "cs336-fa2-torch")
    assert len(ours) == 8 and calls
    np.testing.assert_allclose(ours, reference, rtol=1e-4)


# ------------------------------------------------------------------------------------------------------- CUDA
@needs_cuda
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("kv_heads", [8, 2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_fa2_backend_is_as_accurate_as_sdpa_flash(causal, kv_heads, dtype):
    q, k, v, do = _qkv(8, kv_heads, seq=1000, d=64, dtype=dtype, device="cuda")
    baseline = _errors("sdpa-flash", q, k, v, do, causal)
    for what, err, base in zip(("out", "dq", "dk", "dv"), _errors("cs336-fa2", q, k, v, do, causal), baseline,
                               strict=True):
        assert err <= max(3 * base, 5e-3), f"{what}: relative error {err:.2e} vs sdpa-flash {base:.2e}"


@needs_cuda
def test_cuda_model_with_fa2_under_bf16_autocast_equals_sdpa():
    base = TransformerConfig(**{**SMALL, "context_length": 512}, use_torch_sdpa=True)
    torch.manual_seed(0)
    sdpa = TransformerLM(base, device="cuda")
    ours = TransformerLM(dataclasses.replace(base, attention_backend="cs336-fa2"), device="cuda")
    ours.load_state_dict(sdpa.state_dict())
    x = torch.randint(0, 64, (4, 512), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = [m(x).float() for m in (sdpa, ours)]
        for out in logits:
            out.logsumexp(-1).mean().backward()
    assert _rel(logits[1], logits[0]) < 2e-2
    for (key, p), q in zip(sdpa.named_parameters(), ours.parameters(), strict=True):
        assert _rel(q.grad, p.grad) < 5e-2, key


@needs_cuda
def test_cuda_training_losses_agree_across_backends(tmp_path):
    losses = {name: _train_losses(tmp_path, name, "cuda", "--precision", "bf16", "--attention-backend", name)
              for name in ("sdpa-flash", "sdpa-cudnn", "cs336-fa2")}
    for name in ("sdpa-cudnn", "cs336-fa2"):
        np.testing.assert_allclose(losses[name], losses["sdpa-flash"], rtol=2e-2, err_msg=name)


def test_training_benchmark_script_tiny_run(tmp_path, monkeypatch):
    """`benchmarks/attention_backend_training.py --tiny` on the CPU: a timing row per (context, backend), and the
    short runs of the three CPU backends from the same weights on the same batches agree (bf16 autocast: to the
    rounding of bf16 matmuls, far below the loss's own step-to-step change)."""
    import importlib.util
    import json
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "attention_backend_training.py"
    spec = importlib.util.spec_from_file_location("attention_backend_training", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    out = tmp_path / "abt.json"
    module.main(["--tiny", "--out", str(out)])
    report = json.loads(out.read_text())
    backends = ["cs336-fa2-torch", "sdpa-math", "sdpa"]
    cells = {(row["context"], row["backend"]) for row in report["timing"] if row.get("ms_per_step", 0) > 0}
    assert cells == {(c, b) for c in (64, 128) for b in backends}
    (run,) = report["loss_runs"].values()
    losses = run["losses"]
    assert set(losses) == set(backends) and all(len(v) == run["steps"] for v in losses.values())
    reference = torch.tensor(losses["cs336-fa2-torch"])
    for name in backends[1:]:
        torch.testing.assert_close(torch.tensor(losses[name]), reference, rtol=2e-3, atol=0)
    assert "cs336-fa2-torch" in out.with_suffix(".md").read_text()
