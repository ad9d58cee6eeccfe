"""AdamW, schedule, clipping, batching and checkpoints, each against an independent reference."""

import io
import itertools
import math
import os

import numpy as np
import pytest
import torch

from cs336_basics.checkpoint import load_checkpoint, save_checkpoint
from cs336_basics.data import get_batch, load_tokens
from cs336_basics.model import TransformerConfig, TransformerLM
from cs336_basics.nn_utils import cross_entropy
from cs336_basics.optim import AdamW, clip_gradients, get_lr_cosine_schedule


def _toy_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))


def _train(model, optimizer, steps: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(32, 8, generator=gen)
        loss = (model(x) - x[:, :4].sin()).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_tracks_torch_adamw_over_many_steps(weight_decay):
    ours, theirs = _toy_model(), _toy_model()
    kwargs = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=weight_decay)
    _train(ours, AdamW(ours.parameters(), **kwargs), steps=500)
    _train(theirs, torch.optim.AdamW(theirs.parameters(), **kwargs), steps=500)
    for p, q in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_adamw_first_step_by_hand_and_param_groups():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    frozen = torch.nn.Parameter(torch.tensor([5.0]))
    opt = AdamW([{"params": [p]}, {"params": [frozen], "lr": 0.0}], lr=0.1, weight_decay=0.5)
    p.grad = torch.tensor([0.2, -0.4])
    frozen.grad = torch.tensor([1.0])
    opt.step()
    # t = 1: m̂ = g, v̂ = g², so the Adam step is lr · g/|g| (up to ε), after decay by (1 − lr·λ).
    expected = torch.tensor([1.0, -2.0]) * (1 - 0.1 * 0.5) - 0.1 * torch.tensor([1.0, -1.0])
    torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-6)
    assert frozen.item() == 5.0
    with pytest.raises(ValueError):
        AdamW([p], lr=-1.0)


