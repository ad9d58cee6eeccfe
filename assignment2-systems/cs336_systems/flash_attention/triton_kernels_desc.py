"""The split backward (dQ kernel, then dK/dV kernel) with every Q, K, V, O, dO tile moved by the tensor memory
accelerator through host-made tensor descriptors (Hopper and newer, 2-byte dtypes).

Why a second copy of `triton_kernels`' backward: with per-element pointer tiles, each program holds 64-bit
addresses for every element it loads, and at d = 64 that pushes the dK/dV kernel (255 registers uncapped) and
the capped dQ kernel past what ptxas needs to pipeline warpgroup products: it then waits for every 64×N×16
product before issuing the next one ("wgmma.mma_async instructions are serialized due to insufficient register
resources", 48 waits for 48 products). A descriptor load needs one coordinate per dimension, so the same
dK/dV tile fits in 168-179 registers with one wait per product (local sm_90 SASS, NOTES.md v8), and the
out-of-bounds rows of a ragged tile come back as zeros without masks.

Descriptors are 4-D, (batch, heads, seq, d) with the tensor's own strides and blocks (1, 1, rows, d): a tile
that runs past a head's last row is clipped at that head, never read from the next one.
The dK/dV kernel also runs the "fused" backward (FUSED_DQ): it adds each dQ tile into a float32 accumulator by
a bulk reduction of the tensor memory accelerator, between `triton_kernels`' preprocess (Delta, L₂) and its
scale-and-cast of dQ; measured slower than the split pair at the leaderboard shape (NOTES.md, v9).
Conventions otherwise as in `triton_kernels` (base-2 scores, top-left causal mask, natural-log L).
"""

from __future__ import annotations

import triton
import triton.language as tl

from cs336_systems.flash_attention.triton_kernels import _masked_scores


