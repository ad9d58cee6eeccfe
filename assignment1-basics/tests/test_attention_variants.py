"""Attention variants against independent references: brute-force per-head softmax in float64 (GQA/MQA,
sliding windows, ALiBi), the ALiBi paper's slopes, linear attention's quadratic form, and PyTorch's SDPA."""

import math

import pytest
import torch

from cs336_basics.alibi import alibi_bias, alibi_slopes
from cs336_basics.attention import KVCache, MultiHeadSelfAttention
from cs336_basics.layers import RotaryPositionalEmbedding
from cs336_basics.linear_attention import EPS, CausalLinearAttention, chunked_linear_attention, feature_map
from cs336_basics.sliding_window import SlidingWindowCache

D_MODEL, HEADS, SEQ = 32, 4, 11
D_HEAD = D_MODEL // HEADS
# Our path takes its softmax in float32 (nn_utils.softmax) even for float64 inputs; SDPA stays in float64.
TOL = {False: {"rtol": 1e-5, "atol": 1e-6}, True: {"rtol": 1e-10, "atol": 1e-10}}
VARIANTS = {  # constructor keyword arguments of MultiHeadSelfAttention
    "mha": {},
    "gqa": {"num_kv_heads": 2},
    "mqa": {"num_kv_heads": 1},
    "alibi": {"alibi": True},
    "sliding": {"sliding_window": 3},
    "gqa-sliding-rope": {"num_kv_heads": 2, "sliding_window": 4, "rope": True},
    "mqa-alibi-sliding": {"num_kv_heads": 1, "alibi": True, "sliding_window": 5},
}


def _attention(variant: dict, use_torch_sdpa=False, dtype=torch.float64, seed=0) -> MultiHeadSelfAttention:
    kwargs = dict(variant)
    rope = RotaryPositionalEmbedding(10_000.0, D_HEAD, 64) if kwargs.pop("rope", False) else None
    torch.manual_seed(seed)
    return MultiHeadSelfAttention(D_MODEL, HEADS, rope, use_torch_sdpa, dtype=dtype, **kwargs)


def _brute_force(attn: MultiHeadSelfAttention, x: torch.Tensor, slopes=None, window=None) -> torch.Tensor:
    """Loops over heads, queries and keys: query head h reads KV head h // (H / Hkv); key j is visible to
    query i when j ≤ i (and i − j < W); ALiBi adds −m_h·(i − j)."""
    batch, seq, _ = x.shape
    kv_heads = attn.num_kv_heads
    q = (x @ attn.q_proj.weight.T).view(batch, seq, HEADS, D_HEAD)
    k = (x @ attn.k_proj.weight.T).view(batch, seq, kv_heads, D_HEAD)
    v = (x @ attn.v_proj.weight.T).view(batch, seq, kv_heads, D_HEAD)
    if attn.rope is not None:
        q = attn.rope(q.transpose(1, 2)).transpose(1, 2)
        k = attn.rope(k.transpose(1, 2)).transpose(1, 2)
    out = torch.zeros(batch, seq, HEADS, D_HEAD, dtype=x.dtype)
    for b in range(batch):
        for h in range(HEADS):
            g = h // (HEADS // kv_heads)
            for i in range(seq):
                visible = [j for j in range(i + 1) if window is None or i - j < window]
                scores = torch.stack([q[b, i, h] @ k[b, j, g] / math.sqrt(D_HEAD) for j in visible])
                if slopes is not None:
                    scores = scores - slopes[h] * torch.tensor([float(i - j) for j in visible], dtype=x.dtype)
                weights = torch.softmax(scores, dim=0)
                out[b, i, h] = sum(w * v[b, j, g] for w, j in zip(weights, visible, strict=True))
    return out.reshape(batch, seq, D_MODEL) @ attn.output_proj.weight.T


def _paper_slopes(n: int) -> list[float]:
    """Press et al.: 2^(−8/n)·k for k = 1..n if n is a power of two; otherwise the power-of-two 2^a < n
    heads' slopes, then every other slope of 2^(a+1) heads, starting with the first."""
    if n & (n - 1) == 0:
        return [2 ** (-8 * k / n) for k in range(1, n + 1)]
    a = 2 ** int(math.log2(n))
    return [2 ** (-8 * k / a) for k in range(1, a + 1)] + [2 ** (-8 * k / (2 * a)) for k in range(1, 2 * a, 2)][: n - a]