def test_adamw_group_step_on_its_own_matches_the_optimizer_step():
    """The shared group update (Muon's AdamW groups call it directly) runs outside any no_grad of its caller and
    gives AdamW's step."""
    from cs336_basics.optim import adamw_group_step

    p, q = (torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5])) for _ in range(2))
    for param in (p, q):
        param.grad = torch.tensor([0.2, -0.4, 0.1])
    opt = AdamW([p], lr=0.1, weight_decay=0.5)
    opt.step()
    adamw_group_step({q: {}}, dict(params=[q], lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.5))
    torch.testing.assert_close(q.detach(), p.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("optimizer_class", ["AdamW", "FusedAdamW"])
def test_step_with_a_closure_returns_its_loss_computed_with_gradients(optimizer_class):
    import cs336_basics.optim as optim

    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = getattr(optim, optimizer_class)([p], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (p**2).sum()
        loss.backward()  # fails if the step had left gradients off
        return loss

    loss = opt.step(closure)
    assert loss.item() == 5.0 and p.grad is not None
    assert p.detach().abs().lt(torch.tensor([1.0, 2.0])).all()  # the step used the closure's gradient


def test_cosine_schedule_formula_and_edges():
    kw = dict(max_learning_rate=1.0, min_learning_rate=0.1, warmup_iters=10, cosine_cycle_iters=110)
    assert get_lr_cosine_schedule(0, **kw) == 0.0
    assert get_lr_cosine_schedule(5, **kw) == pytest.approx(0.5)
    assert get_lr_cosine_schedule(10, **kw) == pytest.approx(1.0)
    assert get_lr_cosine_schedule(60, **kw) == pytest.approx(0.55)  # halfway: cos = 0
    assert get_lr_cosine_schedule(110, **kw) == pytest.approx(0.1)
    assert get_lr_cosine_schedule(10_000, **kw) == 0.1
    lrs = [get_lr_cosine_schedule(t, **kw) for t in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(lrs))  # monotone decay
    assert get_lr_cosine_schedule(0, 1.0, 0.1, 0, 0) == 1.0  # no warm-up, no cycle: no division by zero


@pytest.mark.parametrize("max_norm", [1e-2, 1e3])
def test_gradient_clipping_matches_torch(max_norm):
    ours, theirs = _toy_model(), _toy_model()
    x = torch.randn(16, 8)
    for m in (ours, theirs):
        m(x).pow(2).sum().backward()
    ours[0].bias.grad = None  # parameters without gradients are skipped
    theirs[0].bias.grad = None
    norm = clip_gradients(ours.parameters(), max_norm)
    expected_norm = torch.nn.utils.clip_grad_norm_(theirs.parameters(), max_norm)
    torch.testing.assert_close(norm, expected_norm)
    for p, q in zip(ours.parameters(), theirs.parameters(), strict=True):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad)
    total = math.sqrt(sum(p.grad.pow(2).sum().item() for p in ours.parameters() if p.grad is not None))
    assert total == pytest.approx(min(max_norm, expected_norm.item()), rel=1e-4)


def _clip_sharded_one_process(params, max_norm):
    from cs336_basics.training.distributed import Dist, Launch, clip_sharded_gradients

    return clip_sharded_gradients(params, max_norm, Dist(Launch(0, 1, 0, False), "none", torch.device("cpu"), 60))


@pytest.mark.parametrize("clip", [clip_gradients, _clip_sharded_one_process], ids=["plain", "sharded"])
@pytest.mark.parametrize("max_norm", [1e-2, 1e3])
def test_gradient_clipping_of_mixed_dtype_gradients_matches_a_float64_recomputation(max_norm, clip):
    """fp32, bf16 and fp64 gradients together (one multi-tensor group per dtype): the global norm and the
    scaled gradients equal a float64 recomputation, for the plain and the FSDP (sharded) clipping."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(shape, dtype=dtype)) for shape, dtype in
              [((7, 5), torch.float32), ((3,), torch.bfloat16), ((4, 4), torch.float64), ((9,), torch.float32)]]
    for p in params:
        p.grad = torch.randn(p.shape, dtype=torch.float64).to(p.dtype)
    before = [p.grad.double().clone() for p in params]
    norm = clip(params, max_norm)
    expected = math.sqrt(sum(g.pow(2).sum().item() for g in before))
    assert norm.item() == pytest.approx(expected, rel=1e-6)
    scale = min(1.0, max_norm / (expected + 1e-6))
    for p, g in zip(params, before, strict=True):
        tol = 1e-2 if p.dtype == torch.bfloat16 else 1e-6
        torch.testing.assert_close(p.grad.double(), g * scale, rtol=tol, atol=tol * scale)


def test_get_batch_windows_are_contiguous_and_cover_every_start():
    data = np.arange(50, dtype=np.uint16)
    torch.manual_seed(0)
    starts = set()
    for _ in range(200):
        x, y = get_batch(data, batch_size=16, context_length=6, device="cpu")
        assert x.dtype == torch.int64 and x.shape == (16, 6)
        torch.testing.assert_close(y, x + 1)
        torch.testing.assert_close(x - x[:, :1], torch.arange(6).expand(16, 6))
        starts |= set(x[:, 0].tolist())
    assert starts == set(range(50 - 6))
    with pytest.raises(ValueError, match="too short"):
        get_batch(data, 2, 50, "cpu")


def test_load_tokens_memory_maps_npy_and_raw(tmp_path):
    tokens = np.arange(1000, dtype=np.uint16)
    np.save(tmp_path / "t.npy", tokens)
    tokens.tofile(tmp_path / "t.bin")
    for name in ("t.npy", "t.bin"):
        loaded = load_tokens(tmp_path / name)
        assert isinstance(loaded, np.memmap)
        np.testing.assert_array_equal(loaded, tokens)
    with pytest.raises(FileNotFoundError):
        load_tokens(tmp_path / "missing.npy")


def _tiny_lm() -> TransformerLM:
    torch.manual_seed(0)
    return TransformerLM(TransformerConfig(vocab_size=50, context_length=16, d_model=32, num_layers=2,
                                           num_heads=2, d_ff=64))


def _lm_steps(model, opt, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        ids = torch.randint(0, 50, (4, 17), generator=gen)
        loss = cross_entropy(model(ids[:, :-1]), ids[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("to_file_object", [False, True])
def test_checkpoint_resume_continues_exactly(tmp_path, to_file_object):
    model = _tiny_lm()
    opt = AdamW(model.parameters(), lr=1e-2)
    _lm_steps(model, opt, 3, seed=1)
    target = io.BytesIO() if to_file_object else tmp_path / "ckpt" / "model.pt"
    save_checkpoint(model, opt, 3, target)
    uninterrupted = _lm_steps(model, opt, 3, seed=2)

    restored = TransformerLM(model.config)
    restored_opt = AdamW(restored.parameters(), lr=1e-2)
    if to_file_object:
        target.seek(0)
    assert load_checkpoint(target, restored, restored_opt) == 3
    assert _lm_steps(restored, restored_opt, 3, seed=2) == uninterrupted
    if not to_file_object:
        assert os.listdir(tmp_path / "ckpt") == ["model.pt"]  # no temporary files left behind


def test_checkpoint_of_compiled_model_has_plain_keys_and_bad_files_fail_clearly(tmp_path):
    model = _tiny_lm()
    opt = AdamW(model.parameters())

    class Wrapped(torch.nn.Module):  # stands in for torch.compile's OptimizedModule
        def __init__(self, inner):
            super().__init__()
            self._orig_mod = inner

    save_checkpoint(Wrapped(model), opt, 7, tmp_path / "c.pt")
    state = torch.load(tmp_path / "c.pt", weights_only=True)
    assert set(state["model"]) == set(model.state_dict())
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "nope.pt", model)
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a cs336 checkpoint"):
        load_checkpoint(tmp_path / "other.pt", model)
