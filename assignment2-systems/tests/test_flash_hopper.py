"""The Hopper (Gluon) FlashAttention kernels of issue 24 against the float64 reference.

On an sm_90 GPU: O, L and the gradients (Triton dQ, Gluon dK/dV on our O and L) at ragged lengths, causal and
not, d 64 and 128, bf16 and fp16, with NaN-prefilled outputs so that an unwritten tile fails; the backward
with the Gluon dK/dV kernel switched off is exactly the Triton one; every other input falls back to the
portable kernels. Without such a GPU the fallback wiring runs on the CPU (PyTorch twin).
"""

from __future__ import annotations

import pytest
import torch

from cs336_systems.flash_attention import attention_with_lse, hopper_impl, poisoned_outputs
from cs336_systems.flash_attention.hopper_impl import FlashAttentionHopper


def _is_hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


needs_hopper = pytest.mark.skipif(not _is_hopper(), reason="the Gluon kernels need an sm_90 (Hopper) GPU")


@pytest.fixture(autouse=True)
def gluon_backward_on():
    """These tests check the Gluon dK/dV kernel too, which is off by default (slower, NOTES.md fa3-v2): on for
    each test, the default back afterwards."""
    default = hopper_impl._settings["backward"]
    hopper_impl.set_backward_enabled(True)
    yield
    hopper_impl.set_backward_enabled(default)


def test_the_gluon_backward_is_off_by_default_unless_asked_for():
    """The default follows the H100 measurement (the Triton backward was faster); CS336_FA3_BWD=1 turns it on."""
    assert hopper_impl.settings_from({}) == {"enabled": True, "backward": False, "forward": "v1",
                                             "backward_kernel": "v2", "dq_kernel": "triton"}
    assert hopper_impl.settings_from({"CS336_FA3_BWD": "1"})["backward"] is True
    assert hopper_impl.settings_from({"CS336_FA3_BWD": "0", "CS336_FA3": "0"}) == {"enabled": False,
                                                                                 "backward": False,
                                                                                 "forward": "v1",
                                                                                 "backward_kernel": "v2",
                                                                                 "dq_kernel": "triton"}


def test_the_pipelined_backward_kernel_and_the_triton_forward_are_chosen_by_name():
    assert hopper_impl.settings_from({"CS336_FA3_BWD_KERNEL": "V5"})["backward_kernel"] == "v5"
    assert hopper_impl.settings_from({"CS336_FA3_BWD_KERNEL": "v6"})["backward_kernel"] == "v6"
    assert hopper_impl.settings_from({"CS336_FA3_FWD": "triton"})["forward"] == "triton"
    with pytest.raises(ValueError, match="CS336_FA3_BWD_KERNEL"):
        hopper_impl.settings_from({"CS336_FA3_BWD_KERNEL": "v9"})
    with pytest.raises(ValueError):
        hopper_impl.set_backward_kernel("v9")
    assert hopper_impl.settings_from({"CS336_FA3_DQ": "Gluon"})["dq_kernel"] == "gluon"
    with pytest.raises(ValueError, match="CS336_FA3_DQ"):
        hopper_impl.settings_from({"CS336_FA3_DQ": "cuda"})
    with pytest.raises(ValueError):
        hopper_impl.set_dq_kernel("cuda")
    assert hopper_impl._settings["backward_kernel"] in hopper_impl.BACKWARD_KERNELS


def test_the_warp_specialised_forward_is_opt_in():
    """fa3-v4 runs only when asked for (CS336_FA3_FWD=ws or set_forward_kernel), until it is measured."""
    assert hopper_impl.settings_from({"CS336_FA3_FWD": "ws"})["forward"] == "ws"
    assert hopper_impl.settings_from({"CS336_FA3_FWD": ""})["forward"] == "v1"
    with pytest.raises(ValueError):
        hopper_impl.settings_from({"CS336_FA3_FWD": "fast"})
    with pytest.raises(ValueError):
        hopper_impl.set_forward_kernel("fast")
    assert hopper_impl._settings["forward"] in hopper_impl.FORWARD_KERNELS


