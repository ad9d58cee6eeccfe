"""The whole LM against Hugging Face's LlamaForCausalLM (an independent implementation of the same network)."""

import pytest
import torch

from cs336_basics.model import TransformerConfig, TransformerLM

transformers = pytest.importorskip("transformers")

CONFIG = TransformerConfig(vocab_size=97, context_length=32, d_model=48, num_layers=3, num_heads=4, d_ff=128,
                           rope_theta=10_000.0)


def _interleaved_to_half_split(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Reorders each head's rows from RoPE pairs (2i, 2i+1) to Llama's (i, i + d/2) layout."""
    d_head = weight.shape[0] // num_heads
    order = torch.cat([torch.arange(0, d_head, 2), torch.arange(1, d_head, 2)])
    return weight.view(num_heads, d_head, -1)[:, order].reshape_as(weight)


def _llama_from(model: TransformerLM) -> torch.nn.Module:
    c = model.config
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.d_ff, num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads, num_key_value_heads=c.num_heads, max_position_embeddings=c.context_length,
        rms_norm_eps=c.rmsnorm_eps, rope_theta=c.rope_theta, tie_word_embeddings=False, attention_bias=False,
        mlp_bias=False, attn_implementation="eager"))
    ours = model.state_dict()
    state = {"model.embed_tokens.weight": ours["token_embeddings.weight"], "model.norm.weight": ours["ln_final.weight"],
             "lm_head.weight": ours["lm_head.weight"]}
    for i in range(c.num_layers):
        p, q = f"layers.{i}.", f"model.layers.{i}."
        state |= {
            q + "self_attn.q_proj.weight": _interleaved_to_half_split(ours[p + "attn.q_proj.weight"], c.num_heads),
            q + "self_attn.k_proj.weight": _interleaved_to_half_split(ours[p + "attn.k_proj.weight"], c.num_heads),
            q + "self_attn.v_proj.weight": ours[p + "attn.v_proj.weight"],
            q + "self_attn.o_proj.weight": ours[p + "attn.output_proj.weight"],
            q + "mlp.gate_proj.weight": ours[p + "ffn.w1.weight"],
            q + "mlp.up_proj.weight": ours[p + "ffn.w3.weight"],
            q + "mlp.down_proj.weight": ours[p + "ffn.w2.weight"],
            q + "input_layernorm.weight": ours[p + "ln1.weight"],
            q + "post_attention_layernorm.weight": ours[p + "ln2.weight"],
        }
    llama.load_state_dict(state, strict=False)  # strict=False: Llama keeps a rotary buffer we don't
    return llama.eval()


def _perturbed_model(config: TransformerConfig = CONFIG) -> TransformerLM:
    torch.manual_seed(0)
    model = TransformerLM(config)
    with torch.no_grad():  # make the norm gains non-trivial so a skipped gain would show
        for name, p in model.named_parameters():
            if name.endswith(("ln1.weight", "ln2.weight", "ln_final.weight")):
                p.uniform_(0.5, 1.5)
    return model.eval()


def test_state_dict_keys_follow_the_course_layout():
    keys = set(_perturbed_model().state_dict())
    expected = {"token_embeddings.weight", "ln_final.weight", "lm_head.weight"}
    for i in range(CONFIG.num_layers):
        expected |= {f"layers.{i}.{k}" for k in (
            "attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight", "attn.output_proj.weight",
            "ln1.weight", "ln2.weight", "ffn.w1.weight", "ffn.w2.weight", "ffn.w3.weight")}
    assert keys == expected


@pytest.mark.parametrize("seq_len", [1, 17, 32])
def test_logits_match_llama(seq_len):
    model = _perturbed_model()
    llama = _llama_from(model)
    ids = torch.randint(0, CONFIG.vocab_size, (2, seq_len))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), llama(ids).logits, rtol=1e-4, atol=1e-4)


def test_gradients_match_llama():
    model = _perturbed_model()
    llama = _llama_from(model)
    ids = torch.randint(0, CONFIG.vocab_size, (2, 16))
    model(ids).logsumexp(-1).sum().backward()
    llama(ids).logits.logsumexp(-1).sum().backward()
    torch.testing.assert_close(model.token_embeddings.weight.grad, llama.model.embed_tokens.weight.grad,
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.layers[1].ffn.w2.weight.grad, llama.model.layers[1].mlp.down_proj.weight.grad,
                               rtol=1e-4, atol=1e-5)


def test_torch_sdpa_flag_computes_the_same_function():
    model = _perturbed_model()
    fast = TransformerLM(TransformerConfig(**{**CONFIG.to_dict(), "use_torch_sdpa": True}))
    fast.load_state_dict(model.state_dict())
    ids = torch.randint(0, CONFIG.vocab_size, (3, 20))
    with torch.no_grad():
        torch.testing.assert_close(fast(ids), model(ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_torch_sdpa", [False, True])
def test_kv_cache_decoding_equals_full_recomputation(use_torch_sdpa):
    model = _perturbed_model(TransformerConfig(**{**CONFIG.to_dict(), "use_torch_sdpa": use_torch_sdpa}))
    ids = torch.randint(0, CONFIG.vocab_size, (2, 12))
    caches = model.new_kv_caches(batch_size=2)
    with torch.no_grad():
        full = model(ids)
        prefix = model(ids[:, :5], kv_caches=caches)
        steps = [model(ids[:, t : t + 1], kv_caches=caches) for t in range(5, 12)]
    torch.testing.assert_close(torch.cat([prefix, *steps], dim=1), full, rtol=1e-5, atol=1e-5)


def test_too_long_input_is_rejected():
    model = _perturbed_model()
    with pytest.raises(ValueError, match="context_length"):
        model(torch.zeros(1, CONFIG.context_length + 1, dtype=torch.long))


@pytest.mark.parametrize(
    ("change", "check"),
    [
        ({"norm": "none"}, lambda m: not hasattr(m.layers[0], "ln1") and isinstance(m.ln_final, torch.nn.Identity)),
        ({"norm": "post"}, lambda m: m.layers[0].norm == "post" and hasattr(m.layers[0], "ln2")),
        ({"position": "none"}, lambda m: m.layers[0].attn.rope is None),
        ({"ffn": "silu", "d_ff": 4 * 48}, lambda m: not hasattr(m.layers[0].ffn, "w3")),
    ],
)
def test_ablation_switches_change_the_network(change, check):
    baseline = _perturbed_model()
    ablated = TransformerLM(TransformerConfig(**{**CONFIG.to_dict(), **change}))
    assert check(ablated)
    ids = torch.randint(0, CONFIG.vocab_size, (1, 10))
    shared = {k: v for k, v in baseline.state_dict().items() if k in ablated.state_dict()
              and v.shape == ablated.state_dict()[k].shape}
    ablated.load_state_dict(shared, strict=False)
    with torch.no_grad():
        assert not torch.allclose(ablated(ids), baseline(ids), atol=1e-3)


def test_post_norm_block_normalises_the_residual_stream():
    model = TransformerLM(TransformerConfig(**{**CONFIG.to_dict(), "norm": "post"})).eval()
    block = model.layers[0]
    x = torch.randn(2, 6, CONFIG.d_model) * 10
    out = block(x)
    # With unit gains, post-norm output rows have unit RMS; pre-norm outputs would not.
    torch.testing.assert_close(out.pow(2).mean(-1), torch.ones(2, 6), rtol=1e-4, atol=1e-4)


def test_silu_ffn_with_4x_width_matches_swiglu_parameter_count():
    swiglu = TransformerLM(TransformerConfig(**{**CONFIG.to_dict(), "d_ff": 128}))
    silu = TransformerLM(TransformerConfig(**{**CONFIG.to_dict(), "ffn": "silu", "d_ff": 192}))
    assert silu.num_parameters() == swiglu.num_parameters()  # 2·48·192 == 3·48·128
