"""FlashAttention-2 as a `torch.autograd.Function` over the Triton kernels in `triton_kernels`.

Tile sizes are autotuned per (head dim, dtype width) from a few configs each (compiles in seconds);
set CS336_FA2_AUTOTUNE=0 to use the first config of each list without tuning (fast test runs).
The backward comes in two forms, chosen by CS336_FA2_BWD or `set_backward_mode`:
"split" (default): one kernel for dK/dV per key tile and one for dQ per query tile, no atomics;
"atomic": the dK/dV kernel also adds dQ into a float32 buffer with atomics (saves recomputing P and dP);
"concurrent": D preprocess, then the dQ kernel on a side stream while the dK/dV kernel runs, so each fills the
other's tail of idle SMs;
"tma" (Hopper and newer): like "atomic", but each dQ tile is added by one bulk reduction of the tensor memory
accelerator (`cp.reduce.async.bulk.tensor`) instead of one atomic per element, off the compute threads;
"fused" (Hopper and newer, 2-byte dtypes): the same single dK/dV/dQ kernel built on the tensor-descriptor
dK/dV kernel of `triton_kernels_desc` (falls back to "split" where descriptors cannot run).
On Hopper and newer, for 2-byte dtypes with 16-byte aligned strides, "split" runs the kernels of
`triton_kernels_desc`, which move every tile through tensor descriptors (set CS336_FA2_DESC=0 or
`set_descriptors(False)` for the pointer kernels).
With CS336_FA2_LAUNCH_CACHE=1 or `set_launch_cache(True)`, once the autotuner has chosen a tile for a shape,
later calls of that shape launch the chosen config directly instead of through the autotuner's dispatch, and
the backward's two kernels share q, k, v and dO's tensor descriptors: at small shapes the host's issue time,
not the GPU, sets a call's time (benchmarks/NOTES.md, "The grid on the H100"). Off by default: its GPU test
passed, but its host saving so far measures within the machine's drift (NOTES.md, "The launch cache").
float32 inputs multiply on the tensor cores in tf32 (`set_fp32_precision("ieee")` for exact float32).
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
import triton
from torch import Tensor

from cs336_systems.flash_attention import triton_kernels as tk
from cs336_systems.flash_attention import triton_kernels_desc as tkd
from cs336_systems.flash_attention._common import alloc, as_4d, check_qkv

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BACKWARD_MODES = ("split", "concurrent", "atomic", "tma", "fused", "pipelined")
MAX_HEAD_DIM = 128

_settings: dict[str, Any] = {
    "autotune": os.environ.get("CS336_FA2_AUTOTUNE", "1") != "0",
    "backward": os.environ.get("CS336_FA2_BWD", "split"),
    "fp32_precision": "tf32",
    "descriptors": os.environ.get("CS336_FA2_DESC", "1") != "0",
    "launch_cache": os.environ.get("CS336_FA2_LAUNCH_CACHE", "0") == "1",
    "dkdv_one_loop": os.environ.get("CS336_FA2_DKDV_ONE_LOOP", "0") == "1",
}


def set_backward_mode(mode: str) -> None:
    """"split" (dQ kernel, then dK/dV kernel), "concurrent" (the two on two streams), "atomic" (one kernel,
    float32 atomic dQ), "tma" (one kernel, dQ tiles reduced by the tensor memory accelerator), "fused" (the
    same with tensor descriptors for every tile) or "pipelined" (on Hopper, bf16/fp16, d 64 or 128: the Gluon
    kernels whose products of consecutive tiles interleave, `hopper_impl`'s fa3-v7 dQ and fa3-v5 dK/dV; "split"
    elsewhere)."""
    if mode not in BACKWARD_MODES:
        raise ValueError(f"backward mode must be one of {BACKWARD_MODES}, not {mode!r}")
    _settings["backward"] = mode


def set_fp32_precision(precision: str) -> None:
    """How float32 inputs are multiplied: "tf32" (tensor cores, default), "tf32x3" or "ieee"."""
    if precision not in ("tf32", "tf32x3", "ieee"):
        raise ValueError(f"unknown precision {precision!r}")
    _settings["fp32_precision"] = precision


def set_autotune(enabled: bool) -> None:
    _settings["autotune"] = bool(enabled)


def set_launch_cache(enabled: bool) -> None:
    """Whether a shape the autotuner has seen launches its chosen config directly or goes through
    `triton.autotune`'s dispatch (key building, argument dicts) on every call (the default, for now)."""
    _settings["launch_cache"] = bool(enabled)


