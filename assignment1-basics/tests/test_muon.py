"""Muon (cs336_basics.muon) against independent float64 computations built on the SVD."""

import math

import pytest
import torch

from cs336_basics.model import TransformerConfig, TransformerLM
from cs336_basics.optim import AdamW, Muon, muon_param_groups, newton_schulz

A, B, C = 3.4445, -4.7750, 2.0315  # Jordan's quintic, restated here so a changed constant fails the test


def polar_factor(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    u, _, vh = torch.linalg.svd(m.double(), full_matrices=False)
    return u @ vh, u, vh


@pytest.mark.parametrize("shape", [(64, 32), (32, 64), (48, 48), (3, 40, 24)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_newton_schulz_approximates_the_svd_polar_factor(shape, dtype):
    """Measure: cosine similarity of the flattened NS output and U Vᵀ (float64 SVD) >= 0.97 per matrix, every
    singular value of the NS output in [0.6, 1.2] (the quintic's designed band: fast, not exact), and the
    output keeps M's singular vectors (Uᵀ O V diagonal: off-diagonal entries <= 1e-4 in float32)."""
    m = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = newton_schulz(m.float(), dtype=dtype).double()
    assert out.shape == m.shape
    polar, u, vh = polar_factor(m)
    cosine = (out * polar).sum((-2, -1)) / (out.norm(dim=(-2, -1)) * polar.norm(dim=(-2, -1)))
    assert cosine.min() >= 0.97, cosine
    singular = torch.linalg.svdvals(out)
    assert singular.min() >= 0.6 and singular.max() <= 1.2, (singular.min(), singular.max())
    if dtype == torch.float32:
        projected = u.mT @ out @ vh.mT
        off_diagonal = projected - torch.diag_embed(torch.diagonal(projected, dim1=-2, dim2=-1))
        assert off_diagonal.abs().max() <= 1e-4


def test_newton_schulz_with_fewer_steps_is_measurably_worse():
    """The measure above can fail: one step leaves the small singular values far below the band."""
    m = torch.randn(64, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert torch.linalg.svdvals(newton_schulz(m, steps=1)).min() < 0.6


def hand_muon(weight, grads, lr, momentum, weight_decay, nesterov=True):
    """Muon written out step by step in float64 through the SVD: NS acts on each singular value σ of the
    normalised momentum as σ ← aσ + bσ³ + cσ⁵, five times; the singular vectors stay."""
    w, buffer = weight.clone(), torch.zeros_like(weight)
    for g in grads:
        buffer = momentum * buffer + (1 - momentum) * g
        m = (1 - momentum) * g + momentum * buffer if nesterov else buffer
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        s = s / (math.sqrt(float((s**2).sum())) + 1e-7)
        for _ in range(5):
            s = A * s + B * s**3 + C * s**5
        orthogonal = u @ torch.diag(s) @ vh
        rows, cols = w.shape
        w = w * (1 - lr * weight_decay) - lr * 0.2 * math.sqrt(max(rows, cols)) * orthogonal
    return w


@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_steps_equal_a_hand_computation_on_a_3x2_matrix(nesterov):
    weight = torch.tensor([[0.5, -1.0], [2.0, 0.25], [-0.75, 1.5]], dtype=torch.float64)
    grads = [torch.tensor([[0.1, 0.3], [-0.2, 0.05], [0.4, -0.1]], dtype=torch.float64),
             torch.tensor([[-0.3, 0.2], [0.1, 0.1], [0.0, -0.5]], dtype=torch.float64)]
    param = torch.nn.Parameter(weight.clone())
    optimizer = Muon([dict(params=[param])], lr=0.05, momentum=0.9, nesterov=nesterov, weight_decay=0.1)
    for step, g in enumerate(grads, start=1):
        param.grad = g.clone()
        optimizer.step()
        expected = hand_muon(weight, grads[:step], lr=0.05, momentum=0.9, weight_decay=0.1, nesterov=nesterov)
        torch.testing.assert_close(param.detach(), expected, rtol=0, atol=1e-12)
    # and the update moved the weights (the comparison above is not between two unchanged tensors)
    assert (param.detach() - weight).abs().max() > 0.01


def test_stacked_expert_weights_are_orthogonalised_per_expert():
    torch.manual_seed(0)
    stacked = torch.nn.Parameter(torch.randn(3, 6, 4, dtype=torch.float64))
    single = [torch.nn.Parameter(stacked.detach()[e].clone()) for e in range(3)]
    grad = torch.randn(3, 6, 4, dtype=torch.float64)
    stacked.grad = grad.clone()
    for e, p in enumerate(single):
        p.grad = grad[e].clone()
    Muon([dict(params=[stacked])], lr=0.1).step()
    Muon([dict(params=single)], lr=0.1).step()
    torch.testing.assert_close(stacked.detach(), torch.stack([p.detach() for p in single]), rtol=0, atol=1e-12)


def test_update_rms_matches_adamw_scale():
    """Moonshot's convention: RMS(update / lr) ≈ 0.2 whatever the matrix's shape."""
    for shape in [(256, 64), (64, 256), (128, 128)]:
        param = torch.nn.Parameter(torch.zeros(shape))
        param.grad = torch.randn(shape, generator=torch.Generator().manual_seed(2))
        Muon([dict(params=[param])], lr=1.0, nesterov=False).step()
        rms = param.detach().pow(2).mean().sqrt().item()
        assert 0.15 <= rms <= 0.22, (shape, rms)


def test_param_groups_put_hidden_matrices_on_muon_and_the_rest_on_adamw():
    config = TransformerConfig(vocab_size=50, context_length=8, d_model=16, num_layers=2, num_heads=2, d_ff=32)
    model = TransformerLM(config)
    muon_group, adamw_group = muon_param_groups(model, muon_lr_scale=2.0, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    muon_names = {names[id(p)] for p in muon_group["params"]}
    adamw_names = {names[id(p)] for p in adamw_group["params"]}
    assert muon_names == {f"layers.{i}.{m}.weight" for i in range(2) for m in
                          ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.output_proj", "ffn.w1", "ffn.w2",
                           "ffn.w3")}
    assert adamw_names == {"token_embeddings.weight", "lm_head.weight", "ln_final.weight",
                           *(f"layers.{i}.{n}.weight" for i in range(2) for n in ("ln1", "ln2"))}
    assert muon_group["lr_scale"] == 2.0 and adamw_group["lr_scale"] == 1.0


def test_moe_router_stays_on_adamw_and_experts_go_to_muon():
    pytest.importorskip("cs336_basics.moe")
    config = TransformerConfig(vocab_size=50, context_length=8, d_model=16, num_layers=1, num_heads=2, d_ff=32,
                               ffn="moe", num_experts=4, moe_top_k=2, moe_d_ff=8)
    model = TransformerLM(config)
    muon_group, adamw_group = muon_param_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert "layers.0.ffn.router.weight" in {names[id(p)] for p in adamw_group["params"]}
    assert "layers.0.ffn.experts_w1" in {names[id(p)] for p in muon_group["params"]}


def test_adamw_groups_of_muon_take_exactly_the_adamw_update():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(5))
    b = torch.nn.Parameter(a.detach().clone())
    muon = Muon([dict(params=[a], use_muon=False)], lr=0.01, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    adamw = AdamW([b], lr=0.01, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    for _ in range(3):
        g = torch.randn(5)
        a.grad, b.grad = g.clone(), g.clone()
        muon.step()
        adamw.step()
    torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=0)


def test_muon_refuses_vectors():
    with pytest.raises(ValueError, match="matrices"):
        Muon([dict(params=[torch.nn.Parameter(torch.zeros(4))])])
