"""Hugging Face interop, sliding windows: parity with MistralForCausalLM (eager and sdpa attention) in logits
and every parameter gradient, with a window shorter than the sequence, so the window shapes the output."""

import json

import pytest
import torch

from cs336_basics.hf import export_hf, from_hf
from cs336_basics.hf.parity import compare
from tests.test_hf_llama import GRAD_TOL, LOGIT_TOL, batch, load_hf, seeded_model, tiny, tokenizer_dir  # noqa: F401

transformers = pytest.importorskip("transformers")
WINDOW, SEQ = 5, 24


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer_dir):  # noqa: F811
    config = tiny(num_kv_heads=2, sliding_window=WINDOW)
    ours = seeded_model(config, seed=5)
    folder = tmp_path_factory.mktemp("mistral") / "hf"
    summary = export_hf((ours, config), tokenizer_dir, folder)
    assert summary["architecture"] == "mistral"
    return ours, config, folder


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_mistral_parity_logits_and_gradients(exported, attn):
    ours, _, folder = exported
    hf_model = load_hf(folder, attn)
    assert type(hf_model).__name__ == "MistralForCausalLM" and hf_model.config.sliding_window == WINDOW
    ids, targets = batch(length=SEQ)
    result = compare(ours, hf_model, ids, targets)
    assert result.holds(LOGIT_TOL, GRAD_TOL), result

    # The window is honoured by this attention implementation: the same weights without it differ.
    full = load_hf(folder, attn)
    full.config.sliding_window = None
    with torch.no_grad():
        windowed, unwindowed = hf_model(ids).logits, full(ids).logits
    assert torch.allclose(windowed[:, :WINDOW], unwindowed[:, :WINDOW], atol=LOGIT_TOL)  # nothing cut off yet
    assert (windowed[:, WINDOW:] - unwindowed[:, WINDOW:]).abs().max() > 100 * LOGIT_TOL

    # A single perturbed weight breaks the check.
    perturbed = seeded_model(ours.config, seed=5)
    with torch.no_grad():
        perturbed.layers[0].attn.v_proj.weight[0, 0] += 0.5
    assert not compare(perturbed, hf_model, ids, targets).holds(LOGIT_TOL, GRAD_TOL)


def test_window_off_by_one_is_detected(exported):
    """HF's window W keeps keys j with i − W < j ≤ i (W keys, itself included), as ours; W ± 1 differs."""
    ours, _, folder = exported
    ids, targets = batch(length=SEQ)
    for other in (WINDOW - 1, WINDOW + 1):
        hf_model = load_hf(folder)
        hf_model.config.sliding_window = other
        assert not compare(ours, hf_model, ids, targets).holds(LOGIT_TOL, GRAD_TOL)


def test_mistral_config_and_import(exported):
    ours, config, folder = exported
    saved = json.loads((folder / "config.json").read_text())
    assert saved["model_type"] == "mistral" and saved["sliding_window"] == WINDOW
    assert saved["num_key_value_heads"] == 2 and saved["head_dim"] == config.d_head
    back, back_config = from_hf(folder)
    assert back_config == config
    assert all(torch.equal(back.state_dict()[k], v) for k, v in ours.state_dict().items())