def set_dkdv_one_loop(enabled: bool) -> None:
    """Whether the descriptor dK/dV kernel runs its ONE_LOOP form (the causal band unrolled, one masked loop
    over the other query tiles: no products serialised at 3-4 stages under Triton 3.6). Off by default: on an
    H100 it ran slower than the three-loop form (2.16 against 2.08 ms at the leaderboard shape; NOTES.md, v10)."""
    _settings["dkdv_one_loop"] = bool(enabled)


def set_descriptors(enabled: bool) -> None:
    """Whether the split backward may use the tensor-descriptor kernels (where the inputs allow them)."""
    _settings["descriptors"] = bool(enabled)


# (BLOCK_M, BLOCK_N, num_warps, num_stages[, DIRECT[, register cap per thread[, EXP2_POLY]]]); the first of each list is
# the untuned default.
# BLOCK_M is the query tile, BLOCK_N the key tile, in every kernel.
def _fwd_configs(head_dim: int, wide: bool) -> list[tuple]:
    if wide:  # float32: twice the shared memory per tile
        if head_dim <= 64:
            return [(64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 3)]
        return [(64, 32, 4, 2), (64, 64, 4, 2), (128, 32, 8, 2)]
    if head_dim <= 64:  # register caps (sixth entry) measured on the H200: NOTES.md, v6
        return [(128, 64, 8, 3, None, 112), (128, 64, 8, 3, None, 128), (128, 64, 4, 3), (128, 64, 8, 3),
                (64, 64, 4, 3)]
    return [(128, 64, 8, 3), (128, 64, 4, 2), (128, 128, 8, 2), (64, 64, 4, 3)]


# dK/dV configs carry a fifth entry, DIRECT: compute queries × keys (K, V in shared memory) or keys × queries
# (K, V in registers); the second won every measured tile at the leaderboard shape
def _dkdv_configs(head_dim: int, wide: bool) -> list[tuple]:
    if wide:
        if head_dim <= 64:
            return [(32, 64, 4, 2, False), (64, 64, 8, 2, False), (32, 128, 8, 2, False)]
        return [(32, 64, 4, 2, False), (32, 64, 8, 2, False), (16, 64, 4, 2, False)]
    if head_dim <= 64:
        return [(64, 64, 4, 3, False, 152), (64, 64, 4, 3, False, 168), (64, 128, 4, 3, False),
                (16, 128, 4, 4, False), (32, 128, 4, 3, False)]
    return [(64, 128, 8, 2, False), (32, 128, 8, 2, False), (64, 64, 4, 2, False), (32, 64, 4, 3, False)]


# measured slower at the leaderboard shape (NOTES.md, v3) and kept out of the tuned lists; tests still run them
EXTRA_DKDV_CONFIGS = [(64, 128, 4, 3, True), (128, 128, 8, 3, True)]


def _dq_configs(head_dim: int, wide: bool) -> list[tuple]:
    if wide:
        if head_dim <= 64:
            return [(64, 32, 4, 2), (64, 64, 8, 2), (32, 32, 4, 2)]
        return [(64, 32, 4, 2), (32, 32, 4, 2), (64, 32, 8, 2)]
    if head_dim <= 64:
        return [(128, 64, 8, 3, None, 128), (128, 32, 4, 4, None, 168), (64, 64, 4, 2), (64, 64, 4, 3),
                (128, 32, 4, 3)]
    return [(128, 64, 8, 2), (64, 64, 4, 2), (128, 32, 8, 2), (64, 32, 4, 3)]


# the dK/dV kernel that also reduces dQ tiles through the TMA: one more product and a float32 dQ tile live,
# so wider tiles and 8 warps are in the running
def _dkdv_tma_configs(head_dim: int, wide: bool) -> list[tuple]:
    if wide:
        return [(32, 64, 4, 2, False), (32, 64, 8, 2, False), (32, 64, 4, 2, True)]
    if head_dim <= 64:
        return [(64, 128, 8, 3, False), (64, 128, 4, 3, False), (64, 128, 8, 3, True), (128, 128, 8, 3, True),
                (32, 128, 4, 3, False), (64, 64, 4, 3, True)]
    return [(64, 128, 8, 2, False), (64, 64, 4, 2, True), (32, 128, 8, 2, False), (64, 128, 8, 2, True)]


