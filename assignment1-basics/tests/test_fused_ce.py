"""--loss-impl fused: the Triton kernel that turns a chunk's logits into the chunk's loss and, in place, its
gradient (`fused_ce.py`), against float64 autograd through torch's cross-entropy. The kernel runs in Triton's
CPU interpreter here (a child process: TRITON_INTERPRET must be set before the kernel is defined) and on CUDA in
the GPU test; elsewhere the path falls back to the eager per-chunk softmax, checked too."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from cs336_basics.chunked_ce import chunk_loss_and_grad, chunked_linear_cross_entropy
from cs336_basics.cli_support import UserError
from cs336_basics.fused_ce import fused_chunk_loss_and_grad, launch_config, softmax_grad_, summed_nll
from cs336_basics.testing import one_thread  # noqa: F401 (autouse: one torch thread)
from cs336_basics.training.config import TrainConfig

INTERPRETER_CHECK = r"""
import torch, torch.nn.functional as F
from cs336_basics.fused_ce import softmax_grad_, summed_nll, triton_usable
from cs336_basics.chunked_ce import chunked_linear_cross_entropy

assert triton_usable(torch.zeros(1, 1))
gen = torch.Generator().manual_seed(0)

def reference(logits, targets, scale):
    exact = logits.double().requires_grad_(True)
    loss = F.cross_entropy(exact, targets, reduction="sum")
    loss.backward()
    return loss.detach(), exact.grad * scale

for n_cols, block in ((50, None), (50, 16), (50, 64), (7, None), (130, 32)):
    logits = torch.randn(9, n_cols, generator=gen) * 3
    targets = torch.randint(0, n_cols, (9,), generator=gen)
    targets[0], targets[1] = 0, n_cols - 1  # the first and the last class
    expected_loss, expected_grad = reference(logits, targets, 0.25)
    for dtype, grad_tol in ((torch.float32, 2e-7), (torch.bfloat16, torch.finfo(torch.bfloat16).eps * 0.25)):
        work = logits.to(dtype, copy=True)
        loss, grad = softmax_grad_(work, targets, 0.25, block=block)
        assert grad.data_ptr() == work.data_ptr() and grad.dtype == dtype  # in place
        bf16_loss = reference(logits.to(dtype), targets, 0.25)[0]  # the loss of the rounded logits
        assert abs(loss.item() - bf16_loss.item()) <= 1e-5 * abs(bf16_loss.item()), (n_cols, block, dtype)
        exact_grad = reference(logits.to(dtype), targets, 0.25)[1]
        error = (grad.double() - exact_grad).abs().max().item()
        assert error <= grad_tol, (n_cols, block, dtype, error)
    assert abs(softmax_grad_(logits.clone(), targets, 1.0)[0].item() - expected_loss.item()) < 1e-4

# a target outside the vocabulary: a NaN loss, not a read beyond the row
logits = torch.randn(4, 20, generator=gen)
loss, _ = softmax_grad_(logits.clone(), torch.tensor([3, 20, 5, 0]), 1.0)
assert torch.isnan(loss)
loss, _ = softmax_grad_(logits.clone(), torch.tensor([3, -1, 5, 0]), 1.0)
assert torch.isnan(loss)

# the loss alone leaves the logits as they were
logits = torch.randn(5, 70, generator=gen)
targets = torch.randint(0, 70, (5,), generator=gen)
for block in (None, 32):
    kept = logits.clone()
    assert abs(summed_nll(kept, targets, block=block).item() - reference(logits, targets, 1.0)[0].item()) < 1e-4
    assert torch.equal(kept, logits)

