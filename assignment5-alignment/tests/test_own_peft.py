"""LoRA and QLoRA (`cs336_alignment.peft`) against independent references: Hugging Face `peft` configured the
same way with the same adapter weights (outputs and adapter gradients), a plain model carrying the merged
weights W + (α/r) B A, the published NF4 constants, and a float64 brute-force quantiser."""

import copy

import pytest
import torch
from torch import nn

from cs336_alignment.lm import BasicsCausalLM
from cs336_alignment.peft import (
    LoRAConfig,
    LoRALinear,
    NF4Linear,
    dequantize_nf4,
    inject_lora,
    load_adapters,
    lora_disabled,
    lora_layers,
    lora_state_dict,
    matches,
    merge_lora,
    nf4_code_book,
    quantize_nf4,
    save_adapters,
    unload_lora,
    unmerge_lora,
)
from cs336_alignment.peft.nf4 import dequantize_scales, nf4_max_half_gap
from cs336_alignment.testing import tiny_basics_lm
from cs336_basics.cli_support import UserError
from cs336_basics.testing import one_thread  # noqa: F401 (autouse: one torch thread)

VOCAB = 64


def tiny_hf_llama(seed: int = 0, bias: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attention_bias=bias,
                         attn_implementation="eager")
    return LlamaForCausalLM(config).double().eval()