@pytest.mark.parametrize("use_torch_sdpa", [False, True])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_equals_brute_force_per_head_softmax(name, use_torch_sdpa):
    variant = VARIANTS[name]
    attn = _attention(variant, use_torch_sdpa)
    x = torch.randn(2, SEQ, D_MODEL, dtype=torch.float64)
    slopes = _paper_slopes(HEADS) if variant.get("alibi") else None
    expected = _brute_force(attn, x, slopes, variant.get("sliding_window"))
    with torch.no_grad():
        torch.testing.assert_close(attn(x), expected, **TOL[use_torch_sdpa])


@pytest.mark.parametrize("kv_heads", [2, 1])
def test_grouped_query_attention_equals_mha_with_kv_heads_repeated(kv_heads):
    gqa = _attention({"num_kv_heads": kv_heads, "rope": True})
    mha = _attention({"rope": True})
    group = HEADS // kv_heads
    with torch.no_grad():
        mha.q_proj.weight.copy_(gqa.q_proj.weight)
        mha.output_proj.weight.copy_(gqa.output_proj.weight)
        for name in ("k_proj", "v_proj"):  # KV head g's rows, once for each of its query heads
            rows = getattr(gqa, name).weight.view(kv_heads, D_HEAD, D_MODEL)
            getattr(mha, name).weight.copy_(rows.repeat_interleave(group, dim=0).reshape(D_MODEL, D_MODEL))
        x = torch.randn(2, SEQ, D_MODEL, dtype=torch.float64)
        torch.testing.assert_close(gqa(x), mha(x), rtol=1e-12, atol=1e-12)
    assert gqa.k_proj.weight.shape == gqa.v_proj.weight.shape == (kv_heads * D_HEAD, D_MODEL)
    assert gqa.new_cache(2, 16).keys.shape == (2, kv_heads, 16, D_HEAD)  # the cache holds only the KV heads


@pytest.mark.parametrize("heads", [8, 16, 12, 6, 1])
def test_alibi_slopes_follow_the_paper(heads):
    torch.testing.assert_close(alibi_slopes(heads), torch.tensor(_paper_slopes(heads)), rtol=1e-7, atol=0)


def test_alibi_slopes_spelled_out():
    assert alibi_slopes(8).tolist() == [2.0**-k for k in range(1, 9)]  # the paper's 1/2, 1/4, ..., 1/256
    twelve = [2.0**-k for k in range(1, 9)] + [2.0**-k for k in (0.5, 1.5, 2.5, 3.5)]
    torch.testing.assert_close(alibi_slopes(12), torch.tensor(twelve))