# the tensor-descriptor backward (2-byte dtypes only); (BLOCK_M, BLOCK_N, warps, stages, None, register cap),
# measured on the H200 (NOTES.md, v8)
def _dq_desc_configs(head_dim: int, wide: bool) -> list[tuple]:
    if head_dim <= 64:
        return [(128, 64, 8, 4, None, 128), (128, 64, 8, 3, None, 128), (64, 64, 4, 3)]
    return [(128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3)]


def _dkdv_desc_configs(head_dim: int, wide: bool) -> list[tuple]:
    if head_dim <= 64:
        return [(64, 64, 4, 2, None, 168), (64, 64, 4, 3), (32, 64, 4, 3, None, 128)]
    return [(64, 64, 4, 3), (32, 64, 4, 3), (64, 128, 8, 2)]


# the descriptor dK/dV kernel's ONE_LOOP form: its two fastest tiles on an H100 (NOTES.md, v10: 2.16 and 2.32 ms;
# the unserialised 3- and 4-stage 64 × 64 tiles ran 2.60-2.78 ms, losing the occupancy a third stage costs)
def _dkdv_desc1_configs(head_dim: int, wide: bool) -> list[tuple]:
    if head_dim <= 64:
        return [(64, 64, 4, 2, None, 168), (32, 64, 4, 3, None, 128)]
    return _dkdv_desc_configs(head_dim, wide)


# the descriptor dK/dV kernel that also reduces each dQ tile (backward mode "fused"): a float32 dQ tile and the
# fifth product live, ~30 registers more than "dkdv_desc". Local sm_90a compiles (Triton 3.6, NOTES.md v9): at
# d 64, 64 × 64 × 4 warps 198 registers, 32 × 128 × 8 warps 187, 32 × 64 fits a 168 cap; none of these spill.
# At d 128 every 4-warp tile of 32+ queries spills, so 8 warps there (64 × 64: 242 registers, 32 × 64: 205) or
# 16-query tiles (254)
def _dkdv_fused_configs(head_dim: int, wide: bool) -> list[tuple]:
    if head_dim <= 64:  # 128-key tiles: half the dQ reductions; 32 × 64 capped at 168: three programs per SM
        return [(64, 64, 4, 3), (32, 64, 4, 2, None, 168), (32, 64, 4, 3, None, 168), (32, 128, 8, 2),
                (64, 64, 4, 2), (32, 128, 8, 3), (16, 128, 8, 2), (64, 128, 8, 2)]
    return [(64, 64, 8, 2), (32, 64, 8, 2), (16, 64, 4, 2)]


_CONFIG_LISTS = {"fwd": _fwd_configs, "dkdv": _dkdv_configs, "dq": _dq_configs, "dkdv_tma": _dkdv_tma_configs,
                 "dq_desc": _dq_desc_configs, "dkdv_desc": _dkdv_desc_configs, "dkdv_desc1": _dkdv_desc1_configs,
                 "dkdv_fused": _dkdv_fused_configs}
_KERNELS = {"fwd": tk.flash_fwd_kernel, "dkdv": tk.flash_bwd_dkdv_kernel, "dq": tk.flash_bwd_dq_kernel,
            "dkdv_tma": tk.flash_bwd_dkdv_kernel, "dq_desc": tkd.flash_bwd_dq_desc_kernel,
            "dkdv_desc": tkd.flash_bwd_dkdv_desc_kernel, "dkdv_desc1": tkd.flash_bwd_dkdv_desc_kernel,
            "dkdv_fused": tkd.flash_bwd_dkdv_desc_kernel}
_tuned_cache: dict[tuple, Any] = {}
# (kind, head dim, wide, atomic dQ, N_QUERIES, N_KEYS, IS_CAUSAL, dtype) -> the config the autotuner chose there
_chosen_configs: dict[tuple, triton.Config] = {}
# kind -> (BLOCK_M, BLOCK_N, num_warps, num_stages[, DIRECT]): bypasses tuning (for kernel-tuning scripts)
forced_configs: dict[str, tuple] = {}
# kind -> the compiled kernel of its last untuned launch (registers, spills, SASS for the tuning scripts)
last_compiled: dict[str, Any] = {}


