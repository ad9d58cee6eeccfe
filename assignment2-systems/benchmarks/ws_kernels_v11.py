"""v11, an experiment kept for the record (benchmarks/NOTES.md, "v11"): the forward and the split backward under
Triton's own Hopper warp specialisation. Falsified on an H100: every kernel slower than the default it would
replace, and wrong on the GPU in places (NaN rows); not part of `cs336_systems`. `tune_kernels.py --round v11`
times these beside the defaults, `compile_check_ws.py` shows what the compiler built.

Why it was tried: at the leaderboard shape the descriptor kernels (`triton_kernels_desc`) are held by
register-limited occupancy, not by waits (NOTES.md, v10): three 4-warp programs per SM at 168 registers, each
running its products and its exponentials one after another. FlashAttention-3 instead runs one producer warpgroup
that only issues TMA copies and gives its registers away (`setmaxnreg`), and two consumer warpgroups of ~240
registers that each own half of the tile. Triton 3.6 builds that structure itself on sm_90 (its
`nvgpu-warp-specialization` pass, from Meta) for a loop marked `tl.range(..., warp_specialize=True)` in a 4-warp
kernel: a producer partition for the loop's descriptor loads and two consumer partitions of 4 warps (232
registers requested each), the tile's first dimension split between them.

What that pass takes, found by compiling for sm_90 without a GPU: descriptor loads (not pointer loads) for
everything the partitioned loop reads, 1-D descriptors for the per-row vectors (L₂, Delta), no reduction
before the loop (Delta comes from `triton_kernels.flash_bwd_preprocess_kernel`), no descriptor store of a
partitioned tile (the epilogue stores through pointers), and one loop: a masked diagonal loop before or after
the specialised one breaks the pass or stops it, so the causal mask is applied on every tile. Tiles are rows of
2-D descriptors over (batch·heads·seq, d): the sequence length must be a multiple of 128, d = 64, and the
tensors contiguous. The descriptors are made in the kernel (`tl.make_tensor_descriptor`): the pass hands each
consumer its half of a partitioned tile by halving the descriptor's block, which a host-made descriptor, encoded
with the whole block before the launch, would not follow (its copies would overrun the half-size buffers).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _rows(x, rows, block: tl.constexpr, HEAD_DIM: tl.constexpr):
    """A descriptor of `block` rows over the (rows, HEAD_DIM) matrix at x."""
    return tl.make_tensor_descriptor(x, [rows, HEAD_DIM], [HEAD_DIM, 1], [block, HEAD_DIM])


@triton.jit
def _vector(x, rows, block: tl.constexpr):
    return tl.make_tensor_descriptor(x, [rows], [1], [block])


@triton.jit
def _key_tile(q, k_desc, v_desc, row0, start_n, offs_m, qk_scale, IS_CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr):
    """K, V of one key tile and Q·Kᵀ: raw without a mask, scaled by qk_scale and causally masked with one."""
    k = k_desc.load([row0 + start_n, 0])
    v = v_desc.load([row0 + start_n, 0])
    qk = tl.dot(q, tl.trans(k))
    if IS_CAUSAL:
        offs_n = start_n + tl.arange(0, BLOCK_N)
        qk = tl.where(offs_m[:, None] >= offs_n[None, :], qk * qk_scale, float("-inf"))
    return k, v, qk


@triton.jit
def _backward_descriptors(Q, K, V, DO, L2, Delta, N_CTX, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr):
    """q, dO by query tiles, k, v by key tiles, L₂ and Delta by query tiles, over every head's rows."""
    rows = tl.num_programs(0) * N_CTX
    return (_rows(Q, rows, BLOCK_M, HEAD_DIM), _rows(K, rows, BLOCK_N, HEAD_DIM), _rows(V, rows, BLOCK_N, HEAD_DIM),
            _rows(DO, rows, BLOCK_M, HEAD_DIM), _vector(L2, rows, BLOCK_M), _vector(Delta, rows, BLOCK_M))


