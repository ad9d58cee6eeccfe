"""Multi-head latent attention: absorbed decoding vs the expanded form, the latent cache's size, padded batches,
and parity with HF's DeepseekV3Attention."""

import pytest
import torch

from cs336_basics.mla import MultiHeadLatentAttention
from cs336_basics.model import TransformerConfig, TransformerLM

DIMS = dict(kv_lora_rank=12, qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=5)


def make_config(**overrides) -> TransformerConfig:
    fields = dict(vocab_size=50, context_length=32, d_model=24, num_layers=2, num_heads=3, d_ff=32,
                  attention="mla", **DIMS)
    return TransformerConfig(**{**fields, **overrides})


def make_mla(dtype=torch.float64, seed=0, **overrides) -> MultiHeadLatentAttention:
    torch.manual_seed(seed)
    mla = MultiHeadLatentAttention(make_config(**overrides), dtype=dtype)
    with torch.no_grad():
        for name, p in mla.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)  # non-trivial gains, so a swapped or skipped norm shows
    return mla


@pytest.mark.parametrize("q_lora_rank", [0, 10])
def test_absorbed_decoding_equals_expanded_form_float64(q_lora_rank, monkeypatch):
    # torch SDPA keeps float64 (our reference softmax computes in float32), so both forms are exact here.
    mla = make_mla(q_lora_rank=q_lora_rank, use_torch_sdpa=True)
    x = torch.randn(2, 11, 24, dtype=torch.float64)
    full = mla(x)
    cache = mla.new_cache(2, 16, dtype=torch.float64)
    outputs = [mla(x[:, :4], kv_cache=cache)]  # prefill: expanded form
    monkeypatch.setattr(mla, "expanded_attention", None)  # from here on only the absorbed form can run
    outputs.append(mla(x[:, 4:7], kv_cache=cache))  # a chunk of three queries against the cache
    outputs += [mla(x[:, t : t + 1], kv_cache=cache) for t in range(7, 11)]
    torch.testing.assert_close(torch.cat(outputs, dim=1), full, rtol=1e-12, atol=1e-12)
    assert cache.length == 11


def test_our_attention_equals_torch_sdpa():
    ours, theirs = make_mla(torch.float32), make_mla(torch.float32, use_torch_sdpa=True)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 9, 24)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-6)


def test_cache_holds_only_latent_and_rope_key():
    config = make_config(q_lora_rank=8)
    model = TransformerLM(config, dtype=torch.float64)
    batch, max_len = 3, 20
    caches = model.new_kv_caches(batch, max_len)
    per_token = config.kv_lora_rank + config.qk_rope_head_dim
    for cache in caches:
        tensors = [v for v in vars(cache).values() if isinstance(v, torch.Tensor)]
        assert sum(t.numel() for t in tensors) == batch * max_len * per_token
        assert cache.bytes_per_token == per_token * 8
    assert caches.bytes_per_token == config.num_layers * per_token * 8
    ids = torch.randint(0, 50, (batch, 5))
    model(ids, kv_caches=caches)
    assert caches.length == 5