def randomise_adapters(model: nn.Module, seed: int = 1) -> None:
    """Non-zero B (a fresh adapter's B is 0, which would hide any mistake in B A)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=generator, dtype=torch.float64) * 0.3)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator, dtype=torch.float64) * 0.3)


# ---- LoRA against peft ---------------------------------------------------------------------------------

def test_outputs_and_adapter_gradients_equal_peft():
    from peft import LoraConfig, get_peft_model

    base = tiny_hf_llama()
    ours = copy.deepcopy(base)
    targets = ("q_proj", "v_proj", "o_proj", "down_proj")
    wrapped = inject_lora(ours, LoRAConfig(rank=4, alpha=12, targets=targets))
    randomise_adapters(ours)
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=12, lora_dropout=0.0,
                                                             target_modules=list(targets)))
    their_params = dict(theirs.named_parameters())
    with torch.no_grad():
        for name, layer in lora_layers(ours):
            for key in ("lora_A", "lora_B"):
                their_params[f"base_model.model.{name}.{key}.default.weight"].copy_(getattr(layer, key))
    assert len(wrapped) == 8
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert len(trainable) == 16 and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    assert sum(p.numel() for p in ours.parameters() if p.requires_grad) == \
        sum(p.numel() for p in theirs.parameters() if p.requires_grad)

    ids = torch.randint(0, VOCAB, (3, 11), generator=torch.Generator().manual_seed(0))
    ours_out, theirs_out = ours(ids, labels=ids), theirs(input_ids=ids, labels=ids)
    torch.testing.assert_close(ours_out.logits, theirs_out.logits, rtol=0, atol=1e-12)
    ours_out.loss.backward()
    theirs_out.loss.backward()
    for name, layer in lora_layers(ours):
        for key in ("lora_A", "lora_B"):
            theirs_grad = their_params[f"base_model.model.{name}.{key}.default.weight"].grad
            assert getattr(layer, key).grad.abs().max() > 0
            torch.testing.assert_close(getattr(layer, key).grad, theirs_grad, rtol=1e-9, atol=1e-12)
    assert all(p.grad is None for n, p in ours.named_parameters() if n not in trainable)


def test_fresh_adapters_leave_the_model_unchanged_and_disabling_restores_it():
    base = tiny_hf_llama(seed=3)
    model = copy.deepcopy(base)
    inject_lora(model, LoRAConfig(rank=2, targets=("*_proj",)))
    ids = torch.randint(0, VOCAB, (2, 9))
    torch.testing.assert_close(model(ids).logits, base(ids).logits, rtol=0, atol=0)  # B starts at 0
    randomise_adapters(model)
    assert (model(ids).logits - base(ids).logits).abs().max() > 1e-3
    with lora_disabled(model):
        torch.testing.assert_close(model(ids).logits, base(ids).logits, rtol=0, atol=0)
    assert (model(ids).logits - base(ids).logits).abs().max() > 1e-3


def test_merged_equals_unmerged_and_unmerge_restores_the_weights():
    model = tiny_hf_llama(seed=4)
    inject_lora(model, LoRAConfig(rank=4, alpha=8, targets=("q_proj", "k_proj", "gate_proj", "up_proj")))
    randomise_adapters(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, VOCAB, (2, 9))
    unmerged = model(ids).logits
    merge_lora(model)
    merged = model(ids).logits
    torch.testing.assert_close(merged, unmerged, rtol=1e-10, atol=1e-10)
    layer = model.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(layer.base.weight, before["model.layers.0.self_attn.q_proj.base.weight"]
                               + 2.0 * before["model.layers.0.self_attn.q_proj.lora_B"]
                               @ before["model.layers.0.self_attn.q_proj.lora_A"])
    unmerge_lora(model)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=1e-12)
    plain = unload_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in plain.modules())
    torch.testing.assert_close(plain(ids).logits, unmerged, rtol=1e-10, atol=1e-10)


def test_cs336_basics_model_gets_the_update_in_its_fused_projections():
    """Our attention concatenates q/k/v weights and SwiGLU w1/w3 into one GEMM; the wrapped model must equal a
    plain model carrying W + (α/r) B A in every targeted layer."""
    lm = tiny_basics_lm(VOCAB, seed=2).double()
    model = copy.deepcopy(lm)
    names = inject_lora(model, LoRAConfig(rank=3, alpha=6, targets=("q_proj", "v_proj", "output_proj", "w1", "w2")))
    assert len(names) == 10
    randomise_adapters(model)
    reference = copy.deepcopy(lm)
    with torch.no_grad():
        for name, layer in lora_layers(model):
            reference.get_submodule(name).weight += 2.0 * layer.lora_B @ layer.lora_A
    ids = torch.randint(0, VOCAB, (2, 12))
    torch.testing.assert_close(model(ids), reference(ids), rtol=1e-10, atol=1e-10)
    model(ids).square().mean().backward()
    for _, layer in lora_layers(model):
        assert layer.lora_A.grad is not None and layer.lora_A.grad.abs().max() > 0


def test_adapters_save_and_load_alone(tmp_path):
    model = BasicsCausalLM(tiny_basics_lm(VOCAB, seed=5))
    config = LoRAConfig(rank=2, targets=("layers.1.*",))
    inject_lora(model, config)
    randomise_adapters(model)
    save_adapters(model, tmp_path, config)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert set(saved) == set(lora_state_dict(model)) and all(k.split(".")[-1] in ("lora_A", "lora_B") for k in saved)
    fresh = BasicsCausalLM(tiny_basics_lm(VOCAB, seed=5))  # the same base weights, no adapters yet
    loaded = load_adapters(fresh, tmp_path)
    assert loaded.wrapped == config.wrapped and loaded.rank == 2
    ids = torch.randint(0, VOCAB, (2, 8))
    torch.testing.assert_close(fresh(ids).logits, model(ids).logits, rtol=0, atol=0)
    with pytest.raises(UserError, match="do not fit"):
        other = BasicsCausalLM(tiny_basics_lm(VOCAB, seed=5))
        inject_lora(other, LoRAConfig(rank=2, targets=("layers.0.*",)))
        load_adapters(other, tmp_path)


def test_name_patterns():
    assert matches("model.layers.0.self_attn.q_proj", "q_proj")
    assert matches("model.layers.0.self_attn.q_proj", "*_proj")
    assert not matches("model.layers.0.self_attn.q_proj", "proj")
    assert matches("layers.3.ffn.w1", "w[13]") and not matches("layers.3.ffn.w2", "w[13]")
    assert matches("layers.0.attn.q_proj", "layers.0.*") and not matches("layers.10.attn.q_proj", "layers.1.*x")
    assert matches("layers.1.attn.v_proj", r"re:layers\.[01]\.attn\.(q|v)_proj")
    assert not matches("layers.2.attn.v_proj", r"re:layers\.[01]\.attn\.(q|v)_proj")


@pytest.mark.parametrize("kwargs, message", [
    ({"rank": 0}, "--lora-rank must be a positive integer"),
    ({"rank": -2}, "--lora-rank must be a positive integer"),
    ({"alpha": 0.0}, "--lora-alpha must be > 0"),
    ({"targets": ("q_proj", "nonexistent")}, "--lora-targets ['nonexistent'] match no linear layer"),
    ({"targets": ("lm_head",), "qlora": True, "block_size": 256}, "not a multiple of the block size 256"),
])
def test_bad_settings_are_one_line_errors(kwargs, message):
    model = BasicsCausalLM(tiny_basics_lm(VOCAB + 1, seed=0))  # lm_head: 65 x 32 = 2080 weights
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(UserError) as info:
        inject_lora(model, LoRAConfig(**kwargs))
    assert message in str(info.value) and "\n" not in str(info.value)
    assert model.state_dict().keys() == before.keys()  # nothing was wrapped


# ---- NF4 -----------------------------------------------------------------------------------------------

# Appendix E of the QLoRA paper (and bitsandbytes' NF4 table).
PUBLISHED_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                 -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                 0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                 0.7229568362236023, 1.0]


def test_code_book_equals_the_published_nf4_values():
    book = nf4_code_book(torch.float64)
    # The published table was computed with δ rounded to 0.9677083; the exact δ moves values by < 2e-7.
    torch.testing.assert_close(book, torch.tensor(PUBLISHED_NF4, dtype=torch.float64), rtol=0, atol=2e-7)
    assert int((book < 0).sum()) == 7 and int((book > 0).sum()) == 8 and float(book[7]) == 0.0


def brute_force_codes(weight: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest code of each normalised value, by argmin over all 16 codes in float64."""
    blocks = weight.double().reshape(-1, block)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    normalised = blocks / torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    book = torch.tensor(PUBLISHED_NF4, dtype=torch.float64)
    return (normalised[..., None] - book).abs().argmin(dim=-1).flatten(), absmax.flatten()


