"""FlashAttention with the Hopper (sm_90) Gluon kernels of `hopper_kernels` (issue 24).

`FlashAttentionHopper.apply(q, k, v, is_causal)` takes what `FlashAttentionTriton` takes and saves the same
Q, K, V, O and L. Backward: by default the whole Triton backward (`triton_impl.flash_backward`), which measured
1.2 ms faster at the leaderboard shape on an H100 (NOTES.md, fa3-v2); CS336_FA3_BWD=1 or
`set_backward_enabled(True)` gives the Triton dQ kernel (which also writes D = rowsum(dO ∘ O)) then the Gluon
dK/dV kernel (fa3-v2's by default; CS336_FA3_BWD_KERNEL=v5 or `set_backward_kernel("v5")`: the pipelined
fa3-v5 kernel; =v6 its two-consumer form; CS336_FA3_DQ=gluon puts the pipelined Gluon dQ kernel, fa3-v7, in
front of it; NOTES.md). Inputs the Gluon kernels do not take fall back, whole, to
the portable kernels: a GPU other than compute capability 9.x, dtypes other than bf16/fp16, head dims other
than 64 and 128, a Triton without Gluon; on a CPU the tiled PyTorch twin runs (so that the wiring is testable
without a GPU).
Nothing here imports Gluon until a Hopper launch.

Forward kernel: by default `flash_fwd_hopper_kernel` (fa3-v1 schedule, the same warps issue the TMA copies).
CS336_FA3_FWD=ws or `set_forward_kernel("ws")` selects the warp-specialised `flash_fwd_hopper_ws_kernel`
(fa3-v4: a 1-warp TMA producer partition and two ping-pong consumer warpgroups of 64 rows each, `WS_CONFIGS`),
opt-in until it is measured on an H100 (NOTES.md, "fa3-v4"); CS336_FA3_FWD=triton puts the portable Triton forward
in front of the Gluon backward. `last_path` names the kernels that ran ("forward_kernel": "v1", "ws" or "triton";
"backward_kernel", "dq_kernel"; "" after a fallback).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from cs336_systems.flash_attention import pytorch_impl
from cs336_systems.flash_attention._common import alloc, as_4d, check_qkv

HEAD_DIMS = (64, 128)
DTYPES = (torch.bfloat16, torch.float16)
BLOCK_M = 128
NUM_WARPS = 8

# head dim -> (key tile, stages, P through shared memory); compile facts in NOTES.md ("Hopper path")
# d 64: 64-key tiles, 4 stages, the fastest of six configurations at the leaderboard shape on an H100 (1.40 against
# 1.59 ms for 128 keys × 3 stages, `results/fa3_leaderboard_h100.json`)
CONFIGS: dict[int, tuple[int, int, bool]] = {64: (64, 4, True), 128: (64, 3, True)}
# head dim -> (key tile, stages, ping-pong) of the warp-specialised forward (fa3-v4), 128-row query tiles:
# ping-pong = two consumer partitions of one warpgroup each (4 warps), else one consumer of 8 warps; compile facts
# in NOTES.md ("fa3-v4"), all variants without spills under 240 registers per consumer thread
WS_CONFIGS: dict[int, tuple[int, int, bool]] = {64: (64, 4, True), 128: (64, 3, True)}
# "triton": the portable Triton forward, so that a Gluon backward can be timed behind the faster forward
FORWARD_KERNELS = ("v1", "ws", "triton")
# head dim -> (query tile, key tile, stages) of the dK/dV kernel, 8 warps; d 128 takes 32-query tiles because
# 64 spill (compile facts in NOTES.md, "fa3-v2")
BWD_CONFIGS: dict[int, tuple[int, int, int]] = {64: (64, 128, 2), 128: (32, 128, 2)}
# the pipelined dK/dV kernel (fa3-v5, one warpgroup, 64 × 64 tiles): head dim -> (query tile, key tile, stages);
# d 64 takes 186 registers and 98 KB at 3 stages (two programs per SM), d 128 255 registers and 164 KB (one)
BWD5_CONFIGS: dict[int, tuple[int, int, int]] = {64: (64, 64, 3), 128: (64, 64, 3)}
# fa3-v6 (two fa3-v5 consumers of 64 keys sharing a producer warp's Q/dO copies), d 64 only: (query tile, key tile
# of the program, stages); 148 KB of shared memory at 3 stages, consumers at ~180 of their 240 registers
BWD6_CONFIGS: dict[int, tuple[int, int, int]] = {64: (64, 128, 3)}
# "v2": fa3-v2's kernel (two warpgroups, each query tile's products waited for before the next tile's);
# "v5": the pipelined one; "v6": v5 in two warp-specialised consumers (d 64; other head dims take v5)
BACKWARD_KERNELS = ("v2", "v5", "v6")
# the dQ kernel in front of a Gluon dK/dV kernel: "triton" (the descriptor kernel, default) or "gluon" (fa3-v7,
# pipelined, one warpgroup per 64 queries); head dim -> its K/V ring stages (2: 66 KB, three programs per SM)
DQ_KERNELS = ("triton", "gluon")
DQ_STAGES: dict[int, int] = {64: 2, 128: 2}


def settings_from(environ: Mapping[str, str]) -> dict[str, Any]:
    """CS336_FA3=0 turns the Gluon kernels off; CS336_FA3_BWD=1 turns the Gluon dK/dV kernel on (off by default:
    slower than the Triton backward on an H100, NOTES.md fa3-v2) and CS336_FA3_BWD_KERNEL=v5 picks the pipelined
    one (default v2); CS336_FA3_FWD=ws picks the warp-specialised forward, =triton the Triton one (default v1)."""
    forward = environ.get("CS336_FA3_FWD", "v1").strip().lower() or "v1"
    if forward not in FORWARD_KERNELS:
        raise ValueError(f"CS336_FA3_FWD={forward!r}: expected one of {FORWARD_KERNELS}")
    backward_kernel = environ.get("CS336_FA3_BWD_KERNEL", "v2").strip().lower() or "v2"
    if backward_kernel not in BACKWARD_KERNELS:
        raise ValueError(f"CS336_FA3_BWD_KERNEL={backward_kernel!r}: expected one of {BACKWARD_KERNELS}")
    dq_kernel = environ.get("CS336_FA3_DQ", "triton").strip().lower() or "triton"
    if dq_kernel not in DQ_KERNELS:
        raise ValueError(f"CS336_FA3_DQ={dq_kernel!r}: expected one of {DQ_KERNELS}")
    return {"enabled": environ.get("CS336_FA3", "1") != "0", "backward": environ.get("CS336_FA3_BWD", "0") != "0",
            "forward": forward, "backward_kernel": backward_kernel, "dq_kernel": dq_kernel}


_settings: dict[str, Any] = settings_from(os.environ)
# why the last call fell back ("" when the Gluon kernel ran): for tests and benchmarks
last_path: dict[str, str] = {"forward": "", "backward": "", "forward_kernel": "", "backward_kernel": "",
                             "dq_kernel": ""}


def set_enabled(enabled: bool) -> None:
    """Turn the Gluon forward off (everything then takes the fallback) or back on."""
    _settings["enabled"] = bool(enabled)


def set_forward_kernel(name: str) -> None:
    """"v1" (default), "ws" (the warp-specialised forward, fa3-v4) or "triton" (the portable forward)."""
    if name not in FORWARD_KERNELS:
        raise ValueError(f"forward kernel {name!r}: expected one of {FORWARD_KERNELS}")
    _settings["forward"] = name


def set_backward_enabled(enabled: bool) -> None:
    """Turn the Gluon dK/dV kernel off (the backward is then the Triton one) or back on."""
    _settings["backward"] = bool(enabled)


def set_backward_kernel(name: str) -> None:
    """Which Gluon dK/dV kernel runs when the Gluon backward is on: "v2" (default), "v5" (pipelined) or "v6"
    (pipelined, two consumers sharing the copies)."""
    if name not in BACKWARD_KERNELS:
        raise ValueError(f"backward kernel {name!r}: expected one of {BACKWARD_KERNELS}")
    _settings["backward_kernel"] = name


def set_dq_kernel(name: str) -> None:
    """The dQ kernel of the Gluon backward: "triton" (default) or "gluon" (the pipelined fa3-v7 kernel)."""
    if name not in DQ_KERNELS:
        raise ValueError(f"dQ kernel {name!r}: expected one of {DQ_KERNELS}")
    _settings["dq_kernel"] = name


def backward_unsupported_reason(q: Tensor, k: Tensor, v: Tensor) -> str:
    """Why the Gluon dK/dV kernel cannot take these inputs ("" if it can): its own switch, then the forward's
    conditions (device, dtype, head dim, Gluon)."""
    if not _settings["backward"]:
        return "backward disabled (CS336_FA3_BWD=0 or set_backward_enabled(False))"
    return unsupported_reason(q, k, v)


def unsupported_reason(q: Tensor, k: Tensor, v: Tensor) -> str:
    """Why the Gluon forward cannot take these inputs ("" if it can)."""
    if not _settings["enabled"]:
        return "disabled (CS336_FA3=0 or set_enabled(False))"
    if q.device.type != "cuda":
        return f"device {q.device.type}"
    if torch.cuda.get_device_capability(q.device)[0] != 9:
        return f"compute capability {torch.cuda.get_device_capability(q.device)} is not Hopper"
    if q.dtype not in DTYPES:
        return f"dtype {q.dtype}"
    if q.shape[-1] not in HEAD_DIMS:
        return f"head dim {q.shape[-1]}"
    try:
        import triton.experimental.gluon  # noqa: F401
    except ImportError:
        return "this Triton has no Gluon"
    return ""


def _flat(x: Tensor) -> Tensor:
    """(b, h, s, d) contiguous, seen as (b·h·s, d) rows for a 2-D descriptor."""
    return x.contiguous().reshape(-1, x.shape[-1])


def _descriptor(x2: Tensor, rows: int) -> Any:
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    gl_dtype = gl.bfloat16 if x2.dtype == torch.bfloat16 else gl.float16
    block = [rows, x2.shape[-1]]
    layout = gl.NVMMASharedLayout.get_default_for(block, gl_dtype)
    return TensorDescriptor(x2, list(x2.shape), list(x2.stride()), block, layout)


def hopper_forward(q: Tensor, k: Tensor, v: Tensor, is_causal: bool,
                   config: tuple[int, int, bool] | None = None) -> tuple[Tensor, Tensor]:
    """O (q's shape and dtype) and L (q.shape[:-1], float32, natural log) from the Gluon kernel; the caller
    has checked `unsupported_reason`."""
    import triton

    from cs336_systems.flash_attention.hopper_kernels import flash_fwd_hopper_kernel

    d = q.shape[-1]
    block_n, stages, p_in_smem = config or CONFIGS[d]
    q4, k4, v4, o4, lse = _forward_operands(q, k, v)
    n_q, n_k = q4.shape[2], k4.shape[2]
    flash_fwd_hopper_kernel[(q4.shape[0] * q4.shape[1], triton.cdiv(n_q, BLOCK_M))](
        _descriptor(_flat(q4), BLOCK_M), _descriptor(_flat(k4), block_n), _descriptor(_flat(v4), block_n), o4, lse,
        n_q, n_k, 1.0 / math.sqrt(d),
        HEAD_DIM=d, BLOCK_M=BLOCK_M, BLOCK_N=block_n, STAGES=stages, IS_CAUSAL=bool(is_causal),
        P_IN_SMEM=p_in_smem, num_warps=NUM_WARPS,
    )
    return _as_input(q, o4, lse)


def _forward_operands(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Contiguous 4-D q, k, v and the forward's outputs O (like q) and L (float32) to launch a forward kernel on."""
    q4, k4, v4 = as_4d(q).contiguous(), as_4d(k).contiguous(), as_4d(v).contiguous()
    b, h, n_q, d = q4.shape
    return q4, k4, v4, alloc((b, h, n_q, d), like=q4), alloc((b, h, n_q), like=q4, dtype=torch.float32)


def _as_input(q: Tensor, o4: Tensor, lse: Tensor) -> tuple[Tensor, Tensor]:
    """O and L back in q's rank (3-D inputs were given a head axis)."""
    if q.ndim == 3:
        return o4.squeeze(1), lse.squeeze(1)
    return o4, lse


def hopper_forward_ws(q: Tensor, k: Tensor, v: Tensor, is_causal: bool,
                      config: tuple[int, int, bool] | None = None) -> tuple[Tensor, Tensor]:
    """`hopper_forward` with the warp-specialised kernel (fa3-v4); config = (key tile, stages, ping-pong)."""
    import triton

    from cs336_systems.flash_attention.hopper_kernels import WS_MAXNREG, flash_fwd_hopper_ws_kernel

    d = q.shape[-1]
    block_n, stages, pingpong = config or WS_CONFIGS[d]
    q4, k4, v4, o4, lse = _forward_operands(q, k, v)
    n_q, n_k = q4.shape[2], k4.shape[2]
    grid = (q4.shape[0] * q4.shape[1], triton.cdiv(n_q, BLOCK_M))
    # ping-pong: two consumers of 64 rows (one warpgroup each, num_warps is the default partition's); else one
    # consumer of 8 warps; the producer warp comes on top, and maxnreg caps the 12 warps at the register file
    rows_per_consumer = BLOCK_M // 2 if pingpong else BLOCK_M
    flash_fwd_hopper_ws_kernel[grid](
        _descriptor(_flat(q4), rows_per_consumer), _descriptor(_flat(k4), block_n), _descriptor(_flat(v4), block_n),
        o4, lse, n_q, n_k, 1.0 / math.sqrt(d),
        HEAD_DIM=d, BLOCK_M=BLOCK_M, BLOCK_N=block_n, STAGES=stages, IS_CAUSAL=bool(is_causal),
        PINGPONG=bool(pingpong), num_warps=4 if pingpong else 8, maxnreg=WS_MAXNREG,
    )
    return _as_input(q, o4, lse)


def hopper_backward(q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, grad_o: Tensor, is_causal: bool,
                    config: tuple[int, int, int] | None = None, kernel: str | None = None,
                    dq_kernel: str | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """dQ (`dq_kernel`, by default the one set: the Triton kernel, or the pipelined Gluon one; either also writes
    D) and dK, dV (Gluon kernel `kernel`, by default the one set; v6 hands head dims it does not take to v5); the
    caller has checked `unsupported_reason` (and, through `flash_backward`, the backward's own switch)."""
    import triton

    from cs336_systems.flash_attention import hopper_kernels, triton_impl

    d = q.shape[-1]
    kernel = kernel or _settings["backward_kernel"]
    if kernel == "v6" and d not in BWD6_CONFIGS:
        kernel = "v5"
    last_path["backward_kernel"] = kernel
    options: dict[str, Any] = {}
    if kernel == "v6":
        dkdv_kernel, options["num_warps"] = hopper_kernels.flash_bwd_dkdv_hopper_v6_kernel, 4
        options["maxnreg"] = hopper_kernels.WS_MAXNREG
        block_m, block_n, stages = config or BWD6_CONFIGS[d]
    elif kernel == "v5":
        dkdv_kernel, options["num_warps"] = hopper_kernels.flash_bwd_dkdv_hopper_v5_kernel, 4
        block_m, block_n, stages = config or BWD5_CONFIGS[d]
    else:
        dkdv_kernel, options["num_warps"] = hopper_kernels.flash_bwd_dkdv_hopper_kernel, NUM_WARPS
        block_m, block_n, stages = config or BWD_CONFIGS[d]
    kv_rows = 64 if kernel == "v6" else block_n  # v6's K/V copies are one consumer's 64 keys each
    t = triton_impl.BackwardTensors(*(as_4d(x).contiguous() for x in (q, k, v, o, grad_o)), lse, d)
    dq_kernel = dq_kernel or _settings["dq_kernel"]
    last_path["dq_kernel"] = dq_kernel
    if dq_kernel == "gluon":
        hopper_kernels.flash_bwd_dq_hopper_kernel[(t.b * t.h, triton.cdiv(t.n_q, 64))](
            *(_descriptor(_flat(x), 64) for x in (t.q, t.k, t.v, t.do)), t.o, t.do, t.lse, t.delta, t.dq,
            t.n_q, t.n_k, t.sm_scale,
            HEAD_DIM=d, BLOCK_M=64, BLOCK_N=64, STAGES=DQ_STAGES[d], IS_CAUSAL=bool(is_causal), num_warps=4,
        )
    elif triton_impl._settings["descriptors"] and triton_impl._ready_for_descriptors(t):
        triton_impl.launch_dq_desc(t, is_causal)
    else:
        triton_impl.launch_dq(t, is_causal)
    grid = (t.b * t.h, triton.cdiv(t.n_k, block_n))
    dkdv_kernel[grid](
        _descriptor(_flat(t.q), block_m), _descriptor(_flat(t.k), kv_rows), _descriptor(_flat(t.v), kv_rows),
        _descriptor(_flat(t.do), block_m), t.lse, t.delta, t.dk, t.dv,
        t.n_q, t.n_k, t.sm_scale,
        HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n, STAGES=stages, IS_CAUSAL=bool(is_causal),
        **options,
    )
    grads = [g.squeeze(1) if like.ndim == 3 else g for g, like in ((t.dq, q), (t.dk, k), (t.dv, v))]
    return grads[0], grads[1], grads[2]


def flash_backward(q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, grad_o: Tensor,
                   is_causal: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The Gluon dK/dV backward where it applies, else the portable one (Triton on CUDA, PyTorch elsewhere)."""
    reason = backward_unsupported_reason(q, k, v)
    last_path["backward"] = reason
    last_path["backward_kernel"] = ""  # hopper_backward names the kernel it launches
    if not reason:
        return hopper_backward(q, k, v, o, lse, grad_o, is_causal)
    if q.device.type == "cuda":
        from cs336_systems.flash_attention import triton_impl

        return triton_impl.flash_backward(q, k, v, o, lse, grad_o, is_causal)
    return pytorch_impl.flash_backward(q, k, v, o, lse, grad_o, is_causal)


def flash_forward(q: Tensor, k: Tensor, v: Tensor, is_causal: bool) -> tuple[Tensor, Tensor]:
    """The Gluon forward where it applies, else the portable one (Triton on CUDA, PyTorch elsewhere)."""
    reason = unsupported_reason(q, k, v)
    last_path["forward"] = reason
    last_path["forward_kernel"] = "" if reason else _settings["forward"]
    if not reason:
        if _settings["forward"] == "ws":
            return hopper_forward_ws(q, k, v, is_causal)
        if _settings["forward"] == "triton":
            from cs336_systems.flash_attention import triton_impl

            return triton_impl.flash_forward(q, k, v, is_causal)
        return hopper_forward(q, k, v, is_causal)
    if q.device.type == "cuda":
        from cs336_systems.flash_attention import triton_impl

        return triton_impl.flash_forward(q, k, v, is_causal)
    return pytorch_impl.flash_forward(q, k, v, is_causal)


class FlashAttentionHopper(torch.autograd.Function):
    """`FlashAttentionHopper.apply(q, k, v, is_causal=False)`: the Gluon forward and dK/dV kernels on Hopper (dQ
    from the Triton kernel);
    off Hopper or for inputs the Gluon kernel does not take, the same portable kernels as FlashAttentionTriton
    (PyTorch on a CPU). Saves Q, K, V, O and L."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, is_causal: bool = False) -> Tensor:
        check_qkv(q, k, v)
        o, lse = flash_forward(q, k, v, bool(is_causal))
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.is_causal = bool(is_causal)
        return o

    @staticmethod
    def backward(ctx, grad_o: Tensor):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = flash_backward(q, k, v, o, lse, grad_o, ctx.is_causal)
        return dq, dk, dv, None