@pytest.fixture(params=["v5", "v6"])
def pipelined_backward(request):
    """A pipelined dK/dV kernel (fa3-v5, or its two-consumer form fa3-v6) for one test, the previous choice back
    afterwards; yields the kernel that should run at d 64 and at d 128 (v6 is d-64 only and hands d 128 to v5)."""
    previous = hopper_impl._settings["backward_kernel"]
    hopper_impl.set_backward_kernel(request.param)
    yield {64: request.param, 128: "v5"}
    hopper_impl.set_backward_kernel(previous)


@pytest.fixture
def gluon_dq():
    """The pipelined Gluon dQ kernel (fa3-v7) in front of the pipelined dK/dV kernel (fa3-v5), for one test."""
    previous = hopper_impl._settings["dq_kernel"], hopper_impl._settings["backward_kernel"]
    hopper_impl.set_dq_kernel("gluon")
    hopper_impl.set_backward_kernel("v5")
    yield
    hopper_impl.set_dq_kernel(previous[0])
    hopper_impl.set_backward_kernel(previous[1])


@pytest.fixture
def ws_forward():
    """The warp-specialised forward (fa3-v4) for one test, the previous choice back afterwards."""
    previous = hopper_impl._settings["forward"]
    hopper_impl.set_forward_kernel("ws")
    yield
    hopper_impl.set_forward_kernel(previous)