# the LM head + loss with the kernel per chunk: loss and both gradients as autograd through the full logits
hidden = torch.randn(3, 11, 8, generator=gen, dtype=torch.float64)
weight = torch.randn(40, 8, generator=gen, dtype=torch.float64)
targets = torch.randint(0, 40, (3, 11), generator=gen)
h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
F.cross_entropy((h @ w.T).reshape(-1, 40), targets.reshape(-1)).backward()
for chunk in (5, 33):
    hf, wf = hidden.float().requires_grad_(True), weight.float().requires_grad_(True)
    loss = chunked_linear_cross_entropy(hf, wf, targets, chunk, fused=True)
    (2.0 * loss).backward()
    expected = F.cross_entropy((hidden @ weight.T).reshape(-1, 40), targets.reshape(-1))
    assert abs(loss.item() - expected.item()) < 1e-5
    torch.testing.assert_close(hf.grad.double(), 2.0 * h.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(wf.grad.double(), 2.0 * w.grad, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # evaluation: the kernel's loss-only pass
        assert abs(chunked_linear_cross_entropy(hf, wf, targets, chunk, fused=True).item() - expected.item()) < 1e-5
print("ok")
"""


def test_kernel_in_the_triton_interpreter_against_float64():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-c", INTERPRETER_CHECK], capture_output=True, text=True, env=env,
                            timeout=600)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_launch_config_keeps_short_rows_in_registers_and_blocks_long_ones():
    assert launch_config(32000) == (16384, False, 16)  # the leaderboard's vocabulary: two blocks a row
    assert launch_config(16384) == (16384, True, 16)  # 32 values a thread
    assert launch_config(50) == (64, True, 4)
    assert launch_config(64) == (64, True, 4)
    assert launch_config(1) == (2, True, 4)
    assert launch_config(32000, block=4096) == (4096, False, 4)


def test_without_the_kernel_the_chunk_step_is_the_eager_softmax():
    """On a CPU (no interpreter) `--loss-impl fused` runs `chunk_loss_and_grad`: the same loss and gradient."""
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 25, generator=gen)
    targets = torch.randint(0, 25, (6,), generator=gen)
    loss, grad = fused_chunk_loss_and_grad(logits.clone(), targets, 0.5)
    expected_loss, expected_grad = chunk_loss_and_grad(logits, targets, 0.5)
    torch.testing.assert_close(loss, expected_loss)
    torch.testing.assert_close(grad, expected_grad)
    hidden = torch.randn(2, 7, 6, generator=gen, dtype=torch.float64)
    weight = torch.randn(25, 6, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, 25, (2, 7), generator=gen)
    expected = F.cross_entropy((hidden @ weight.T).reshape(-1, 25), targets.reshape(-1))
    torch.testing.assert_close(chunked_linear_cross_entropy(hidden, weight, targets, 4, fused=True), expected)
    with torch.no_grad():
        torch.testing.assert_close(chunked_linear_cross_entropy(hidden, weight, targets, 4, fused=True), expected)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="either compiled or the fused kernel"):
        chunked_linear_cross_entropy(torch.zeros(2, 3), torch.zeros(4, 3), torch.zeros(2, dtype=torch.long), 2,
                                     compiled=True, fused=True)
    with pytest.raises(ValueError, match="contiguous rows"):
        softmax_grad_(torch.zeros(4, 6).T, torch.zeros(6, dtype=torch.long), 1.0)
    with pytest.raises(ValueError, match="one target per row"):
        softmax_grad_(torch.zeros(4, 6), torch.zeros(3, dtype=torch.long), 1.0)
    with pytest.raises(UserError, match="--loss-impl fused needs --parallel none"):
        TrainConfig(loss_impl="fused", parallel="ddp")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernel runs on CUDA")
@pytest.mark.parametrize("block", [None, 4096])
def test_kernel_on_cuda_at_the_leaderboard_vocabulary(block):
    gen = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(64, 32000, device="cuda", generator=gen) * 3
    targets = torch.randint(0, 32000, (64,), device="cuda", generator=gen)
    scale = 1.0 / 64
    for dtype in (torch.float32, torch.bfloat16):
        rounded = logits.to(dtype)
        exact = rounded.double().requires_grad_(True)
        expected = F.cross_entropy(exact, targets, reduction="sum")
        expected.backward()
        kept = rounded.clone()
        assert abs(summed_nll(kept, targets, block=block).item() - expected.item()) <= 1e-5 * expected.item()
        assert torch.equal(kept, rounded)  # the loss alone writes nothing
        loss, grad = softmax_grad_(rounded.clone(), targets, scale, block=block)
        assert abs(loss.item() - expected.item()) <= 1e-5 * expected.item()
        tolerance = 1e-8 if dtype == torch.float32 else torch.finfo(dtype).eps * scale
        assert (grad.double() - exact.grad * scale).abs().max().item() <= tolerance


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernel runs on CUDA")
def test_fused_lm_head_loss_under_bf16_autocast_on_cuda_matches_the_plain_path():
    gen = torch.Generator(device="cuda").manual_seed(5)
    hidden = torch.randn(256, 64, device="cuda", generator=gen)
    weight = torch.randn(1000, 64, device="cuda", generator=gen) * 0.2
    targets = torch.randint(0, 1000, (256,), device="cuda", generator=gen)
    results = []
    for fused in (False, True):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = (chunked_linear_cross_entropy(h, w, targets, 100, fused=True) if fused
                    else F.cross_entropy((h @ w.T).float(), targets))
        loss.backward()
        results.append((loss.detach(), h.grad, w.grad))
        assert h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    (plain_loss, plain_dh, plain_dw), (loss, dh, dw) = results
    torch.testing.assert_close(loss, plain_loss, rtol=1e-5, atol=1e-5)  # the same bf16 logits
    torch.testing.assert_close(dh, plain_dh, rtol=2e-2, atol=1e-4)  # bf16 gradient matmuls on both sides
    torch.testing.assert_close(dw, plain_dw, rtol=2e-2, atol=1e-4)


@pytest.mark.parametrize("compile_model", [False, True])
def test_fused_loss_function_equals_the_plain_one(compile_model):
    """The trainer's loss under --loss-impl fused (the model's hidden states into the chunked head + loss, eager
    or compiled model): the plain path's loss and every parameter's gradient."""
    from cs336_basics.model import TransformerConfig, TransformerLM
    from cs336_basics.training import distributed
    from cs336_basics.training.trainer import loss_function

    torch.manual_seed(0)
    model = TransformerLM(TransformerConfig(vocab_size=30, context_length=8, d_model=16, num_layers=1,
                                            num_heads=2, d_ff=32))
    wrapped = distributed.wrap_model(model, "none", torch.device("cpu"), "fp32", compile_model)
    x, y = torch.randint(0, 30, (2, 8)), torch.randint(0, 30, (2, 8))
    results = []
    for config in (TrainConfig(), TrainConfig(compile=compile_model, compile_loss=compile_model, loss_impl="fused",
                                              loss_chunk_tokens=5)):
        model.zero_grad()
        loss = loss_function(model, wrapped, config)(x, y)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (plain_loss, plain_grads), (loss, grads) = results
    torch.testing.assert_close(loss, plain_loss)
    for grad, plain_grad in zip(grads, plain_grads, strict=True):
        torch.testing.assert_close(grad, plain_grad, rtol=1e-5, atol=1e-7)