def _meta(cfg: tuple, kind: str) -> dict[str, Any]:
    """Kernel meta-parameters of a config (BLOCK_M, BLOCK_N, warps, stages[, DIRECT[, max registers[,
    EXP2_POLY]]])."""
    meta: dict[str, Any] = {"BLOCK_M": cfg[0], "BLOCK_N": cfg[1]}
    if len(cfg) > 4 and cfg[4] is not None:
        meta["DIRECT"] = cfg[4]
    # one exponential in EXP2_POLY by an FMA-pipe polynomial (inline PTX: not in Triton's CPU interpreter);
    # always passed, since torch.compile's wrapper of user kernels wants every parameter, defaulted or not
    if "EXP2_POLY" in _KERNELS[kind].arg_names:
        poly = cfg[6] if len(cfg) > 6 and cfg[6] else 0
        meta["EXP2_POLY"] = 0 if os.environ.get("TRITON_INTERPRET") == "1" else poly
    return meta


def _launch_options(cfg: tuple) -> dict[str, Any]:
    options: dict[str, Any] = {"num_warps": cfg[2], "num_stages": cfg[3]}
    if len(cfg) > 5 and cfg[5]:
        options["maxnreg"] = cfg[5]  # a register cap per thread, so that more programs share a multiprocessor
    return options


def _set_dq_block(nargs: dict) -> None:
    """Autotune pre-hook: the dQ descriptor's block is the config's query tile."""
    if nargs.get("DQ_DESC") is not None:
        nargs["DQ_DESC"].block_shape = [nargs["BLOCK_M"], nargs["HEAD_DIM"]]


_QUERY_ROW_DESCS = ("Q_DESC", "O_DESC", "DO_DESC", "DQ_DESC", "DQ_ACC_DESC")
_KEY_ROW_DESCS = ("K_DESC", "V_DESC", "DK_DESC", "DV_DESC")


def _set_desc_blocks(nargs: dict) -> None:
    """Autotune pre-hook of the descriptor kernels: blocks of (1, 1, query or key tile, head dim)."""
    for names, rows in ((_QUERY_ROW_DESCS, nargs["BLOCK_M"]), (_KEY_ROW_DESCS, nargs["BLOCK_N"])):
        for name in names:
            if nargs.get(name) is not None:
                nargs[name].block_shape = [1, 1, rows, nargs["HEAD_DIM"]]


def _set_fused_blocks(nargs: dict) -> None:
    """Autotune pre-hook of the fused backward: the descriptors' blocks, and the float32 dQ accumulator cleared
    before every launch (the autotuner's trial runs add into it too; the memset writes what clearing it in
    the preprocess kernel would)."""
    _set_desc_blocks(nargs)
    nargs["DQ_ACC_DESC"].base.zero_()


_PRE_HOOKS = {"dkdv_tma": _set_dq_block, "dq_desc": _set_desc_blocks, "dkdv_desc": _set_desc_blocks,
              "dkdv_desc1": _set_desc_blocks, "dkdv_fused": _set_fused_blocks}


