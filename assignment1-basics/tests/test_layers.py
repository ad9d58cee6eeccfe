"""Each building block against an independent formulation: torch built-ins or a float64 recomputation."""

import math

import pytest
import torch
import torch.nn.functional as F

from cs336_basics.attention import MultiHeadSelfAttention, scaled_dot_product_attention
from cs336_basics.layers import Embedding, Linear, RMSNorm, RotaryPositionalEmbedding, SiLUFeedForward, SwiGLU
from cs336_basics.nn_utils import cross_entropy, log_softmax, silu, softmax


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_linear_matches_functional_linear_and_init_statistics():
    layer = Linear(512, 256)
    x = torch.randn(3, 7, 512)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight))
    std = math.sqrt(2 / (512 + 256))
    assert layer.weight.abs().max() <= 3 * std + 1e-6
    # A normal truncated at ±3σ has standard deviation ≈ 0.9866σ.
    assert layer.weight.std().item() == pytest.approx(0.9866 * std, rel=0.02)


def test_embedding_matches_functional_embedding():
    layer = Embedding(100, 16)
    ids = torch.randint(0, 100, (4, 9))
    torch.testing.assert_close(layer(ids), F.embedding(ids, layer.weight))
    assert layer.weight.abs().max() <= 3.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_matches_torch(dtype):
    d = 64
    ours = RMSNorm(d, eps=1e-5)
    with torch.no_grad():
        ours.weight.copy_(torch.randn(d))
    reference = torch.nn.RMSNorm(d, eps=1e-5)
    reference.load_state_dict(ours.state_dict())
    x = (torch.randn(2, 5, d) * 30).to(dtype)
    expected = reference(x.float()).to(dtype)
    out = ours(x)
    assert out.dtype == dtype
    torch.testing.assert_close(out, expected)


def test_silu_swiglu_and_silu_ffn_match_functional():
    d_model, d_ff = 32, 96
    x = torch.randn(4, 3, d_model)
    torch.testing.assert_close(silu(x), F.silu(x))
    swiglu = SwiGLU(d_model, d_ff)
    expected = F.linear(F.silu(F.linear(x, swiglu.w1.weight)) * F.linear(x, swiglu.w3.weight), swiglu.w2.weight)
    torch.testing.assert_close(swiglu(x), expected)
    ffn = SiLUFeedForward(d_model, 4 * d_model)
    torch.testing.assert_close(ffn(x), F.linear(F.silu(F.linear(x, ffn.w1.weight)), ffn.w2.weight))


def test_softmax_and_log_softmax_are_stable_and_match_torch():
    x = torch.randn(5, 11) * 1000  # naive exp overflows here
    torch.testing.assert_close(softmax(x, dim=-1), torch.softmax(x, dim=-1))
    torch.testing.assert_close(softmax(x, dim=0), torch.softmax(x, dim=0))
    torch.testing.assert_close(log_softmax(x), torch.log_softmax(x, dim=-1))
    assert torch.isfinite(softmax(x)).all()


def test_cross_entropy_matches_torch_for_huge_logits_and_batch_dims():
    logits = torch.randn(2, 6, 50) * 1000
    targets = torch.randint(0, 50, (2, 6))
    expected = F.cross_entropy(logits.reshape(-1, 50), targets.reshape(-1))
    torch.testing.assert_close(cross_entropy(logits, targets), expected)
    logits64 = torch.randn(8, 50, dtype=torch.float64)
    targets64 = torch.randint(0, 50, (8,))
    torch.testing.assert_close(cross_entropy(logits64, targets64).double(),
                               F.cross_entropy(logits64, targets64), rtol=1e-6, atol=1e-6)


