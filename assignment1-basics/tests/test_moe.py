"""MoEFeedForward against a brute-force per-token reference, HF's DeepseekV3MoE, and the balancing rules."""

import pytest
import torch

from cs336_basics.model import TransformerConfig, TransformerLM
from cs336_basics.moe import MoEFeedForward, grouped_mm_available


def make_config(**overrides) -> TransformerConfig:
    fields = dict(
        vocab_size=64, context_length=32, d_model=16, num_layers=2, num_heads=2, d_ff=32, ffn="moe",
        num_experts=6, moe_top_k=2, num_shared_experts=1, moe_d_ff=8,
    )
    return TransformerConfig(**{**fields, **overrides})


def make_moe(dtype=torch.float64, seed=0, **overrides) -> MoEFeedForward:
    torch.manual_seed(seed)
    moe = MoEFeedForward(make_config(**overrides), dtype=dtype)
    with torch.no_grad():
        moe.router.weight.normal_()
        moe.expert_bias.normal_(std=0.3)  # steers which experts are chosen, never their weights
    return moe


def swiglu(x, w1, w3, w2):
    return (torch.nn.functional.silu(x @ w1.T) * (x @ w3.T)) @ w2.T


def brute_force(moe: MoEFeedForward, x: torch.Tensor) -> torch.Tensor:
    """One token at a time in float64, experts picked by sorting in Python."""
    flat = x.reshape(-1, x.shape[-1]).double()
    outputs = []
    for token in flat:
        logits = moe.router.weight.double() @ token
        s = logits.sigmoid() if moe.score_fn == "sigmoid" else logits.softmax(-1)
        biased = (s + moe.expert_bias.double()).tolist()
        top = sorted(range(moe.num_experts), key=lambda e: -biased[e])[: moe.top_k]
        g = torch.stack([s[e] for e in top])
        if moe.norm_topk:
            g = g / g.sum()
        g = g * moe.routed_scale
        y = sum(g[i] * swiglu(token, moe.experts_w1[e].double(), moe.experts_w3[e].double(), moe.experts_w2[e].double())
                for i, e in enumerate(top))
        if hasattr(moe, "shared"):
            shared = moe.shared
            y = y + swiglu(token, shared.w1.weight.double(), shared.w3.weight.double(), shared.w2.weight.double())
        outputs.append(y)
    return torch.stack(outputs).view_as(x)


@pytest.mark.parametrize(
    "router, norm_topk, shared, scale",
    [("sigmoid", True, 1, 1.0), ("sigmoid", False, 0, 2.5), ("softmax", True, 2, 1.0), ("softmax", False, 0, 1.0)],
)
def test_dispatch_equals_per_token_reference(router, norm_topk, shared, scale):
    moe = make_moe(moe_router=router, moe_norm_topk=norm_topk, num_shared_experts=shared, moe_routed_scale=scale)
    assert hasattr(moe, "shared") == (shared > 0)
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    torch.testing.assert_close(moe(x), brute_force(moe, x), rtol=1e-12, atol=1e-12)


def test_grouped_mm_path_equals_expert_loop():
    moe = make_moe(dtype=torch.float32)
    x = torch.randn(4, 9, 16, requires_grad=True)
    if not grouped_mm_available(x, moe.experts_w1, moe.experts_w2):
        pytest.skip(f"torch {torch.__version__} has no torch._grouped_mm for float32 on {x.device.type}")
    results = []
    for path in ("grouped_mm", "loop"):
        moe.dispatch = path
        moe.zero_grad()
        x.grad = None
        out = moe(x)
        out.backward(torch.randn_like(out, generator=torch.Generator().manual_seed(1)))
        results.append((out.detach(), x.grad.clone(), moe.experts_w1.grad.clone(), moe.experts_w2.grad.clone()))
    for grouped, loop in zip(*results, strict=True):
        torch.testing.assert_close(grouped, loop, rtol=1e-5, atol=1e-6)