def _rel(a: torch.Tensor, b: torch.Tensor, floor: float = 1e-30) -> float:
    """‖a − b‖ / max(‖b‖, floor): the floor keeps an exactly-zero reference (dQ and dK with one key, where the
    softmax is constant) from turning float rounding into an infinite relative error."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(floor)).item()


def _inputs(shape_q, n_k, dtype, device, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    *lead, _, d = shape_q

    def rnd(*s):
        return torch.randn(*s, generator=gen).to(device=device, dtype=dtype).requires_grad_()

    return rnd(*shape_q), rnd(*lead, n_k, d), rnd(*lead, n_k, d), torch.randn(*shape_q, generator=gen).to(device, dtype)


def _check(shape_q, n_k, causal, dtype, device, tol_out, tol_grad, expect_path=""):
    q, k, v, do = _inputs(shape_q, n_k, dtype, device)
    with poisoned_outputs():
        o = FlashAttentionHopper.apply(q, k, v, causal)
        if expect_path is not None:
            assert hopper_impl.last_path["forward"] == expect_path
        lse = [t for t in o.grad_fn.saved_tensors if t.shape == q.shape[:-1]]
        grads = torch.autograd.grad(o, (q, k, v), do)
        if expect_path is not None:
            assert hopper_impl.last_path["backward"] == expect_path
    assert len(lse) == 1
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    o_ref, lse_ref = attention_with_lse(q64, k64, v64, causal)
    grads_ref = torch.autograd.grad(o_ref, (q64, k64, v64), do.double())
    assert o.dtype == dtype and o.shape == q.shape
    for name, t in [("O", o), ("L", lse[0]), ("dQ", grads[0]), ("dK", grads[1]), ("dV", grads[2])]:
        assert torch.isfinite(t).all(), f"{name} has NaN/inf: an unwritten tile or an overflow"
    assert _rel(o, o_ref) < tol_out, f"O rel err {_rel(o, o_ref):.2e}"
    assert (lse[0].double() - lse_ref).abs().max().item() < 10 * tol_out, "L differs"
    floor = 1e-3 * do.double().norm().item()
    for name, g, gr in zip(("dQ", "dK", "dV"), grads, grads_ref, strict=True):
        assert _rel(g, gr, floor) < tol_grad, f"{name} rel err {_rel(g, gr, floor):.2e}"


# ----------------------------------------------------------------------------------------------- Hopper GPU

def _tolerances(dtype: torch.dtype) -> tuple[float, float]:
    """(output, gradient) relative tolerances of the pipelined kernels' tests; fp16's 3 more mantissa bits
    tighten them."""
    return (1.5e-2, 3e-2) if dtype == torch.bfloat16 else (3e-3, 6e-3)


LENGTHS = [1, 17, 128, 1000, 4097]


@needs_hopper
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n", LENGTHS)
def test_hopper_forward_and_backward(n, causal, head_dim, dtype):
    _check((2, 3, n, head_dim), n, causal, dtype, "cuda", 1.5e-2, 3e-2)


@needs_hopper
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("n_q", "n_k"), [(1000, 17), (17, 1000), (300, 4097), (4097, 129)])
def test_hopper_unequal_lengths(n_q, n_k, causal):
    """Queries and keys of different lengths (top-left causal alignment), key tiles that end mid-tile."""
    _check((1, 2, n_q, 64), n_k, causal, torch.bfloat16, "cuda", 1.5e-2, 3e-2)


@needs_hopper
@pytest.mark.parametrize("config", [(128, 3, False), (128, 4, True), (128, 3, True), (128, 2, True), (64, 3, True),
                                    (64, 2, True)])
def test_hopper_other_configs(config, monkeypatch):
    """The register-P variant and other key tiles / stage counts (d 64), all of which compile_check builds."""
    monkeypatch.setitem(hopper_impl.CONFIGS, 64, config)
    for causal in (False, True):
        _check((1, 2, 1000, 64), 1000, causal, torch.bfloat16, "cuda", 1.5e-2, 3e-2)


@needs_hopper
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n", LENGTHS)
def test_hopper_ws_forward(n, causal, head_dim, dtype, ws_forward):
    """The warp-specialised forward (fa3-v4, default WS_CONFIGS: ping-pong consumers) against float64, with
    the backward on its O and L."""
    _check((2, 3, n, head_dim), n, causal, dtype, "cuda", 1.5e-2, 3e-2)
    assert hopper_impl.last_path["forward_kernel"] == "ws"


@needs_hopper
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("n_q", "n_k"), [(1000, 17), (17, 1000), (300, 4097), (4097, 129)])
def test_hopper_ws_unequal_lengths(n_q, n_k, causal, ws_forward):
    """fa3-v4 with queries and keys of different lengths, key tiles that end mid-tile."""
    _check((1, 2, n_q, 64), n_k, causal, torch.bfloat16, "cuda", 1.5e-2, 3e-2)


@needs_hopper
@pytest.mark.parametrize(("head_dim", "config"), [(64, (128, 3, True)), (64, (128, 2, True)), (64, (64, 4, False)),
                                                  (128, (128, 2, True))])
def test_hopper_ws_other_configs(head_dim, config, ws_forward, monkeypatch):
    """fa3-v4's other key tiles / stage counts and the single 8-warp consumer, all of which compile_check builds."""
    monkeypatch.setitem(hopper_impl.WS_CONFIGS, head_dim, config)
    for causal in (False, True):
        _check((1, 2, 1000, head_dim), 1000, causal, torch.bfloat16, "cuda", 1.5e-2, 3e-2)


@needs_hopper
@pytest.mark.parametrize(("head_dim", "config"), [(64, (64, 128, 3)), (128, (32, 128, 3)), (128, (64, 128, 2))])
def test_hopper_backward_other_configs(head_dim, config, monkeypatch):
    """Other dK/dV tiles and stage counts that compile_check builds (d 128 with 64-query tiles spills: still
    correct, only slower)."""
    monkeypatch.setitem(hopper_impl.BWD_CONFIGS, head_dim, config)
    for causal in (False, True):
        _check((1, 2, 1000, head_dim), 1000, causal, torch.bfloat16, "cuda", 1.5e-2, 3e-2)


@needs_hopper
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n", LENGTHS)
def test_hopper_pipelined_backward(n, causal, head_dim, dtype, pipelined_backward):
    """fa3-v5/v6 (products of consecutive query tiles interleaved): one query tile (n 1, 17: the peeled first tile
    alone), two, many, and a ragged last tile; NaN-prefilled outputs catch an unwritten key tile."""
    tol_out, tol_grad = _tolerances(dtype)
    _check((1, 2, n, head_dim), n, causal, dtype, "cuda", tol_out, tol_grad)
    assert hopper_impl.last_path["backward_kernel"] == pipelined_backward[head_dim]