def _rope_reference(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """RoPE as complex multiplication in float64: pair (x[2i], x[2i+1]) ↦ (x[2i] + i·x[2i+1])·e^{i·pos·ω_i}."""
    d = x.shape[-1]
    omega = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angle = positions.double()[..., None] * omega
    z = torch.view_as_complex(x.double().reshape(*x.shape[:-1], d // 2, 2).contiguous())
    return torch.view_as_real(z * torch.polar(torch.ones_like(angle), angle)).reshape(x.shape)


def test_rope_matches_complex_rotation_with_arbitrary_positions():
    rope = RotaryPositionalEmbedding(theta=10_000.0, d_k=16, max_seq_len=64)
    x = torch.randn(3, 10, 16)
    positions = torch.randint(0, 64, (3, 10))
    torch.testing.assert_close(rope(x, positions).double(), _rope_reference(x, positions, 10_000.0),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="max_seq_len"):
        rope(x, torch.full((3, 10), 64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_pair_swap_form_is_the_textbook_rotation_bit_for_bit(dtype):
    """The implementation's x·cos + swap(x)·(−sin, sin) against (even·cos − odd·sin, even·sin + odd·cos) written
    out pair by pair: the same products and sums, so equal exactly in float32 and bf16; gradients vs float64."""
    rope = RotaryPositionalEmbedding(theta=10_000.0, d_k=16, max_seq_len=64)
    x = torch.randn(2, 3, 20, 16).to(dtype)
    cos, sin = rope.cos[:20].to(dtype), rope.sin[:20].to(dtype)
    even, odd = x[..., 0::2], x[..., 1::2]
    textbook = torch.empty_like(x)
    textbook[..., 0::2], textbook[..., 1::2] = even * cos - odd * sin, even * sin + odd * cos
    assert torch.equal(rope(x), textbook)
    x64 = x.double().requires_grad_(True)
    weights = torch.randn(x.shape, dtype=torch.float64)
    (rope(x64) * weights).sum().backward()
    reference = x.double().requires_grad_(True)
    (_rope_reference(reference, torch.arange(20).expand(2, 3, 20), 10_000.0) * weights).sum().backward()
    torch.testing.assert_close(x64.grad, reference.grad, rtol=1e-5, atol=1e-5)  # the tables are float32


def test_rope_sequence_major_equals_the_heads_major_rotation():
    """`rotate_sequence_major` on (batch, seq, heads, d) is `forward` on the (batch, heads, seq, d) transpose."""
    rope = RotaryPositionalEmbedding(theta=10_000.0, d_k=8, max_seq_len=32)
    x = torch.randn(2, 12, 5, 8)
    assert torch.equal(rope.rotate_sequence_major(x), rope(x.transpose(1, 2)).transpose(1, 2))
    with pytest.raises(ValueError, match="max_seq_len"):
        rope.rotate_sequence_major(torch.randn(1, 33, 2, 8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_halves_is_the_pair_rotation_of_the_features_reordered(dtype):
    """--rope-layout halves: with each head's features stored as (evens, odds), `rotate_sequence_major(...,
    halves=True)` gives exactly the interleaved rotation's result in that order (the same products and sums)."""
    rope = RotaryPositionalEmbedding(theta=10_000.0, d_k=16, max_seq_len=32)
    x = torch.randn(2, 20, 3, 16).to(dtype)
    evens_then_odds = torch.cat((torch.arange(0, 16, 2), torch.arange(1, 16, 2)))
    rotated = rope.rotate_sequence_major(x[..., evens_then_odds], halves=True)
    assert torch.equal(rotated, rope.rotate_sequence_major(x)[..., evens_then_odds])
    assert not torch.equal(rotated, rope.rotate_sequence_major(x[..., evens_then_odds]))  # the order matters


def test_rope_preserves_norms_and_relative_positions():
    rope = RotaryPositionalEmbedding(theta=500.0, d_k=8, max_seq_len=100)
    q, k = torch.randn(8), torch.randn(8)
    def score(i, j):
        return (rope(q[None], torch.tensor([i])) * rope(k[None], torch.tensor([j]))).sum()
    torch.testing.assert_close(score(3, 1), score(50, 48))  # depends only on i - j
    torch.testing.assert_close(rope(q[None], torch.tensor([7])).norm(), q.norm())


@pytest.mark.parametrize("shape", [(6, 5, 8), (2, 3, 6, 5, 8)])
def test_sdpa_matches_torch_with_boolean_mask(shape):
    q, k, v = torch.randn(shape), torch.randn(shape), torch.randn(shape)
    mask = torch.rand(*shape[:-1], shape[-2]) > 0.3
    mask[..., 0] = True  # every query attends somewhere, as with any causal mask
    torch.testing.assert_close(scaled_dot_product_attention(q, k, v, mask),
                               F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    torch.testing.assert_close(scaled_dot_product_attention(q, k, v), F.scaled_dot_product_attention(q, k, v))


def _mha_reference(attn: MultiHeadSelfAttention, x: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
    """Per-head loop in float64 with explicit weight slicing: no rearranges shared with the implementation."""
    outputs = []
    seq = x.shape[-2]
    d_head = attn.d_head
    for h in range(attn.num_heads):
        rows = slice(h * d_head, (h + 1) * d_head)
        q = x.double() @ attn.q_proj.weight[rows].double().T
        k = x.double() @ attn.k_proj.weight[rows].double().T
        v = x.double() @ attn.v_proj.weight[rows].double().T
        if positions is not None:
            q, k = _rope_reference(q, positions, 10_000.0), _rope_reference(k, positions, 10_000.0)
        scores = q @ k.transpose(-1, -2) / math.sqrt(d_head)
        scores = scores.masked_fill(torch.ones(seq, seq, dtype=torch.bool).triu(1), float("-inf"))
        outputs.append(torch.softmax(scores, dim=-1) @ v)
    return torch.cat(outputs, dim=-1) @ attn.output_proj.weight.double().T


@pytest.mark.parametrize("use_rope", [False, True])
@pytest.mark.parametrize("use_torch_sdpa", [False, True])
def test_causal_multihead_attention_matches_per_head_float64_loop(use_rope, use_torch_sdpa):
    d_model, heads, seq = 32, 4, 9
    rope = RotaryPositionalEmbedding(10_000.0, d_model // heads, 32) if use_rope else None
    attn = MultiHeadSelfAttention(d_model, heads, rope, use_torch_sdpa=use_torch_sdpa)
    x = torch.randn(2, seq, d_model)
    positions = torch.arange(seq).expand(2, seq) + 5 if use_rope else None
    out = attn(x, positions)
    torch.testing.assert_close(out.double(), _mha_reference(attn, x, positions), rtol=1e-4, atol=1e-5)


def test_attention_is_causal():
    attn = MultiHeadSelfAttention(16, 2)
    x = torch.randn(1, 8, 16)
    y = x.clone()
    y[:, 5:] = torch.randn(1, 3, 16)  # changing the future must not change the past
    torch.testing.assert_close(attn(x)[:, :5], attn(y)[:, :5])