@triton.jit
def _dq_key_loop(
    dq, q, do, l2, delta, k_desc, v_desc, b, h, offs_m, offs_n_base, lo, hi, qk_scale, N_KEYS,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL_MASK: tl.constexpr, KEY_MASK: tl.constexpr,
):
    """Accumulate dQ (unscaled) of one query tile over key tiles [lo, hi)."""
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + offs_n_base
        k = k_desc.load([b, h, start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
        v = v_desc.load([b, h, start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
        qk = tl.dot(q, tl.trans(k))
        if CAUSAL_MASK or KEY_MASK:
            qk = _masked_scores(qk, offs_m, offs_n, qk_scale, N_KEYS, CAUSAL_MASK, KEY_MASK)
            p = tl.math.exp2(qk - l2[:, None])
        else:
            p = tl.math.exp2(qk * qk_scale - l2[:, None])
        dp = tl.dot(do, tl.trans(v))
        ds = (p * (dp - delta[:, None])).to(k.dtype)
        dq = tl.dot(ds, k, dq)
    return dq


@triton.jit
def flash_bwd_dq_desc_kernel(
    Q_DESC, K_DESC, V_DESC, O_DESC, DO_DESC, DQ_DESC, L, Delta, L2,
    N_HEADS, N_QUERIES, N_KEYS, sm_scale,
    HEAD_DIM: tl.constexpr, IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program = one query tile of one (batch, head); grid (batch·heads, cdiv(N_QUERIES, BLOCK_M)).

    It runs first: besides dQ it writes, for the dK/dV kernel, Delta = rowsum(O ∘ dO) and L₂ = L·log₂e
    (both (batch·heads, N_QUERIES) float32), so that kernel has one multiply per score fewer."""
    tl.static_assert(BLOCK_M % BLOCK_N == 0)
    bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    if IS_CAUSAL:  # the longest query tiles of every head launch first
        pid_m = tl.num_programs(1) - 1 - pid_m
    sm_scale = tl.cast(sm_scale, tl.float32)
    b = bh // N_HEADS
    h = bh % N_HEADS
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    row_ok = offs_m < N_QUERIES

    q = Q_DESC.load([b, h, start_m, 0]).reshape(BLOCK_M, HEAD_DIM)
    do = DO_DESC.load([b, h, start_m, 0]).reshape(BLOCK_M, HEAD_DIM)
    o = O_DESC.load([b, h, start_m, 0]).reshape(BLOCK_M, HEAD_DIM)
    row_base = bh.to(tl.int64) * N_QUERIES
    # padded query rows get L = +inf, hence P = 0
    l2 = tl.load(L + row_base + offs_m, mask=row_ok, other=float("inf")) * 1.4426950408889634
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(Delta + row_base + offs_m, delta, mask=row_ok)
    tl.store(L2 + row_base + offs_m, l2, mask=row_ok)

    qk_scale = sm_scale * 1.4426950408889634
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    full_keys = (N_KEYS // BLOCK_N) * BLOCK_N
    if IS_CAUSAL:
        hi = tl.minimum(start_m + BLOCK_M, N_KEYS)
        mid = tl.minimum(start_m, full_keys)
        dq = _dq_key_loop(dq, q, do, l2, delta, K_DESC, V_DESC, b, h, offs_m, offs_n, 0, mid, qk_scale, N_KEYS,
                          BLOCK_N, HEAD_DIM, False, False)
        dq = _dq_key_loop(dq, q, do, l2, delta, K_DESC, V_DESC, b, h, offs_m, offs_n, mid, hi, qk_scale, N_KEYS,
                          BLOCK_N, HEAD_DIM, True, True)
    else:
        dq = _dq_key_loop(dq, q, do, l2, delta, K_DESC, V_DESC, b, h, offs_m, offs_n, 0, full_keys, qk_scale,
                          N_KEYS, BLOCK_N, HEAD_DIM, False, False)
        dq = _dq_key_loop(dq, q, do, l2, delta, K_DESC, V_DESC, b, h, offs_m, offs_n, full_keys, N_KEYS, qk_scale,
                          N_KEYS, BLOCK_N, HEAD_DIM, False, True)
    dq = dq * sm_scale
    DQ_DESC.store([b, h, start_m, 0], dq.to(DQ_DESC.dtype).reshape(1, 1, BLOCK_M, HEAD_DIM))


@triton.jit
def _dkdv_query_loop(
    dk, dv, k, v, q_desc, do_desc, dq_desc, l2_ptrs, delta_ptrs, b, h, offs_n, offs_m_base, lo, hi, qk_scale,
    N_QUERIES, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL_MASK: tl.constexpr, QUERY_MASK: tl.constexpr,
    FUSED_DQ: tl.constexpr,
):
    """Accumulate dK, dV of one key tile over query tiles [lo, hi), in the keys × queries form (K, V are the
    register operands; P and dS feed dV and dK untransposed). With FUSED_DQ each query tile's share of dQ,
    dS·K (dS the transpose of the dSᵀ just computed; unscaled), is added into the float32 accumulator behind
    dq_desc by one bulk reduction of the tensor memory accelerator: the fifth product, in place of the dQ
    kernel's recomputed S and dP."""
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        dk, dv = _dkdv_tile(dk, dv, k, v, q_desc, do_desc, dq_desc, l2_ptrs, delta_ptrs, b, h, offs_n, offs_m_base,
                            start_m, qk_scale, N_QUERIES, BLOCK_M, HEAD_DIM, CAUSAL_MASK, QUERY_MASK, FUSED_DQ)
    return dk, dv


@triton.jit
def _dkdv_tile(
    dk, dv, k, v, q_desc, do_desc, dq_desc, l2_ptrs, delta_ptrs, b, h, offs_n, offs_m_base, start_m, qk_scale,
    N_QUERIES, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL_MASK: tl.constexpr, QUERY_MASK: tl.constexpr,
    FUSED_DQ: tl.constexpr,
):
    """One query tile's share of dK, dV (and with FUSED_DQ its dQ tile, reduced into the accumulator)."""
    offs_m = start_m + offs_m_base
    q = q_desc.load([b, h, start_m, 0]).reshape(BLOCK_M, HEAD_DIM)
    do = do_desc.load([b, h, start_m, 0]).reshape(BLOCK_M, HEAD_DIM)
    if QUERY_MASK:
        row_ok = offs_m < N_QUERIES
        l2 = tl.load(l2_ptrs + offs_m, mask=row_ok, other=float("inf"))
        delta = tl.load(delta_ptrs + offs_m, mask=row_ok, other=0.0)
    else:
        l2 = tl.load(l2_ptrs + offs_m)
        delta = tl.load(delta_ptrs + offs_m)
    qk_t = tl.dot(k, tl.trans(q))
    if CAUSAL_MASK:
        qk_t = tl.where(offs_m[None, :] >= offs_n[:, None], qk_t * qk_scale, float("-inf"))
        p_t = tl.math.exp2(qk_t - l2[None, :])
    else:
        p_t = tl.math.exp2(qk_t * qk_scale - l2[None, :])
    dv = tl.dot(p_t.to(do.dtype), do, dv)
    dp_t = tl.dot(v, tl.trans(do))
    ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
    dk = tl.dot(ds_t, q, dk)
    if FUSED_DQ:
        dq = tl.dot(tl.trans(ds_t), k)
        dq_desc.atomic_add([b, h, start_m, 0], dq.reshape(1, 1, BLOCK_M, HEAD_DIM))
    return dk, dv


@triton.jit
def flash_bwd_dkdv_desc_kernel(
    Q_DESC, K_DESC, V_DESC, DO_DESC, DK_DESC, DV_DESC, DQ_ACC_DESC, L2, Delta,
    N_HEADS, N_QUERIES, N_KEYS, sm_scale,
    HEAD_DIM: tl.constexpr, IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    FUSED_DQ: tl.constexpr, ONE_LOOP: tl.constexpr = False,
):
    """One program = one key tile of one (batch, head), looping over query tiles; grid (batch·heads,
    cdiv(N_KEYS, BLOCK_N)). L2 (base-2 logsumexp) and Delta come from the dQ kernel, or with FUSED_DQ from
    `triton_kernels.flash_bwd_preprocess_kernel`, and then dQ (unscaled, float32) goes into DQ_ACC_DESC's
    tensor.

    ONE_LOOP: the causal diagonal band unrolled (straight-line code, no loop) and every other query tile in one
    loop whose L₂/Delta loads are always masked, in place of up to three loops (band, interior, ragged tail).
    Triton 3.6 makes ptxas serialise the warpgroup products of a 3-stage tile when pipelined loops follow one
    another ("non wgmma instructions defining accumulator registers", benchmarks/compile_check_desc.py); with
    one loop it does not, at 2, 3 or 4 stages. Opt-in: on an H100 it is slower all the same (its loop masks
    every tile's L₂/Delta loads, and a third stage costs occupancy; benchmarks/NOTES.md, v10)."""
    tl.static_assert(BLOCK_N % BLOCK_M == 0)
    bh = tl.program_id(0)
    pid_n = tl.program_id(1)  # under a causal mask low key tiles see the most queries: they launch first
    sm_scale = tl.cast(sm_scale, tl.float32)
    b = bh // N_HEADS
    h = bh % N_HEADS
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    # key rows past N_KEYS load as zeros; their dK, dV rows are clipped on store and feed nothing else
    k = K_DESC.load([b, h, start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
    v = V_DESC.load([b, h, start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
    row_base = bh.to(tl.int64) * N_QUERIES
    l2_ptrs = L2 + row_base
    delta_ptrs = Delta + row_base

    qk_scale = sm_scale * 1.4426950408889634
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    if ONE_LOOP:
        lo = 0
        if IS_CAUSAL:  # queries < start_n see none of these keys; the band's rows past N_QUERIES get P = 0
            for i in tl.static_range(BLOCK_N // BLOCK_M):
                dk, dv = _dkdv_tile(dk, dv, k, v, Q_DESC, DO_DESC, DQ_ACC_DESC, l2_ptrs, delta_ptrs, b, h, offs_n,
                                    offs_m, start_n + i * BLOCK_M, qk_scale, N_QUERIES, BLOCK_M, HEAD_DIM, True, True,
                                    FUSED_DQ)
            lo = start_n + BLOCK_N
        dk, dv = _dkdv_query_loop(dk, dv, k, v, Q_DESC, DO_DESC, DQ_ACC_DESC, l2_ptrs, delta_ptrs, b, h, offs_n,
                                  offs_m, lo, tl.cdiv(N_QUERIES, BLOCK_M) * BLOCK_M, qk_scale, N_QUERIES, BLOCK_M,
                                  HEAD_DIM, False, True, FUSED_DQ)
    else:
        full_queries = (N_QUERIES // BLOCK_M) * BLOCK_M
        if IS_CAUSAL:
            # queries < start_n see none of these keys; [start_n, start_n + BLOCK_N) is the masked diagonal band
            diag_hi = start_n + BLOCK_N
            dk, dv = _dkdv_query_loop(dk, dv, k, v, Q_DESC, DO_DESC, DQ_ACC_DESC, l2_ptrs, delta_ptrs, b, h, offs_n,
                                      offs_m, start_n, tl.minimum(diag_hi, N_QUERIES), qk_scale, N_QUERIES, BLOCK_M,
                                      HEAD_DIM, True, True, FUSED_DQ)
            lo = diag_hi
        else:
            lo = 0
        # unmasked interior, then the ragged tail
        dk, dv = _dkdv_query_loop(dk, dv, k, v, Q_DESC, DO_DESC, DQ_ACC_DESC, l2_ptrs, delta_ptrs, b, h, offs_n,
                                  offs_m, lo, full_queries, qk_scale, N_QUERIES, BLOCK_M, HEAD_DIM, False, False,
                                  FUSED_DQ)
        dk, dv = _dkdv_query_loop(dk, dv, k, v, Q_DESC, DO_DESC, DQ_ACC_DESC, l2_ptrs, delta_ptrs, b, h, offs_n,
                                  offs_m, tl.maximum(lo, full_queries), N_QUERIES, qk_scale, N_QUERIES, BLOCK_M,
                                  HEAD_DIM, False, True, FUSED_DQ)
    dk = dk * sm_scale
    DK_DESC.store([b, h, start_n, 0], dk.to(DK_DESC.dtype).reshape(1, 1, BLOCK_N, HEAD_DIM))
    DV_DESC.store([b, h, start_n, 0], dv.to(DV_DESC.dtype).reshape(1, 1, BLOCK_N, HEAD_DIM))