def _launch(kind: str, grid_rows: int, n_bh: int, head_dim: int, wide: bool, args: tuple, consts: dict):
    """Launch kernel `kind` on a (batch·heads, cdiv(grid_rows, tile)) grid, autotuned or with fixed tiles."""
    configs = _CONFIG_LISTS[kind](head_dim, wide)
    tile_of_grid = "BLOCK_N" if kind.startswith("dkdv") else "BLOCK_M"
    pre_hook = _PRE_HOOKS.get(kind)

    def grid(meta):
        return (n_bh, triton.cdiv(grid_rows, meta[tile_of_grid]))

    if kind in forced_configs or not _settings["autotune"] or len(configs) == 1:
        cfg = forced_configs.get(kind, configs[0])
        meta = _meta(cfg, kind)
        if pre_hook is not None:
            pre_hook({**dict(zip(_KERNELS[kind].arg_names, args, strict=False)), **consts, **meta})
        compiled = _KERNELS[kind][grid](*args, **consts, **meta, **_launch_options(cfg))
        last_compiled[kind] = compiled
        return compiled
    key = (kind, head_dim, wide, consts.get("ATOMIC_DQ", False))
    # under torch.compile the kernels are traced, not launched: the autotuner's own path, nothing recorded
    use_cache = _settings["launch_cache"] and not torch.compiler.is_compiling()
    if use_cache:
        nargs = dict(zip(_KERNELS[kind].arg_names, args, strict=False))
        # what `triton.autotune` keys its choice on here: the key arguments and the inputs' dtype
        shape_key = (*key, nargs["N_QUERIES"], nargs["N_KEYS"], consts["IS_CAUSAL"], _dtype_of(args[0]))
        chosen = _chosen_configs.get(shape_key)
        if chosen is not None:  # what the autotuner's dispatch does for a tuned key, minus its bookkeeping
            meta = chosen.all_kwargs()
            if chosen.pre_hook is not None:
                chosen.pre_hook({**nargs, **consts, **meta})
            return _KERNELS[kind][grid](*args, **consts, **meta)
    kernel = _tuned_cache.get(key)
    if kernel is None:
        kernel = triton.autotune(
            configs=[triton.Config(_meta(c, kind), **_launch_options(c), pre_hook=pre_hook) for c in configs],
            key=["N_QUERIES", "N_KEYS", "IS_CAUSAL"],
            reset_to_zero=["DQ_ACC"] if consts.get("ATOMIC_DQ", False) else None,
        )(_KERNELS[kind])
        _tuned_cache[key] = kernel
    result = kernel[grid](*args, **consts)
    if use_cache:
        _chosen_configs[shape_key] = kernel.best_config
    return result


def _dtype_of(x: Any) -> torch.dtype:
    """The dtype of a tensor argument or of a tensor descriptor's tensor."""
    return x.dtype if isinstance(x, Tensor) else x.base.dtype


def _padded_head_dim(d: int) -> int:
    if d > MAX_HEAD_DIM:
        raise ValueError(f"head dimension {d} > {MAX_HEAD_DIM} is not supported by the Triton kernels")
    return max(16, triton.next_power_of_2(d))


def _prep(x: Tensor, d_pad: int) -> Tensor:
    """(b, s, d) or (b, h, s, d) → (b, h, s, d_pad) view (a zero-padded copy only when d is not a power of 2)."""
    x = as_4d(x)
    if x.shape[-1] != d_pad:
        x = torch.nn.functional.pad(x, (0, d_pad - x.shape[-1]))
    return x


def _strides(x: Tensor) -> tuple[int, ...]:
    return tuple(x.stride())


def _precision(dtype: torch.dtype) -> str:
    return _settings["fp32_precision"] if dtype == torch.float32 else "tf32"


def flash_forward(q: Tensor, k: Tensor, v: Tensor, is_causal: bool) -> tuple[Tensor, Tensor]:
    """O (q's shape and dtype) and L (q.shape[:-1], float32) via the Triton forward kernel."""
    d = q.shape[-1]
    d_pad = _padded_head_dim(d)
    q4, k4, v4 = _prep(q, d_pad), _prep(k, d_pad), _prep(v, d_pad)
    b, h, n_q, _ = q4.shape
    n_k = k4.shape[2]
    o4 = alloc((b, h, n_q, d_pad), like=q4)
    lse = alloc((b, h, n_q), like=q4, dtype=torch.float32)
    args = (
        q4, k4, v4, o4, lse,
        *_strides(q4), *_strides(k4), *_strides(v4), *_strides(o4), *_strides(lse),
        h, n_q, n_k, 1.0 / math.sqrt(d),
    )
    consts = {"HEAD_DIM": d_pad, "IS_CAUSAL": bool(is_causal), "PRECISION": _precision(q.dtype)}
    _launch("fwd", n_q, b * h, d_pad, q.dtype == torch.float32, args, consts)
    o = o4[..., :d] if d_pad != d else o4
    if q.ndim == 3:
        o, lse = o.squeeze(1), lse.squeeze(1)
    return o, lse