def test_alibi_bias_is_minus_slope_times_distance():
    slopes = alibi_slopes(4)
    query_index, key_index = torch.arange(3, 6), torch.tensor([4, 0, 2, 5, 3])  # ring order, as in a cache
    bias = alibi_bias(slopes, query_index, key_index)
    for h in range(4):
        for a, i in enumerate(query_index.tolist()):
            for b, j in enumerate(key_index.tolist()):
                assert bias[h, a, b].item() == pytest.approx(-slopes[h].item() * (i - j))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_torch_sdpa_path_equals_ours(name):
    ours, sdpa = _attention(VARIANTS[name]), _attention(VARIANTS[name], use_torch_sdpa=True)
    x = torch.randn(3, SEQ, D_MODEL, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(sdpa(x), ours(x), **TOL[False])
        # decoding: left-padded prefill, then one token at a time through each module's own cache
        key_mask = torch.ones(3, SEQ, dtype=torch.bool)
        key_mask[0, :4] = key_mask[2, :1] = False
        outputs = []
        for attn in (ours, sdpa):
            cache = attn.new_cache(3, SEQ, dtype=torch.float64)
            steps = [attn(x[:, :6], kv_cache=cache, key_mask=key_mask[:, :6])]
            steps += [attn(x[:, t : t + 1], kv_cache=cache, key_mask=key_mask[:, : t + 1]) for t in range(6, SEQ)]
            outputs.append(torch.cat(steps, dim=1))
        torch.testing.assert_close(outputs[1], outputs[0], **TOL[False])


@pytest.mark.parametrize("use_torch_sdpa", [False, True])
@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("prefill", [1, 7])
def test_cached_decoding_equals_one_pass(name, prefill, use_torch_sdpa):
    attn = _attention(VARIANTS[name], use_torch_sdpa)
    x = torch.randn(2, SEQ, D_MODEL, dtype=torch.float64)
    with torch.no_grad():
        cache = attn.new_cache(2, SEQ, dtype=torch.float64)
        steps = [attn(x[:, :prefill], kv_cache=cache)]
        steps += [attn(x[:, t : t + 1], kv_cache=cache) for t in range(prefill, SEQ)]
        torch.testing.assert_close(torch.cat(steps, dim=1), attn(x), **TOL[use_torch_sdpa])
    window = VARIANTS[name].get("sliding_window")
    assert isinstance(cache, SlidingWindowCache if window else KVCache)
    assert cache.keys.shape[-2] == (window or SEQ)  # a ring of W slots, not the whole context


def test_ring_remembers_each_slots_absolute_index():
    cache = SlidingWindowCache(1, 1, 3, 100, 2)
    k = torch.arange(8.0).view(1, 1, 4, 2)
    keys, _, index = cache.append(k, k)
    assert index.tolist() == [0, 1, 2, 3] and torch.equal(keys, k)
    assert cache.slot_index.tolist() == [3, 1, 2]  # tokens 1..3 kept, token 3 in slot 3 mod 3
    _, _, index = cache.append(k[..., :1, :] + 100, k[..., :1, :])
    assert index.tolist() == [3, 1, 2, 4] and cache.slot_index.tolist() == [3, 4, 2]
    assert cache.length == 5 and cache.bytes_per_token == 2 * 1 * 2 * 4


def _quadratic_linear_attention(phi_q, phi_k, v):
    """The definition: out_i = Σ_{j≤i} (φq_i·φk_j) v_j / (Σ_{j≤i} φq_i·φk_j + ε)."""
    weights = (phi_q @ phi_k.transpose(-1, -2)).tril()
    return weights @ v / (weights.sum(-1, keepdim=True) + EPS)


@pytest.mark.parametrize("chunk_size", [1, 4, 5, 7, 13, 32])
def test_chunked_linear_attention_equals_quadratic_form(chunk_size):
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 3, 13, 8, dtype=torch.float64).unbind(0)
    phi_q, phi_k = feature_map(q), feature_map(k)
    zeros_s, zeros_z = torch.zeros(2, 3, 8, 8, dtype=torch.float64), torch.zeros(2, 3, 8, dtype=torch.float64)
    out, state, normaliser = chunked_linear_attention(phi_q, phi_k, v, chunk_size, zeros_s, zeros_z)
    torch.testing.assert_close(out, _quadratic_linear_attention(phi_q, phi_k, v), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state, phi_k.transpose(-1, -2) @ v, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(normaliser, phi_k.sum(-2), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk_size", [3, 16])
def test_linear_attention_module_decodes_through_its_state_and_ignores_padding(chunk_size):
    torch.manual_seed(0)
    attn = CausalLinearAttention(D_MODEL, HEADS, chunk_size, dtype=torch.float64)
    x = torch.randn(2, SEQ, D_MODEL, dtype=torch.float64)
    with torch.no_grad():
        q, k, v = (t.view(2, SEQ, HEADS, D_HEAD).transpose(1, 2) for t in (
            x @ attn.q_proj.weight.T, x @ attn.k_proj.weight.T, x @ attn.v_proj.weight.T))
        quadratic = _quadratic_linear_attention(feature_map(q), feature_map(k), v)
        expected = quadratic.transpose(1, 2).reshape(2, SEQ, D_MODEL) @ attn.output_proj.weight.T
        torch.testing.assert_close(attn(x), expected, rtol=1e-10, atol=1e-10)
        cache = attn.new_cache(2, SEQ, dtype=torch.float64)
        steps = [attn(x[:, :5], kv_cache=cache)] + [attn(x[:, t : t + 1], kv_cache=cache) for t in range(5, SEQ)]
        torch.testing.assert_close(torch.cat(steps, dim=1), expected, rtol=1e-10, atol=1e-10)
        assert cache.bytes_per_token == 0 and cache.length == SEQ and cache.state.shape == (2, HEADS, D_HEAD, D_HEAD)
        assert attn.new_cache(2, SEQ, dtype=torch.bfloat16).state.dtype == torch.float32  # sums stay float32
        # three pad tokens of garbage on the left change nothing for the real ones
        padded = torch.cat((torch.randn(2, 3, D_MODEL, dtype=torch.float64), x), dim=1)
        key_mask = torch.ones(2, SEQ + 3, dtype=torch.bool)
        key_mask[:, :3] = False
        torch.testing.assert_close(attn(padded, key_mask=key_mask)[:, 3:], expected, rtol=1e-10, atol=1e-10)