@triton.jit
def flash_bwd_dkdv_ws_kernel(
    Q, K, V, DO, L2, Delta, DK, DV,
    N_CTX, sm_scale,
    HEAD_DIM: tl.constexpr, IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program = one key tile of one (batch, head); grid (batch·heads, N_CTX / BLOCK_N). Keys × queries
    form as in `triton_kernels_desc` (K, V the register operands); the two consumers take 64 keys each."""
    bh = tl.program_id(0)
    pid_n = tl.program_id(1)  # under a causal mask low key tiles see the most queries: they launch first
    sm_scale = tl.cast(sm_scale, tl.float32)
    q_desc, k_desc, v_desc, do_desc, l2_desc, delta_desc = _backward_descriptors(Q, K, V, DO, L2, Delta, N_CTX,
                                                                                 HEAD_DIM, BLOCK_M, BLOCK_N)
    row0 = bh * N_CTX
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = k_desc.load([row0 + start_n, 0])
    v = v_desc.load([row0 + start_n, 0])
    qk_scale = sm_scale * 1.4426950408889634
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    lo = start_n if IS_CAUSAL else 0  # queries < start_n see none of these keys
    for start_m in tl.range(lo, N_CTX, BLOCK_M, warp_specialize=True):
        q = q_desc.load([row0 + start_m, 0])
        do = do_desc.load([row0 + start_m, 0])
        l2 = l2_desc.load([row0 + start_m])
        delta = delta_desc.load([row0 + start_m])
        qk_t = tl.dot(k, tl.trans(q))
        if IS_CAUSAL:
            offs_m = start_m + tl.arange(0, BLOCK_M)
            qk_t = tl.where(offs_m[None, :] >= offs_n[:, None], qk_t * qk_scale, float("-inf"))
            p_t = tl.math.exp2(qk_t - l2[None, :])
        else:
            p_t = tl.math.exp2(qk_t * qk_scale - l2[None, :])
        dv = tl.dot(p_t.to(do.dtype), do, dv)
        dp_t = tl.dot(v, tl.trans(do))
        ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
        dk = tl.dot(ds_t, q, dk)
    offs_d = tl.arange(0, HEAD_DIM)
    out = (row0 + offs_n).to(tl.int64)[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DK + out, (dk * sm_scale).to(DK.dtype.element_ty))
    tl.store(DV + out, dv.to(DV.dtype.element_ty))


@triton.jit
def flash_bwd_dq_ws_kernel(
    Q, K, V, DO, L2, Delta, DQ,
    N_CTX, sm_scale,
    HEAD_DIM: tl.constexpr, IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program = one query tile of one (batch, head); grid (batch·heads, N_CTX / BLOCK_M); the two consumers
    take 64 queries each. L₂ and Delta come from the preprocess kernel."""
    bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    if IS_CAUSAL:  # the longest query tiles of every head launch first
        pid_m = tl.num_programs(1) - 1 - pid_m
    sm_scale = tl.cast(sm_scale, tl.float32)
    q_desc, k_desc, v_desc, do_desc, l2_desc, delta_desc = _backward_descriptors(Q, K, V, DO, L2, Delta, N_CTX,
                                                                                 HEAD_DIM, BLOCK_M, BLOCK_N)
    row0 = bh * N_CTX
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q = q_desc.load([row0 + start_m, 0])
    do = do_desc.load([row0 + start_m, 0])
    l2 = l2_desc.load([row0 + start_m])
    delta = delta_desc.load([row0 + start_m])
    qk_scale = sm_scale * 1.4426950408889634
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    hi = start_m + BLOCK_M if IS_CAUSAL else N_CTX
    for start_n in tl.range(0, hi, BLOCK_N, warp_specialize=True):
        k, v, qk = _key_tile(q, k_desc, v_desc, row0, start_n, offs_m, qk_scale, IS_CAUSAL, BLOCK_N)
        if IS_CAUSAL:
            p = tl.math.exp2(qk - l2[:, None])
        else:
            p = tl.math.exp2(qk * qk_scale - l2[:, None])
        dp = tl.dot(do, tl.trans(v))
        ds = (p * (dp - delta[:, None])).to(k.dtype)
        dq = tl.dot(ds, k, dq)
    offs_d = tl.arange(0, HEAD_DIM)
    out = (row0 + offs_m).to(tl.int64)[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DQ + out, (dq * sm_scale).to(DQ.dtype.element_ty))


@triton.jit
def flash_fwd_ws_kernel(
    Q, K, V, Out, L,
    N_CTX, sm_scale,
    HEAD_DIM: tl.constexpr, IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The forward (O and the natural-log L, both contiguous) under the same warp specialisation: one program =
    one query tile of 128 of one (batch, head), the two consumers 64 queries each; grid (batch·heads,
    N_CTX / BLOCK_M), the longest causal tiles first. As in the backward, one loop with the causal mask on every
    tile (a loop for the diagonal tiles alone, before or after, keeps the pass from specialising)."""
    bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    if IS_CAUSAL:
        pid_m = tl.num_programs(1) - 1 - pid_m
    sm_scale = tl.cast(sm_scale, tl.float32)
    rows = tl.num_programs(0) * N_CTX
    q_desc = _rows(Q, rows, BLOCK_M, HEAD_DIM)
    k_desc, v_desc = _rows(K, rows, BLOCK_N, HEAD_DIM), _rows(V, rows, BLOCK_N, HEAD_DIM)
    row0 = bh * N_CTX
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q = q_desc.load([row0 + start_m, 0])
    qk_scale = sm_scale * 1.4426950408889634
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    hi = start_m + BLOCK_M if IS_CAUSAL else N_CTX
    for start_n in tl.range(0, hi, BLOCK_N, warp_specialize=True):
        _, v, qk = _key_tile(q, k_desc, v_desc, row0, start_n, offs_m, qk_scale, IS_CAUSAL, BLOCK_N)
        if IS_CAUSAL:
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            p = tl.math.exp2(qk - m_new[:, None])
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            p = tl.math.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    acc = acc / l_i[:, None]
    offs_d = tl.arange(0, HEAD_DIM)
    rows = (row0 + offs_m).to(tl.int64)
    tl.store(Out + rows[:, None] * HEAD_DIM + offs_d[None, :], acc.to(Out.dtype.element_ty))
    tl.store(L + rows, (m_i + tl.math.log2(l_i)) * 0.6931471805599453)


# ---------------------------------------------------------------------------------------------- launchers
# (BLOCK_M, BLOCK_N, warps, stages): what the GPU run timed (results/tune_v11_ws_h100.json); 4 warps is what the
# pass specialises
FWD_CONFIGS = [(128, 64, 4, 3), (128, 64, 4, 2), (128, 128, 4, 2), (128, 128, 4, 3)]
DQ_CONFIGS = [(128, 64, 4, 3), (128, 64, 4, 2), (128, 32, 4, 3), (128, 128, 4, 2)]
DKDV_CONFIGS = [(64, 128, 4, 2), (64, 128, 4, 3), (32, 128, 4, 2), (32, 128, 4, 3)]


def _scratch(size: int, alignment: int, stream):
    """Global memory for the descriptors the kernels make on the device."""
    import torch

    return torch.empty(size, dtype=torch.int8, device="cuda")


def _check(*tensors) -> None:
    for x in tensors:
        if not x.is_contiguous() or x.shape[-1] != 64 or x.shape[-2] % 128:
            raise ValueError(f"v11's kernels take contiguous (..., seq % 128 == 0, 64) tensors, got {tuple(x.shape)}")


def _launch(kernel, grid: tuple, args: tuple, head_dim: int, causal: bool, cfg: tuple):
    """One launch of a v11 kernel with tile config cfg; returns the compiled kernel."""
    triton.set_allocator(_scratch)
    return kernel[grid](*args, HEAD_DIM=head_dim, IS_CAUSAL=causal, BLOCK_M=cfg[0], BLOCK_N=cfg[1],
                        num_warps=cfg[2], num_stages=cfg[3])


def launch_fwd(q, k, v, o, lse, causal: bool, cfg: tuple):
    """O and the natural-log L (both preallocated, contiguous) of (batch, heads, seq, 64) q, k, v."""
    _check(q, k, v, o)
    b, h, n, d = q.shape
    return _launch(flash_fwd_ws_kernel, (b * h, n // cfg[0]), (q, k, v, o, lse, n, 1.0 / d**0.5), d, causal, cfg)


def launch_dq(t, causal: bool, cfg: tuple):
    """dQ into t.dq; t is `triton_impl.BackwardTensors` with t.l2 and t.delta from `launch_preprocess`."""
    _check(t.q, t.k, t.v, t.do, t.dq)
    args = (t.q, t.k, t.v, t.do, t.l2, t.delta, t.dq, t.n_q, t.sm_scale)
    return _launch(flash_bwd_dq_ws_kernel, (t.b * t.h, t.n_q // cfg[0]), args, t.d_pad, causal, cfg)


def launch_dkdv(t, causal: bool, cfg: tuple):
    """dK, dV into t.dk, t.dv (as `launch_dq`)."""
    _check(t.q, t.k, t.v, t.do, t.dk, t.dv)
    args = (t.q, t.k, t.v, t.do, t.l2, t.delta, t.dk, t.dv, t.n_q, t.sm_scale)
    return _launch(flash_bwd_dkdv_ws_kernel, (t.b * t.h, t.n_k // cfg[1]), args, t.d_pad, causal, cfg)
