"""Hugging Face interop, DeepSeek family: parity with DeepseekV3ForCausalLM for multi-head latent attention
(q_lora_rank 0 and > 0) with DeepSeek-V3 MoE layers (first_k_dense_replace >= 1, shared experts, sigmoid
routing with a non-zero e_score_correction_bias) in logits and every parameter gradient."""

import json

import pytest
import torch
from safetensors import safe_open

from cs336_basics.cli_support import UserError
from cs336_basics.hf import architecture_for, export_hf, from_hf
from cs336_basics.hf.parity import compare
from tests.test_hf_llama import GRAD_TOL, LOGIT_TOL, batch, load_hf, seeded_model, tiny, tokenizer_dir  # noqa: F401

transformers = pytest.importorskip("transformers")

MLA = dict(attention="mla", kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6)
MOE = dict(ffn="moe", num_experts=4, moe_top_k=2, num_shared_experts=1, moe_d_ff=24, moe_router="sigmoid",
           moe_routed_scale=2.5, moe_norm_topk=True, moe_dense_layers=1)


@pytest.mark.parametrize("q_lora_rank", [0, 12], ids=["q_direct", "q_lora"])
def test_deepseek_parity_logits_and_gradients(tmp_path, tokenizer_dir, q_lora_rank):  # noqa: F811
    config = tiny(num_layers=3, **MLA, **MOE, q_lora_rank=q_lora_rank)
    ours = seeded_model(config, seed=7)
    assert all(moe.expert_bias.abs().min() > 0 for moe in ours.moe_layers())
    summary = export_hf((ours, config), tokenizer_dir, tmp_path / "hf")
    assert summary["architecture"] == "deepseek_v3"

    with safe_open(tmp_path / "hf" / "model.safetensors", "pt") as f:  # DeepSeek's hub layout, one tensor/expert
        keys = set(f.keys())
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in keys and "model.layers.0.mlp.gate_proj.weight" in keys
    assert "model.layers.2.mlp.gate.e_score_correction_bias" in keys
    assert ("model.layers.0.self_attn.q_a_proj.weight" in keys) == (q_lora_rank > 0)

    hf_model = load_hf(tmp_path / "hf")
    assert type(hf_model).__name__ == "DeepseekV3ForCausalLM"
    assert hf_model.config.first_k_dense_replace == 1 and hf_model.config.q_lora_rank == (q_lora_rank or None)
    hf_bias = hf_model.model.layers[2].mlp.gate.e_score_correction_bias
    assert torch.equal(hf_bias, ours.layers[2].ffn.expert_bias)
    ids, targets = batch()
    result = compare(ours, hf_model, ids, targets)
    assert result.holds(LOGIT_TOL, GRAD_TOL), result

    # A single perturbed weight (one expert's down projection) breaks the check.
    expected = {name: tensor.clone() for name, tensor in ours.state_dict().items()}
    with torch.no_grad():
        ours.layers[1].ffn.experts_w2[:, 0, 0] += 0.5
    assert not compare(ours, hf_model, ids, targets).holds(LOGIT_TOL, GRAD_TOL)

    back, back_config = from_hf(tmp_path / "hf")
    assert back_config == config
    assert back.state_dict().keys() == expected.keys()
    assert all(torch.equal(back.state_dict()[k], v) for k, v in expected.items())

    # What transformers itself saves (whatever its expert layout) reads back to the same weights.
    hf_model.save_pretrained(tmp_path / "resaved")
    resaved, _ = from_hf(tmp_path / "resaved")
    assert all(torch.equal(resaved.state_dict()[k], v) for k, v in expected.items())


def test_routing_bias_matters(tmp_path, tokenizer_dir):  # noqa: F811
    """Zeroing the exported e_score_correction_bias changes HF's expert choice: the bias is really mapped."""
    config = tiny(num_layers=2, **MLA, **(MOE | {"moe_dense_layers": 0}))
    ours = seeded_model(config, seed=8)
    for moe in ours.moe_layers():
        moe.expert_bias.mul_(20)  # large enough to overrule the scores' order
    export_hf((ours, config), tokenizer_dir, tmp_path / "hf")
    hf_model = load_hf(tmp_path / "hf")
    ids, targets = batch()
    assert compare(ours, hf_model, ids, targets).holds(LOGIT_TOL, GRAD_TOL)
    for layer in hf_model.model.layers:
        layer.mlp.gate.e_score_correction_bias.zero_()
    assert not compare(ours, hf_model, ids, targets).holds(LOGIT_TOL, GRAD_TOL)


def test_dense_mla_and_unnormalised_moe_without_shared_experts(tmp_path, tokenizer_dir):  # noqa: F811
    for name, fields in [("dense", {}), ("moe", MOE | {"num_shared_experts": 0, "moe_norm_topk": False})]:
        config = tiny(num_layers=2, **MLA, **fields)
        ours = seeded_model(config, seed=9)
        export_hf((ours, config), tokenizer_dir, tmp_path / name)
        saved = json.loads((tmp_path / name / "config.json").read_text())
        assert saved["first_k_dense_replace"] == (2 if name == "dense" else 1)
        result = compare(ours, load_hf(tmp_path / name), *batch())
        assert result.holds(LOGIT_TOL, GRAD_TOL), (name, result)
        assert from_hf(tmp_path / name)[1] == config


def test_softmax_routing_is_refused():
    with pytest.raises(UserError, match="sigmoid"):
        architecture_for(tiny(**MLA, **(MOE | {"moe_router": "softmax"})))