def flash_backward(
    q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, grad_o: Tensor, is_causal: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """dQ, dK, dV in the inputs' dtype.

    split: the dQ kernel (which also writes D = rowsum(dO ∘ O)) then the dK/dV kernel;
    atomic: D preprocess, the dK/dV kernel adding dQ into float32 with atomics, a cast of dQ."""
    d = q.shape[-1]
    d_pad = _padded_head_dim(d)
    if 0 in grad_o.stride():
        # a broadcast dO (`o.sum().backward()`): the kernels' loads of it could not be vectorised
        grad_o = grad_o.contiguous()
    if _settings["backward"] == "pipelined":
        from cs336_systems.flash_attention import hopper_impl

        if not hopper_impl.unsupported_reason(q, k, v):
            return hopper_impl.hopper_backward(q, k, v, o, lse, grad_o, is_causal, kernel="v5", dq_kernel="gluon")
    t = BackwardTensors(*(_prep(x, d_pad) for x in (q, k, v, o, grad_o)), lse, d)
    if _settings["backward"] in ("atomic", "tma"):
        tma = _settings["backward"] == "tma" and _has_tma(q)
        launch_preprocess(t, zero_dq=True)
        launch_dkdv(t, is_causal, atomic=True, tma=tma)
        launch_dq_convert(t)
    elif _settings["backward"] == "concurrent" and q.is_cuda:
        launch_preprocess(t)
        main, side = torch.cuda.current_stream(q.device), _side_stream(q.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            launch_dq(t, is_causal, compute_delta=False)
        launch_dkdv(t, is_causal)
        main.wait_stream(side)  # later frees/reuses on the main stream are ordered after the dQ kernel
    elif _settings["backward"] == "fused" and _ready_for_descriptors(t):
        launch_fused_desc(t, is_causal)
    elif _settings["descriptors"] and _ready_for_descriptors(t):
        launch_dq_desc(t, is_causal)
        launch_dkdv_desc(t, is_causal)
    else:
        launch_dq(t, is_causal)
        launch_dkdv(t, is_causal)
    grads = []
    for g, like in ((t.dq, q), (t.dk, k), (t.dv, v)):
        g = g[..., :d] if d_pad != d else g
        grads.append(g.squeeze(1) if like.ndim == 3 else g)
    return grads[0], grads[1], grads[2]


def _has_tma(x: Tensor) -> bool:
    """Bulk tensor reductions need Hopper or newer; Triton's CPU interpreter has none (it then runs the
    per-element atomics instead)."""
    if os.environ.get("TRITON_INTERPRET") == "1" or not x.is_cuda:
        return False
    return torch.cuda.get_device_capability(x.device)[0] >= 9


def _ready_for_descriptors(t: BackwardTensors) -> bool:
    """Whether the descriptor backward can run (Hopper or newer, not the interpreter, a 2-byte dtype: the float32
    path keeps the pointer kernels); if so, replaces inputs whose layout a descriptor cannot take (a base or
    stride not 16-byte aligned, a broadcast stride of 0) in t by contiguous copies, ~1% of the kernels' time
    at the leaderboard shape."""
    if not _has_tma(t.q) or t.q.dtype.itemsize != 2:
        return False
    for name in ("q", "k", "v", "o", "do"):
        x = getattr(t, name)
        if not _descriptor_layout(x):
            setattr(t, name, x.contiguous())
    return True


def _descriptor_layout(x: Tensor) -> bool:
    """A TMA descriptor takes x as it is: unit last stride, other strides positive multiples of 16 bytes, a
    16-byte aligned start (storage offsets checked: PyTorch's CUDA allocator aligns every storage to 512
    bytes). torch.compile breaks its graph at this check and runs the backward eagerly, at no measurable cost
    (benchmarks/results/course_harness_v8b_h200.json)."""
    if x.stride(-1) != 1 or x.storage_offset() * x.element_size() % 16:
        return False
    return all(s > 0 and s * x.element_size() % 16 == 0 for s in x.stride()[:-1])


class BackwardTensors:
    """Inputs (as (b, h, s, d_pad) views) and freshly allocated outputs of one backward pass."""

    def __init__(self, q4: Tensor, k4: Tensor, v4: Tensor, o4: Tensor, do4: Tensor, lse: Tensor, d: int):
        self.q, self.k, self.v, self.o, self.do = q4, k4, v4, o4, do4
        self.b, self.h, self.n_q, self.d_pad = q4.shape
        self.n_k = k4.shape[2]
        self.lse = lse.reshape(self.b * self.h, self.n_q).contiguous()
        self.sm_scale = 1.0 / math.sqrt(d)
        self.wide = q4.dtype == torch.float32
        self.precision = _precision(q4.dtype)
        self.delta = alloc((self.b * self.h, self.n_q), like=q4, dtype=torch.float32)
        self.dq = alloc(tuple(q4.shape), like=q4)
        self.dk = alloc(tuple(k4.shape), like=k4)
        self.dv = alloc(tuple(v4.shape), like=v4)
        self.dq_acc: Tensor | None = None
        self.l2: Tensor | None = None  # base-2 logsumexp, written by the descriptor dQ kernel
        self._descriptors: dict[str, Any] = {}

    def descriptor(self, name: str):
        """The tensor descriptor of input or output `name`; with the launch cache on, made once per backward, so
        that the dQ and dK/dV kernels share q, k, v and dO's (each launch's pre-hook sets the block shape it
        needs, and the launcher encodes the TMA map from it while launching, so the next launch may change it)."""
        if not _settings["launch_cache"]:
            return _descriptor(getattr(self, name))
        if name not in self._descriptors:
            self._descriptors[name] = _descriptor(getattr(self, name))
        return self._descriptors[name]


_PRE_BLOCK = 64


def launch_preprocess(t: BackwardTensors, zero_dq: bool = False, write_l2: bool = False) -> None:
    """D = rowsum(dO ∘ O); with zero_dq also allocates the float32 dQ accumulator and clears it; with write_l2
    also t.l2 = L·log₂e (what the descriptor dK/dV kernel reads when no descriptor dQ kernel ran first)."""
    if zero_dq:
        t.dq_acc = torch.empty((t.b * t.h, t.n_q, t.d_pad), dtype=torch.float32, device=t.q.device)
    if write_l2:
        t.l2 = torch.empty_like(t.delta)
    grid = (t.b * t.h, triton.cdiv(t.n_q, _PRE_BLOCK))
    tk.flash_bwd_preprocess_kernel[grid](
        t.o, t.do, t.delta, t.dq_acc if zero_dq else t.delta, t.lse, t.l2 if write_l2 else t.delta,
        *_strides(t.o), *_strides(t.do), t.h, t.n_q,
        HEAD_DIM=t.d_pad, BLOCK_M=_PRE_BLOCK, ZERO_DQ=zero_dq, WRITE_L2=write_l2, num_warps=4,
    )


_side_streams: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    if device not in _side_streams:
        _side_streams[device] = torch.cuda.Stream(device)
    return _side_streams[device]


def launch_dq(t: BackwardTensors, is_causal: bool, compute_delta: bool = True):
    args = (
        t.q, t.k, t.v, t.o, t.do, t.lse, t.delta, t.dq,
        *_strides(t.q), *_strides(t.k), *_strides(t.v), *_strides(t.o), *_strides(t.do), *_strides(t.dq),
        t.h, t.n_q, t.n_k, t.sm_scale,
    )
    consts = {"HEAD_DIM": t.d_pad, "IS_CAUSAL": bool(is_causal), "COMPUTE_DELTA": compute_delta,
              "PRECISION": t.precision}
    return _launch("dq", t.n_q, t.b * t.h, t.d_pad, t.wide, args, consts)


def launch_dkdv(t: BackwardTensors, is_causal: bool, atomic: bool = False, tma: bool = False):
    """dK, dV; with `atomic` also dQ into t.dq_acc (zeroed here unless launch_preprocess did it), per
    element or, with `tma`, per tile through a tensor descriptor."""
    if atomic and t.dq_acc is None:
        t.dq_acc = torch.zeros((t.b * t.h, t.n_q, t.d_pad), dtype=torch.float32, device=t.q.device)
    desc = None
    if atomic and tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        rows = t.b * t.h * t.n_q
        # block_shape is set per config by _set_dq_block
        desc = TensorDescriptor(t.dq_acc, [rows, t.d_pad], [t.d_pad, 1], [16, t.d_pad])
    args = (
        t.q, t.k, t.v, t.do, t.lse, t.delta, t.dk, t.dv, t.dq_acc if atomic else t.dk, desc,
        *_strides(t.q), *_strides(t.k), *_strides(t.v), *_strides(t.do), *_strides(t.dk), *_strides(t.dv),
        t.h, t.n_q, t.n_k, t.sm_scale,
    )
    consts = {"HEAD_DIM": t.d_pad, "IS_CAUSAL": bool(is_causal), "ATOMIC_DQ": atomic, "PRECISION": t.precision,
              "DQ_TMA": bool(atomic and tma)}
    return _launch("dkdv_tma" if desc is not None else "dkdv", t.n_k, t.b * t.h, t.d_pad, t.wide, args, consts)


def _descriptor(x: Tensor, rows: int = 16):
    """A 4-D (batch, heads, seq, d) descriptor of x, blocks of `rows` rows (the launchers of autotuned kernels
    set them per config through _set_desc_blocks)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor(x, list(x.shape), list(x.stride()), [1, 1, rows, x.shape[-1]])


def launch_dq_desc(t: BackwardTensors, is_causal: bool):
    """dQ, Delta and L₂ = L·log₂e (for the dK/dV kernel that follows) through tensor descriptors."""
    if t.l2 is None:
        t.l2 = torch.empty_like(t.delta)
    args = (
        *(t.descriptor(name) for name in ("q", "k", "v", "o", "do", "dq")), t.lse, t.delta, t.l2,
        t.h, t.n_q, t.n_k, t.sm_scale,
    )
    consts = {"HEAD_DIM": t.d_pad, "IS_CAUSAL": bool(is_causal)}
    return _launch("dq_desc", t.n_q, t.b * t.h, t.d_pad, t.wide, args, consts)


def launch_dkdv_desc(t: BackwardTensors, is_causal: bool, fused_dq: bool = False, one_loop: bool | None = None):
    """dK, dV through tensor descriptors; needs t.l2 and t.delta from launch_dq_desc, or with fused_dq from
    launch_fused_desc's preprocess, and then also adds dQ (unscaled) into t.dq_acc. one_loop (default: the
    `set_dkdv_one_loop` setting; split backward only) runs the kernel's ONE_LOOP form."""
    one_loop = (_settings["dkdv_one_loop"] if one_loop is None else one_loop) and not fused_dq
    dq_acc = t.descriptor("dq_acc") if fused_dq else None
    args = (
        *(t.descriptor(name) for name in ("q", "k", "v", "do", "dk", "dv")), dq_acc, t.l2, t.delta,
        t.h, t.n_q, t.n_k, t.sm_scale,
    )
    consts = {"HEAD_DIM": t.d_pad, "IS_CAUSAL": bool(is_causal), "FUSED_DQ": fused_dq, "ONE_LOOP": one_loop}
    kind = "dkdv_fused" if fused_dq else ("dkdv_desc1" if one_loop else "dkdv_desc")
    return _launch(kind, t.n_k, t.b * t.h, t.d_pad, t.wide, args, consts)


def launch_fused_desc(t: BackwardTensors, is_causal: bool) -> None:
    """The fused backward: Delta and L₂; one kernel for dK, dV and dQ's tiles (bulk-reduced into a float32
    accumulator, cleared by the launch's pre-hook); dQ scaled and cast. Five products per score tile where the
    split backward runs seven."""
    launch_preprocess(t, write_l2=True)
    # (batch, heads, queries, d): the 4-D descriptor's shape, the convert kernel's (batch·heads, queries, d) memory
    t.dq_acc = torch.empty((t.b, t.h, t.n_q, t.d_pad), dtype=torch.float32, device=t.q.device)
    launch_dkdv_desc(t, is_causal, fused_dq=True)
    launch_dq_convert(t, scale=t.sm_scale)


def launch_dq_convert(t: BackwardTensors, scale: float = 1.0) -> None:
    grid = (t.b * t.h, triton.cdiv(t.n_q, _PRE_BLOCK))
    tk.flash_bwd_dq_convert_kernel[grid](
        t.dq_acc, t.dq, *_strides(t.dq), t.h, t.n_q, scale, HEAD_DIM=t.d_pad, BLOCK_M=_PRE_BLOCK, num_warps=4
    )


class FlashAttentionTriton(torch.autograd.Function):
    """`FlashAttentionTriton.apply(q, k, v, is_causal=False)` on CUDA tensors of shape (b, s, d) or (b, h, s, d);
    saves Q, K, V, O and L (shape q.shape[:-1], float32)."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, is_causal: bool = False) -> Tensor:
        check_qkv(q, k, v, allowed_dtypes=SUPPORTED_DTYPES)
        if q.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"the Triton FlashAttention needs CUDA tensors; got {q.device}")
        o, lse = flash_forward(q, k, v, bool(is_causal))
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.is_causal = bool(is_causal)
        return o

    @staticmethod
    def backward(ctx, grad_o: Tensor):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = flash_backward(q, k, v, o, lse, grad_o, ctx.is_causal)
        return dq, dk, dv, None