@needs_hopper
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("n_q", "n_k"), [(1000, 17), (17, 1000), (300, 4097), (4097, 129)])
def test_hopper_pipelined_unequal_lengths(n_q, n_k, causal, pipelined_backward):
    """More keys than queries under a causal mask leaves key tiles with no query tile (dK = dV = 0 there), and
    v6's second consumer with none while its first has one."""
    _check((1, 2, n_q, 64), n_k, causal, torch.bfloat16, "cuda", 1.5e-2, 3e-2)


@needs_hopper
@pytest.mark.parametrize("stages", [4, 3])
def test_hopper_pipelined_other_stages_and_the_triton_forward(stages, pipelined_backward, monkeypatch):
    """4 stages, and the pipelined kernels behind the Triton forward (`set_forward_kernel("triton")`), as the
    leaderboard benchmark times them."""
    monkeypatch.setitem(hopper_impl.BWD5_CONFIGS, 64, (64, 64, stages))
    monkeypatch.setitem(hopper_impl.BWD6_CONFIGS, 64, (64, 128, stages))
    previous = hopper_impl._settings["forward"]
    hopper_impl.set_forward_kernel("triton")
    try:
        for causal in (False, True):
            _check((2, 3, 1000, 64), 1000, causal, torch.bfloat16, "cuda", 1.5e-2, 3e-2)
            assert hopper_impl.last_path["forward_kernel"] == "triton"
    finally:
        hopper_impl.set_forward_kernel(previous)


@needs_hopper
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n", LENGTHS)
def test_hopper_gluon_dq(n, causal, head_dim, dtype, gluon_dq):
    """fa3-v7's dQ (and the D it writes for the dK/dV kernel): one key tile (the masked one alone), two, many, a
    ragged last tile."""
    tol_out, tol_grad = _tolerances(dtype)
    _check((1, 2, n, head_dim), n, causal, dtype, "cuda", tol_out, tol_grad)
    assert hopper_impl.last_path["dq_kernel"] == "gluon"


@needs_hopper
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("n_q", "n_k"), [(1000, 17), (17, 1000), (300, 4097), (4097, 129)])
def test_hopper_gluon_dq_unequal_lengths(n_q, n_k, causal, gluon_dq, monkeypatch):
    """Fewer keys than a causal query tile's end, and a 3-stage ring."""
    monkeypatch.setitem(hopper_impl.DQ_STAGES, 64, 3)
    _check((1, 2, n_q, 64), n_k, causal, torch.bfloat16, "cuda", 1.5e-2, 3e-2)


@needs_hopper
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_hopper_backward_switched_off_is_the_triton_backward(head_dim, causal):
    """With the Gluon dK/dV kernel off, the gradients are exactly those of `triton_impl.flash_backward` on
    the same saved tensors; with it on they agree to bf16 rounding."""
    from cs336_systems.flash_attention import triton_impl

    q, k, v, do = _inputs((1, 3, 777, head_dim), 777, torch.bfloat16, "cuda", seed=1)
    o = FlashAttentionHopper.apply(q, k, v, causal)
    saved = o.grad_fn.saved_tensors
    expected = triton_impl.flash_backward(*(t.detach() for t in saved), do, causal)
    hopper_impl.set_backward_enabled(False)
    try:
        off = torch.autograd.grad(o, (q, k, v), do, retain_graph=True)
        assert hopper_impl.last_path["backward"].startswith("backward disabled")
    finally:
        hopper_impl.set_backward_enabled(True)
    on = torch.autograd.grad(o, (q, k, v), do)
    assert hopper_impl.last_path["backward"] == ""
    for name, g_off, g_on, g_exp in zip(("dQ", "dK", "dV"), off, on, expected, strict=True):
        assert torch.equal(g_off, g_exp), f"{name}: the switched-off backward is not the Triton one"
        assert _rel(g_on, g_exp) < 1e-2, f"{name}: Gluon and Triton backward differ by {_rel(g_on, g_exp):.2e}"