def test_expert_gemms_follow_autocast_dtype(monkeypatch):
    """Under bf16 autocast (how the trainer runs) the experts multiply in bf16, as a Linear would, so the bf16
    grouped kernel serves float32 parameters; the result stays within bf16 rounding of the float32 layer."""
    moe = make_moe(dtype=torch.float32)
    x = torch.randn(4, 9, 16)
    reference = moe(x)
    seen = []
    real = moe.use_grouped_mm
    monkeypatch.setattr(moe, "use_grouped_mm", lambda xs, *w: seen.append((xs.dtype, *(t.dtype for t in w)))
                        or real(xs, *w))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = moe(x)
    assert seen == [(torch.bfloat16, torch.bfloat16, torch.bfloat16)]
    torch.testing.assert_close(mixed.float(), reference, rtol=0.05, atol=0.05)
    assert not torch.allclose(mixed.float(), reference, rtol=0, atol=1e-6)  # it really ran in bf16


def test_float64_takes_the_expert_loop():
    moe = make_moe()  # float64: torch._grouped_mm refuses it, so auto dispatch must not pick it
    assert not grouped_mm_available(torch.zeros(1, 16, dtype=torch.float64), moe.experts_w1, moe.experts_w2)
    assert not moe.use_grouped_mm(torch.zeros(1, 16, dtype=torch.float64))


def coefficient_of_variation(load: torch.Tensor) -> float:
    return (load.std(unbiased=False) / load.mean()).item()


def test_bias_balancing_moves_skewed_router_towards_uniform_load():
    torch.manual_seed(0)
    moe = MoEFeedForward(make_config(num_experts=8, moe_top_k=2), dtype=torch.float64)
    direction = torch.randn(16, dtype=torch.float64)
    x = torch.randn(256, 16, dtype=torch.float64) * 0.3 + direction  # every token leans the same way
    with torch.no_grad():
        moe.router.weight.normal_(std=0.3)
        moe.router.weight[:2] = direction / direction.norm() * 2.0  # experts 0 and 1 win almost everywhere
    moe.train()
    history = []
    for _ in range(60):
        moe(x)
        history.append(moe.update_bias(rate=0.02))
        assert moe.load_counts.sum() == 0  # reset by update_bias
    first, last = history[0], torch.stack(history[-10:]).mean(0)
    torch.testing.assert_close(first.sum(), torch.tensor(1.0, dtype=first.dtype))
    assert first[:2].sum() > 0.9  # the skew is real: experts 0 and 1 take over 90% of the slots
    assert coefficient_of_variation(last) < 0.25 * coefficient_of_variation(first)
    assert last.max() / last.min() < 3.0
    assert moe.expert_bias[:2].max() < moe.expert_bias[2:].min()  # the hogs were pushed down


def test_load_counts_and_aux_loss_only_in_training():
    moe = make_moe()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    moe.eval()
    moe(x)
    assert moe.load_counts.sum() == 0 and moe.last_aux_loss is None
    moe.train()
    moe(x)
    assert moe.load_counts.sum() == 2 * 5 * moe.top_k
    assert "expert_bias" in moe.state_dict() and "load_counts" not in moe.state_dict()


@pytest.mark.parametrize("router", ["sigmoid", "softmax"])
def test_aux_loss_matches_hand_computation(router):
    moe = make_moe(moe_router=router, num_experts=4, moe_top_k=2).train()
    x = torch.randn(2, 3, 16, dtype=torch.float64)
    moe(x)
    expected = []
    for seq in x:
        logits = seq @ moe.router.weight.T
        s = logits.sigmoid() if router == "sigmoid" else logits.softmax(-1)
        chosen = torch.topk(s + moe.expert_bias, 2).indices
        count = [sum(int(e in row) for row in chosen.tolist()) for e in range(4)]
        f = [4 / (2 * 3) * c for c in count]
        p = (s / s.sum(-1, keepdim=True)).mean(0)
        expected.append(sum(f[e] * p[e] for e in range(4)))
    torch.testing.assert_close(moe.last_aux_loss, sum(expected) / 2)