def test_quantisation_codes_packing_and_error_bound():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 160, generator=generator) * 0.02
    weight[3, :64] = 0.0  # an all-zero block
    weight[10, 5] = 0.9  # an outlier dominating its block
    weight[40:, :] *= 30  # blocks with a different scale (spreads the absmax values the scales quantise)
    q = quantize_nf4(weight, block_size=64, scale_block_size=32)
    assert q.packed.dtype == torch.uint8 and q.packed.numel() == weight.numel() // 2
    assert q.scale_codes.dtype == torch.int8 and q.scale_scales.numel() == -(-weight.numel() // 64 // 32)
    codes = torch.stack((q.packed >> 4, q.packed & 15), dim=-1).flatten().long()
    expected, absmax = brute_force_codes(weight, 64)
    # Ties between two codes may go either way; everything else must be the nearest code.
    book = torch.tensor(PUBLISHED_NF4, dtype=torch.float64)
    normalised = (weight.double().reshape(-1, 64) / torch.where(absmax > 0, absmax, 1.0)[:, None]).flatten()
    distance = lambda c: (normalised - book[c]).abs()
    assert torch.all((codes == expected) | (distance(codes) - distance(expected) < 1e-6))

    # Second level: each block absmax within half an int8 step of its block of scales.
    blocks_of_scales = torch.arange(absmax.numel()) // 32
    centred = absmax - absmax.mean()
    s2 = torch.zeros(int(blocks_of_scales.max()) + 1, dtype=torch.float64).scatter_reduce(
        0, blocks_of_scales, centred.abs(), "amax")
    scale_error = (dequantize_scales(q).double() - absmax).abs()
    assert torch.all(scale_error <= s2[blocks_of_scales] / 254 + 1e-6)

    # The bound the construction implies: |w - ŵ| ≤ absmax · (largest gap / 2) + scale error bound.
    bound = absmax * nf4_max_half_gap() + s2[blocks_of_scales] / 254 + 1e-6
    error = (dequantize_nf4(q).double() - weight.double()).reshape(-1, 64).abs()
    assert torch.all(error <= bound[:, None])
    assert float((error / bound[:, None]).max()) > 0.5  # the bound is not vacuous
    assert torch.all(dequantize_nf4(q)[3, :64] == 0)
    bits = 8 * q.nbytes / weight.numel()
    assert 4.1 < bits < 4.2


def test_a_weight_that_does_not_fill_whole_blocks_is_refused():
    with pytest.raises(UserError, match=r"shape \(3, 7\): 21 values are not a multiple of the block size 64"):
        quantize_nf4(torch.randn(3, 7))


def test_nf4_linear_matches_its_dequantised_weight_in_forward_and_backward():
    linear = nn.Linear(64, 48, bias=True)
    layer = NF4Linear.from_linear(linear)
    x = torch.randn(5, 64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    dense = layer.dequantize()
    out = layer(x)
    reference = x_ref @ dense.T + linear.bias.detach()
    torch.testing.assert_close(out, reference)
    out.square().sum().backward()
    reference.square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    assert not any(p.requires_grad for p in layer.parameters())
    assert {name for name, _ in layer.named_buffers()} == {"packed", "scale_codes", "scale_scales", "scale_offset"}


def _train(model: nn.Module, ids: torch.Tensor, steps: int) -> list[float]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        logits = model(ids[:, :-1]).logits
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    return losses


def test_qlora_training_moves_the_loss_like_lora():
    base = BasicsCausalLM(tiny_basics_lm(VOCAB, seed=7))
    ids = torch.randint(0, VOCAB, (4, 24), generator=torch.Generator().manual_seed(1))
    curves = {}
    for qlora in (False, True):
        model = copy.deepcopy(base)
        torch.manual_seed(11)  # the same A initialisation for both
        names = inject_lora(model, LoRAConfig(rank=4, alpha=8, qlora=qlora))
        assert len(names) == 14  # q, k, v, output_proj, w1, w2, w3 in both layers
        if qlora:
            assert all(isinstance(layer.base, NF4Linear) for _, layer in lora_layers(model))
            with pytest.raises(UserError, match="cannot merge"):
                merge_lora(model)
        curves[qlora] = _train(model, ids, 30)
    lora, qlora = curves[False], curves[True]
    assert lora[-1] < lora[0] - 0.5 and qlora[-1] < qlora[0] - 0.5
    # 4-bit base weights shift the start a little; the descent is the same within a fifth.
    assert abs(qlora[0] - lora[0]) < 0.05
    assert abs((qlora[0] - qlora[-1]) - (lora[0] - lora[-1])) < 0.2 * (lora[0] - lora[-1])


TRITON_CHECK = """
import torch
from cs336_alignment.peft.nf4 import dequantize_nf4, quantize_nf4
generator = torch.Generator().manual_seed(0)
weight = torch.randn(96, 160, generator=generator) * 0.02
weight[40:] *= 30
weight[3, :64] = 0
q = quantize_nf4(weight, 64, 32)
reference = dequantize_nf4(q, use_triton=False)
assert torch.equal(dequantize_nf4(q, use_triton=True), reference)
bf16 = dequantize_nf4(q, torch.bfloat16, use_triton=True).float()
assert torch.all((bf16 - reference).abs() <= reference.abs() * 2 ** -7)  # one bf16 step
print("ok")
"""


def test_triton_dequantisation_kernel_in_the_interpreter():
    """The kernel's indexing (nibbles, blocks, blocks of scales, ragged last program) in Triton's CPU
    interpreter, in a child process (TRITON_INTERPRET must be set before the kernel is defined)."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-c", TRITON_CHECK], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernel runs on CUDA")
def test_triton_dequantisation_on_cuda_and_a_qlora_layer_under_autocast():
    weight = torch.randn(1536, 8960, device="cuda") * 0.02
    q = quantize_nf4(weight)
    reference = dequantize_nf4(q, use_triton=False)
    torch.testing.assert_close(dequantize_nf4(q, use_triton=True), reference, rtol=1e-6, atol=1e-7)
    linear = nn.Linear(256, 128, device="cuda", dtype=torch.bfloat16)
    layer = LoRALinear(NF4Linear.from_linear(linear), rank=4, alpha=8)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 256, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = layer(x)
    dense = layer.base.dequantize(torch.float32) + layer.delta_weight()
    torch.testing.assert_close(out.float(), x.detach() @ dense.T + linear.bias.float(), rtol=3e-2, atol=3e-2)
    out.float().sum().backward()
    assert layer.lora_A.grad is not None and x.grad is not None
