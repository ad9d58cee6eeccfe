"""Checkpointed blocks give the same loss and gradients as plain ones while saving fewer activations."""

from __future__ import annotations

import pytest
import torch

from cs336_basics.model import TransformerConfig, TransformerLM
from cs336_basics.nn_utils import cross_entropy
from cs336_systems.activation_checkpointing import checkpoint_blocks


def _model() -> TransformerLM:
    torch.manual_seed(0)
    return TransformerLM(TransformerConfig(vocab_size=64, context_length=16, d_model=32, num_layers=4,
                                           num_heads=4, d_ff=64))


def _loss_grads_saved(model: TransformerLM, x: torch.Tensor) -> tuple[torch.Tensor, dict, int]:
    """Loss, gradients by name and the bytes autograd saved for backward during the forward."""
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(x)
    loss = cross_entropy(logits[:, :-1].reshape(-1, 64), x[:, 1:].reshape(-1))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, saved


def test_gradients_identical_and_activations_fewer() -> None:
    x = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    plain = _model()
    loss0, grads0, saved0 = _loss_grads_saved(plain, x)
    ckpt = checkpoint_blocks(_model())
    assert ckpt.state_dict().keys() == plain.state_dict().keys()
    loss1, grads1, saved1 = _loss_grads_saved(ckpt, x)
    assert torch.equal(loss0, loss1)
    for name, g in grads0.items():
        assert torch.equal(g, grads1[name]), name
    assert saved1 < saved0 / 2, (saved0, saved1)


def test_every_other_block_and_kv_cache_decoding_unaffected() -> None:
    model = checkpoint_blocks(_model(), every=2)
    assert [getattr(b, "_checkpointed", False) for b in model.layers] == [True, False, True, False]
    x = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(x)
        caches = model.new_kv_caches(batch_size=2)
        step = torch.cat([model(x[:, :3], kv_caches=caches), model(x[:, 3:], kv_caches=caches)], dim=1)
    torch.testing.assert_close(step, full, rtol=1e-5, atol=1e-5)


def test_rejects_bad_interval() -> None:
    with pytest.raises(ValueError, match="every"):
        checkpoint_blocks(_model(), every=0)