def test_aux_loss_is_one_for_uniform_scores():
    moe = make_moe(num_experts=4, moe_top_k=2).train()
    with torch.no_grad():
        moe.router.weight.zero_()  # every score 0.5: P_i = 1/E, and Σ f_i = E whatever was chosen
    moe(torch.randn(3, 5, 16, dtype=torch.float64))
    torch.testing.assert_close(moe.last_aux_loss, torch.tensor(1.0, dtype=torch.float64))


def test_gradients_reach_router_and_experts():
    moe = make_moe(num_experts=6, moe_top_k=2).train()
    x = torch.randn(1, 2, 16, dtype=torch.float64)  # 2 tokens x 2 slots: at most 4 of 6 experts used
    (moe(x).square().sum() + moe.last_aux_loss).backward()
    chosen = moe.route(x.reshape(-1, 16))[1].unique()
    assert moe.router.weight.grad.abs().sum() > 0
    for w in (moe.experts_w1, moe.experts_w2, moe.experts_w3):
        used = torch.zeros(6, dtype=torch.bool)
        used[chosen] = True
        assert (w.grad[used].flatten(1).abs().sum(1) > 0).all()
        assert (w.grad[~used] == 0).all()
    assert moe.shared.w1.weight.grad.abs().sum() > 0


def test_model_counts_active_parameters():
    config = make_config(moe_dense_layers=1)
    model = TransformerLM(config)
    assert len(model.moe_layers()) == 1
    unused = (config.num_experts - config.moe_top_k) * 3 * config.d_model * config.moe_d_ff
    assert model.moe_layers()[0].inactive_parameters_per_token() == unused
    assert model.num_parameters() - model.num_active_parameters() == unused


def hf_moe(moe: MoEFeedForward, shared: int):
    from transformers.models.deepseek_v3.configuration_deepseek_v3 import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    config = DeepseekV3Config(
        hidden_size=16, moe_intermediate_size=8, n_routed_experts=moe.num_experts, num_experts_per_tok=moe.top_k,
        n_group=1, topk_group=1, n_shared_experts=shared, norm_topk_prob=moe.norm_topk,
        routed_scaling_factor=moe.routed_scale, hidden_act="silu", experts_implementation="eager",
    )
    ref = DeepseekV3MoE(config).float()
    with torch.no_grad():
        ref.gate.weight.copy_(moe.router.weight)
        ref.gate.e_score_correction_bias.copy_(moe.expert_bias)
        # transformers 5.x fuses the experts: gate_up_proj (E, 2·ff, d) = [gate rows; up rows], down_proj (E, d, ff)
        ref.experts.gate_up_proj.copy_(torch.cat((moe.experts_w1, moe.experts_w3), dim=1))
        ref.experts.down_proj.copy_(moe.experts_w2)
        ref.shared_experts.gate_proj.weight.copy_(moe.shared.w1.weight)
        ref.shared_experts.up_proj.weight.copy_(moe.shared.w3.weight)
        ref.shared_experts.down_proj.weight.copy_(moe.shared.w2.weight)
    return ref


@pytest.mark.parametrize("norm_topk, shared, scale", [(True, 1, 2.5), (False, 2, 1.0)])
def test_matches_hf_deepseek_v3_moe(norm_topk, shared, scale):
    moe = make_moe(dtype=torch.float32, moe_norm_topk=norm_topk, num_shared_experts=shared, moe_routed_scale=scale)
    ref = hf_moe(moe, shared)
    x = torch.randn(3, 11, 16)
    with torch.no_grad():
        ours, theirs = moe(x), ref(x)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
        ref.experts.down_proj[3, 0, 0] += 0.1  # the check can fail: one perturbed expert weight shows
        assert not torch.allclose(ours, ref(x), rtol=1e-5, atol=1e-6)