@needs_hopper
def test_hopper_three_dim_and_strided_inputs():
    """(batch, seq, d) inputs, and a non-contiguous (transposed) layout that is copied for the descriptors."""
    _check((2, 333, 64), 333, True, torch.bfloat16, "cuda", 1.5e-2, 3e-2)
    q, k, v, _ = _inputs((1, 200, 4, 64), 4, torch.bfloat16, "cuda")
    qt, kt, vt = (x.detach().transpose(1, 2) for x in (q, k, v))  # (b, h, s, d) views, not contiguous
    o = FlashAttentionHopper.apply(qt, kt, vt, True)
    assert hopper_impl.last_path["forward"] == ""
    o_ref, _ = attention_with_lse(qt.double(), kt.double(), vt.double(), True)
    assert _rel(o, o_ref) < 1.5e-2


@needs_hopper
@pytest.mark.parametrize(("dtype", "d", "reason"), [(torch.float32, 64, "dtype"), (torch.bfloat16, 32, "head dim"),
                                                     (torch.bfloat16, 80, "head dim")])
def test_hopper_falls_back_to_triton(dtype, d, reason):
    """Inputs the Gluon kernel does not take run the portable Triton kernels (and say so)."""
    tol = 4e-3 if dtype == torch.float32 else 1.5e-2
    _check((1, 2, 257, d), 257, True, dtype, "cuda", tol, 2 * tol, expect_path=None)
    assert hopper_impl.last_path["forward"].startswith(reason)


# ---------------------------------------------------------------------------------------------- CPU fallback


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("shape_q", "n_k"), [((2, 67, 64), 67), ((1, 2, 130, 128), 45)])
def test_cpu_falls_back_to_pytorch(shape_q, n_k, causal):
    """On a CPU the Function runs the PyTorch twin, forward and backward, and matches float64 closely."""
    _check(shape_q, n_k, causal, torch.float32, "cpu", 1e-5, 1e-5, expect_path="device cpu")


def test_cpu_ws_forward_falls_back_to_pytorch(ws_forward):
    """With the warp-specialised forward chosen, a CPU still runs the PyTorch twin and names no Gluon kernel."""
    _check((1, 2, 50, 64), 50, True, torch.float32, "cpu", 1e-5, 1e-5, expect_path=None)
    assert hopper_impl.last_path["forward"] == "device cpu"
    assert hopper_impl.last_path["forward_kernel"] == ""


def test_disabled_reason():
    q = torch.zeros(1, 4, 64)
    hopper_impl.set_enabled(False)
    try:
        assert hopper_impl.unsupported_reason(q, q, q).startswith("disabled")
        assert hopper_impl.backward_unsupported_reason(q, q, q).startswith("disabled")
    finally:
        hopper_impl.set_enabled(True)
    assert hopper_impl.unsupported_reason(q, q, q) == "device cpu"
    hopper_impl.set_backward_enabled(False)
    try:
        assert hopper_impl.backward_unsupported_reason(q, q, q).startswith("backward disabled")
        assert hopper_impl.unsupported_reason(q, q, q) == "device cpu"  # the forward keeps its own switch
    finally:
        hopper_impl.set_backward_enabled(True)
    assert hopper_impl.backward_unsupported_reason(q, q, q) == "device cpu"


@pytest.mark.parametrize("backward_on", [True, False])
def test_cpu_backward_switch_falls_back_to_pytorch(backward_on):
    """Either setting of the dK/dV switch gives the PyTorch backward on a CPU, and says why."""
    hopper_impl.set_backward_enabled(backward_on)
    try:
        _check((1, 2, 50, 64), 50, True, torch.float32, "cpu", 1e-5, 1e-5, expect_path=None)
        expected = "device cpu" if backward_on else "backward disabled"
        assert hopper_impl.last_path["backward"].startswith(expected)
    finally:
        hopper_impl.set_backward_enabled(True)