def test_left_padded_batch_decodes_like_each_sequence_alone():
    config = make_config(q_lora_rank=8)
    torch.manual_seed(0)
    model = TransformerLM(config, dtype=torch.float64)
    long, short = torch.randint(0, 50, (9,)), torch.randint(0, 50, (6,))
    pad = 3  # short is left-padded by 3 for a 6-token prompt batch: prompts are long[:6], short[:3]
    tokens = torch.stack((long[:6], torch.cat((torch.zeros(pad, dtype=torch.long), short[:3]))))
    positions = (torch.arange(6) - torch.tensor([[0], [pad]])).clamp_min(0)
    key_mask = torch.ones(2, 9, dtype=torch.bool)
    key_mask[1, :pad] = False
    caches = model.new_kv_caches(2, 9)
    steps = [model(tokens, positions, caches, key_mask[:, :6])[:, -1]]
    for t in range(3):
        step_tokens = torch.stack((long[6 + t], short[3 + t]))[:, None]
        steps.append(model(step_tokens, positions[:, -1:] + t + 1, caches, key_mask[:, : 7 + t])[:, -1])
    batched = torch.stack(steps, dim=1)
    torch.testing.assert_close(batched[0], model(long[None])[0, 5:9], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(batched[1], model(short[None])[0, 2:6], rtol=1e-6, atol=1e-6)


def hf_attention(mla: MultiHeadLatentAttention, q_lora_rank: int, rope_interleave: bool = True):
    from transformers.models.deepseek_v3.configuration_deepseek_v3 import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, DeepseekV3RotaryEmbedding

    config = DeepseekV3Config(
        hidden_size=24, num_attention_heads=3, num_key_value_heads=3, q_lora_rank=q_lora_rank or None,
        rope_interleave=rope_interleave, rope_parameters={"rope_type": "default", "rope_theta": 10_000.0},
        max_position_embeddings=32, attention_bias=False, attn_implementation="eager", **DIMS,
    )
    attn = DeepseekV3Attention(config, layer_idx=0).float()
    names = {"kv_a_proj_with_mqa": mla.kv_down, "kv_a_layernorm": mla.kv_norm, "kv_b_proj": mla.kv_up,
             "o_proj": mla.output_proj}
    if q_lora_rank:
        names.update(q_a_proj=mla.q_down, q_a_layernorm=mla.q_norm, q_b_proj=mla.q_up)
    else:
        names.update(q_proj=mla.q_proj)
    with torch.no_grad():
        for hf_name, ours in names.items():
            getattr(attn, hf_name).weight.copy_(ours.weight)
    return attn, DeepseekV3RotaryEmbedding(config)


def run_hf(attn, rotary, x: torch.Tensor) -> torch.Tensor:
    """As DeepseekV3Model calls its layers: cos/sin from the model's rotary module, an additive causal mask."""
    seq = x.shape[1]
    position_ids = torch.arange(seq)[None].expand(x.shape[0], -1)
    mask = torch.full((seq, seq), float("-inf")).triu(1)[None, None].expand(x.shape[0], 1, -1, -1)
    return attn(x, position_embeddings=rotary(x, position_ids), attention_mask=mask)[0]


@pytest.mark.parametrize("q_lora_rank", [0, 10])
def test_matches_hf_deepseek_v3_attention(q_lora_rank):
    # rmsnorm_eps differs from HF's 1e-6 on purpose: HF (like DeepSeek's code) fixes the latent norms' eps.
    mla = make_mla(torch.float32, q_lora_rank=q_lora_rank, rmsnorm_eps=1e-5)
    attn, rotary = hf_attention(mla, q_lora_rank)
    x = torch.randn(2, 13, 24)
    with torch.no_grad():
        ours = mla(x)
        torch.testing.assert_close(ours, run_hf(attn, rotary, x), rtol=1e-5, atol=1e-5)
        attn.kv_b_proj.weight[0, 0] += 0.05  # the check can fail: one perturbed weight shows
        assert not torch.allclose(ours, run_hf(attn, rotary, x), rtol=1e-5, atol=1e-5)


def test_interleaved_rope_is_hf_rope_interleave_not_rotate_half():
    """Our RoPE rotates adjacent pairs (x[2i], x[2i+1]); HF's rope_interleave=True rotates the same pairs (its
    output lists the rotated evens then the odds, a permutation applied to q and k alike, so scores agree);
    HF's rope_interleave=False rotates halves and does not match without permuting the weights."""
    mla = make_mla(torch.float32)
    x = torch.randn(1, 8, 24)
    with torch.no_grad():
        ours = mla(x)
        halves = run_hf(*hf_attention(mla, 0, rope_interleave=False), x)
    assert not torch.allclose(ours, halves, rtol=1e-3, atol=1e-3)
