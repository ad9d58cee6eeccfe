"""Triton kernels of FlashAttention-2: forward, the D = rowsum(dO ∘ O) preprocess, dK/dV per key tile,
dQ per query tile (or, in the "atomic" backward, dQ accumulated from the dK/dV kernel in float32).

Conventions shared by every kernel:
- tensors are addressed as (batch, heads, seq, d) through explicit strides; grid axis 1 folds batch × heads;
- scores are kept in base 2: s₂ = q·k · (log₂e/√d), so softmax uses exp2 and L₂ = L · log₂e;
- the logsumexp L saved for backward is the natural-log one (what the course tests compare);
- a causal mask is top-left aligned (query i sees keys 0..i); tiles strictly above the diagonal are never
  visited, diagonal tiles are masked in a separate loop, interior tiles run without any index compares;
- sequence lengths need not be multiples of the tiles: the ragged last tile is masked on load and store;
- the head dimension HEAD_DIM must be a power of two (the wrapper zero-pads other sizes).
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


# ------------------------------------------------------------------------------- exponentials on two pipes
#
# At d = 64 every kernel here spends about as many cycles on exp2 in the special-function unit (16 lanes per
# clock per multiprocessor) as on its matrix products. `_exp2(x, POLY)` sends one element in POLY to the FMA
# pipe instead (Cody-Waite range reduction plus a degree-3 minimax polynomial for 2^f, |f| <= 1/2,
# max relative error 7.5e-5: well under bf16's 3.9e-3) and the rest to MUFU.EX2. POLY = 0 is plain exp2.
# Inputs at or below -126 give ~1e-38 rather than 0, so only loops without masked (-inf) scores use it.


EXP2_POLY_CHOICES = (0, 1, 2, 4, 8)


@triton.jit
def _exp2(x, POLY: tl.constexpr):
    """exp2 of float32 x; with POLY = n, one element in n goes through the FMA-pipe polynomial.

    The PTX of each pack size is written out literally (no module-level constants): torch.compile copies a
    user kernel's source and its jit helpers into generated code, where such constants would be missing.
    Per pack: clamp at -126 (the exponent field stays positive); t = x + 1.5·2^23 puts round(x) in t's low
    mantissa bits; f = x - round(x) in [-1/2, 1/2]; p = 2^f by Horner; round(x) is added to p's exponent;
    the other n - 1 elements take ex2.approx."""
    if POLY == 0:
        return tl.math.exp2(x)
    elif POLY == 1:
        return tl.inline_asm_elementwise(
            (
                "{ .reg .f32 x, t, j, f, p; .reg .b32 tb, pb; max.ftz.f32 x, $1, "
                "0fC2FC0000; add.rn.ftz.f32 t, x, 0f4B400000; sub.rn.ftz.f32 j, t, "
                "0f4B400000; sub.rn.ftz.f32 f, x, j; fma.rn.ftz.f32 p, f, 0f3D61FB53, "
                "0f3E786EE6; fma.rn.ftz.f32 p, p, f, 0f3F31798D; fma.rn.ftz.f32 p, p, "
                "f, 0f3F7FFB4A; mov.b32 tb, t; mov.b32 pb, p; shl.b32 tb, tb, 23; "
                "add.s32 pb, pb, tb; mov.b32 $0, pb; }"
            ), "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1,
        )
    elif POLY == 2:
        return tl.inline_asm_elementwise(
            (
                "{ .reg .f32 x, t, j, f, p; .reg .b32 tb, pb; max.ftz.f32 x, $2, "
                "0fC2FC0000; add.rn.ftz.f32 t, x, 0f4B400000; sub.rn.ftz.f32 j, t, "
                "0f4B400000; sub.rn.ftz.f32 f, x, j; fma.rn.ftz.f32 p, f, 0f3D61FB53, "
                "0f3E786EE6; fma.rn.ftz.f32 p, p, f, 0f3F31798D; fma.rn.ftz.f32 p, p, "
                "f, 0f3F7FFB4A; mov.b32 tb, t; mov.b32 pb, p; shl.b32 tb, tb, 23; "
                "add.s32 pb, pb, tb; mov.b32 $0, pb; } ex2.approx.ftz.f32 $1, $3;"
            ), "=r,=r,r,r", [x], dtype=tl.float32, is_pure=True, pack=2,
        )
    elif POLY == 4:
        return tl.inline_asm_elementwise(
            (
                "{ .reg .f32 x, t, j, f, p; .reg .b32 tb, pb; max.ftz.f32 x, $4, "
                "0fC2FC0000; add.rn.ftz.f32 t, x, 0f4B400000; sub.rn.ftz.f32 j, t, "
                "0f4B400000; sub.rn.ftz.f32 f, x, j; fma.rn.ftz.f32 p, f, 0f3D61FB53, "
                "0f3E786EE6; fma.rn.ftz.f32 p, p, f, 0f3F31798D; fma.rn.ftz.f32 p, p, "
                "f, 0f3F7FFB4A; mov.b32 tb, t; mov.b32 pb, p; shl.b32 tb, tb, 23; "
                "add.s32 pb, pb, tb; mov.b32 $0, pb; } ex2.approx.ftz.f32 $1, $5; "
                "ex2.approx.ftz.f32 $2, $6; ex2.approx.ftz.f32 $3, $7;"
            ), "=r,=r,=r,=r,r,r,r,r", [x], dtype=tl.float32, is_pure=True, pack=4,
        )
    elif POLY == 8:
        return tl.inline_asm_elementwise(
            (
                "{ .reg .f32 x, t, j, f, p; .reg .b32 tb, pb; max.ftz.f32 x, $8, "
                "0fC2FC0000; add.rn.ftz.f32 t, x, 0f4B400000; sub.rn.ftz.f32 j, t, "
                "0f4B400000; sub.rn.ftz.f32 f, x, j; fma.rn.ftz.f32 p, f, 0f3D61FB53, "
                "0f3E786EE6; fma.rn.ftz.f32 p, p, f, 0f3F31798D; fma.rn.ftz.f32 p, p, "
                "f, 0f3F7FFB4A; mov.b32 tb, t; mov.b32 pb, p; shl.b32 tb, tb, 23; "
                "add.s32 pb, pb, tb; mov.b32 $0, pb; } ex2.approx.ftz.f32 $1, $9; "
                "ex2.approx.ftz.f32 $2, $10; ex2.approx.ftz.f32 $3, $11; "
                "ex2.approx.ftz.f32 $4, $12; ex2.approx.ftz.f32 $5, $13; "
                "ex2.approx.ftz.f32 $6, $14; ex2.approx.ftz.f32 $7, $15;"
            ), "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r,r,r,r,r", [x], dtype=tl.float32, is_pure=True, pack=8,
        )
    else:
        tl.static_assert(False, "EXP2_POLY must be one of 0, 1, 2, 4, 8")
        return x


# ---------------------------------------------------------------------------------------------- masks


@triton.jit
def _masked_scores(qk, offs_m, offs_n, qk_scale, N_KEYS, CAUSAL_MASK: tl.constexpr, KEY_MASK: tl.constexpr):
    """Scaled base-2 scores of a (queries × keys) tile with -inf where the causal mask or the ragged last key
    tile hides them; only diagonal and ragged tiles call it (interior tiles fold the scale into the exponent)."""
    if CAUSAL_MASK:
        keep = offs_m[:, None] >= offs_n[None, :]
        if KEY_MASK:
            keep = keep & (offs_n[None, :] < N_KEYS)
    else:
        keep = offs_n[None, :] < N_KEYS
    return tl.where(keep, qk * qk_scale, float("-inf"))


# ---------------------------------------------------------------------------------------------- forward


@triton.jit
def _fwd_key_loop(
    acc, l_i, m_i, q, k_ptrs, v_ptrs, offs_m, offs_n_base,
    lo, hi, stride_kn, stride_vn, qk_scale, N_KEYS,
    BLOCK_N: tl.constexpr, CAUSAL_MASK: tl.constexpr, KEY_MASK: tl.constexpr, PRECISION: tl.constexpr,
    POLY: tl.constexpr = 0,
):
    """Online-softmax update of (acc, l, m) over key tiles [lo, hi); masks are compile-time switches."""
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + offs_n_base
        if KEY_MASK:
            k = tl.load(k_ptrs + start_n * stride_kn, mask=(offs_n < N_KEYS)[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs + start_n * stride_kn)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        if CAUSAL_MASK or KEY_MASK:
            qk = _masked_scores(qk, offs_m, offs_n, qk_scale, N_KEYS, CAUSAL_MASK, KEY_MASK)
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            p = tl.math.exp2(qk - m_new[:, None])
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            p = _exp2(qk * qk_scale - m_new[:, None], POLY)
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if KEY_MASK:
            v = tl.load(v_ptrs + start_n * stride_vn, mask=(offs_n < N_KEYS)[:, None], other=0.0)
        else:
            v = tl.load(v_ptrs + start_n * stride_vn)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def flash_fwd_kernel(
    Q, K, V, Out, L,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lb, stride_lh, stride_lm,
    N_HEADS, N_QUERIES, N_KEYS, sm_scale,
    HEAD_DIM: tl.constexpr, IS_CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EXP2_POLY: tl.constexpr = 0,
):
    """One program = one query tile of one (batch, head); grid (batch·heads, cdiv(N_QUERIES, BLOCK_M)).

    Heads vary fastest, so the longest (causal: last) query tiles of every head launch first."""
    tl.static_assert(BLOCK_M % BLOCK_N == 0)
    bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    if IS_CAUSAL:
        pid_m = tl.num_programs(1) - 1 - pid_m
    sm_scale = tl.cast(sm_scale, tl.float32)  # a float64 scale (torch.compile passes one) would promote acc
    b = (bh // N_HEADS).to(tl.int64)
    h = (bh % N_HEADS).to(tl.int64)
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < N_QUERIES

    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    k_ptrs = K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_ptrs = V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)

    qk_scale = sm_scale * 1.4426950408889634
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    full_keys = (N_KEYS // BLOCK_N) * BLOCK_N
    if IS_CAUSAL:
        hi = tl.minimum(start_m + BLOCK_M, N_KEYS)
        mid = tl.minimum(start_m, full_keys)
        acc, l_i, m_i = _fwd_key_loop(
            acc, l_i, m_i, q, k_ptrs, v_ptrs, offs_m, offs_n, 0, mid, stride_kn, stride_vn, qk_scale, N_KEYS,
            BLOCK_N, False, False, PRECISION, EXP2_POLY,
        )
        acc, l_i, m_i = _fwd_key_loop(
            acc, l_i, m_i, q, k_ptrs, v_ptrs, offs_m, offs_n, mid, hi, stride_kn, stride_vn, qk_scale, N_KEYS,
            BLOCK_N, True, True, PRECISION,
        )
    else:
        acc, l_i, m_i = _fwd_key_loop(
            acc, l_i, m_i, q, k_ptrs, v_ptrs, offs_m, offs_n, 0, full_keys, stride_kn, stride_vn, qk_scale,
            N_KEYS, BLOCK_N, False, False, PRECISION, EXP2_POLY,
        )
        acc, l_i, m_i = _fwd_key_loop(
            acc, l_i, m_i, q, k_ptrs, v_ptrs, offs_m, offs_n, full_keys, N_KEYS, stride_kn, stride_vn, qk_scale,
            N_KEYS, BLOCK_N, False, True, PRECISION,
        )

    acc = acc / l_i[:, None]
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=row_ok[:, None])
    tl.store(L + b * stride_lb + h * stride_lh + offs_m * stride_lm, lse, mask=row_ok)


# ---------------------------------------------------------------------------------------------- backward


@triton.jit
def flash_bwd_preprocess_kernel(
    Out, DO, Delta, DQ_ACC, L, L2,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    N_HEADS, N_QUERIES,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, ZERO_DQ: tl.constexpr, WRITE_L2: tl.constexpr,
):
    """Delta[bh, i] = Σ_d O[i, d]·dO[i, d] in float32 (= rowsum(P ∘ dP)); Delta is (batch·heads, N_QUERIES).

    With ZERO_DQ it also clears its rows of the float32 dQ accumulator (batch·heads, N_QUERIES, HEAD_DIM),
    which saves the atomic backward a memset launch; with WRITE_L2 it writes L₂ = L·log₂e (both like Delta)
    for the descriptor dK/dV kernel, which otherwise gets it from the descriptor dQ kernel."""
    bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = (bh // N_HEADS).to(tl.int64)
    h = (bh % N_HEADS).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    ok = (offs_m < N_QUERIES)[:, None]
    o = tl.load(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
                mask=ok, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                 mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(Delta + bh.to(tl.int64) * N_QUERIES + offs_m, delta, mask=offs_m < N_QUERIES)
    if WRITE_L2:
        rows = bh.to(tl.int64) * N_QUERIES + offs_m
        tl.store(L2 + rows, tl.load(L + rows, mask=offs_m < N_QUERIES) * 1.4426950408889634, mask=offs_m < N_QUERIES)
    if ZERO_DQ:
        zeros = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        tl.store(DQ_ACC + (bh.to(tl.int64) * N_QUERIES + offs_m[:, None]) * HEAD_DIM + offs_d[None, :], zeros, mask=ok)


@triton.jit
def _bwd_dkdv_query_loop(
    dk, dv, k, v, q_ptrs, do_ptrs, l_ptrs, delta_ptrs, dq_ptrs, dq_desc, dq_row0, offs_n, offs_m_base, key_ok,
    lo, hi, stride_qm, stride_dom, stride_dqm, qk_scale, sm_scale, N_QUERIES,
    BLOCK_M: tl.constexpr, CAUSAL_MASK: tl.constexpr, QUERY_MASK: tl.constexpr,
    ATOMIC_DQ: tl.constexpr, DQ_TMA: tl.constexpr, PRECISION: tl.constexpr, DIRECT: tl.constexpr,
    POLY: tl.constexpr = 0,
):
    """Accumulate dK, dV of one key tile over query tiles [lo, hi); DIRECT picks which operands of the
    products live in registers (both forms are autotuned: register pressure decides)."""
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        offs_m = start_m + offs_m_base
        if QUERY_MASK:
            row_ok = offs_m < N_QUERIES
            q = tl.load(q_ptrs + start_m * stride_qm, mask=row_ok[:, None], other=0.0)
            # padded query rows get L = +inf, hence P = 0: they add nothing to dK, dV
            l2 = tl.load(l_ptrs + offs_m, mask=row_ok, other=float("inf")) * 1.4426950408889634
        else:
            q = tl.load(q_ptrs + start_m * stride_qm)
            l2 = tl.load(l_ptrs + offs_m) * 1.4426950408889634
        if QUERY_MASK:
            do = tl.load(do_ptrs + start_m * stride_dom, mask=row_ok[:, None], other=0.0)
            delta = tl.load(delta_ptrs + offs_m, mask=row_ok, other=0.0)
        else:
            do = tl.load(do_ptrs + start_m * stride_dom)
            delta = tl.load(delta_ptrs + offs_m)
        if DIRECT:
            # queries × keys: K and V are the B operands (shared memory), P and dS are transposed for dV, dK
            qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
            if CAUSAL_MASK:
                qk = tl.where(offs_m[:, None] >= offs_n[None, :], qk * qk_scale, float("-inf"))
                p = tl.math.exp2(qk - l2[:, None])
            else:
                p = _exp2(qk * qk_scale - l2[:, None], POLY)
            if ATOMIC_DQ:  # dQ reads every key row: rows past N_KEYS (zero-loaded) must give P = 0
                p = tl.where(key_ok[None, :], p, 0.0)
            dv = tl.dot(tl.trans(p.to(do.dtype)), do, dv, input_precision=PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = (p * (dp - delta[:, None])).to(q.dtype)
            dk = tl.dot(tl.trans(ds), q, dk, input_precision=PRECISION)
            if ATOMIC_DQ:
                dq = tl.dot(ds, k, input_precision=PRECISION) * sm_scale
        else:
            # keys × queries: K and V are the A operands (registers), P and dS feed dV, dK untransposed
            qk_t = tl.dot(k, tl.trans(q), input_precision=PRECISION)
            if CAUSAL_MASK:
                qk_t = tl.where(offs_m[None, :] >= offs_n[:, None], qk_t * qk_scale, float("-inf"))
                p_t = tl.math.exp2(qk_t - l2[None, :])
            else:
                p_t = _exp2(qk_t * qk_scale - l2[None, :], POLY)
            if ATOMIC_DQ:
                p_t = tl.where(key_ok[:, None], p_t, 0.0)
            dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)
            dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
            dk = tl.dot(ds_t, q, dk, input_precision=PRECISION)
            if ATOMIC_DQ:
                dq = tl.dot(tl.trans(ds_t), k, input_precision=PRECISION) * sm_scale
        if ATOMIC_DQ:
            if DQ_TMA:
                # one bulk reduce-add of the whole tile by the copy engine (cp.reduce.async.bulk.tensor);
                # rows past N_QUERIES are exactly zero (P = 0 there), so spilling into the next head adds 0
                dq_desc.atomic_add([dq_row0 + start_m, 0], dq)  # int32 row index
            elif QUERY_MASK:
                tl.atomic_add(dq_ptrs + start_m * stride_dqm, dq, mask=row_ok[:, None], sem="relaxed")
            else:
                tl.atomic_add(dq_ptrs + start_m * stride_dqm, dq, sem="relaxed")
    return dk, dv


@triton.jit
def flash_bwd_dkdv_kernel(
    Q, K, V, DO, L, Delta, DK, DV, DQ_ACC, DQ_DESC,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    N_HEADS, N_QUERIES, N_KEYS, sm_scale,
    HEAD_DIM: tl.constexpr, IS_CAUSAL: tl.constexpr, ATOMIC_DQ: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DIRECT: tl.constexpr, DQ_TMA: tl.constexpr = False,
    EXP2_POLY: tl.constexpr = 0,
):
    """One program = one key tile (BLOCK_N keys) of one (batch, head), looping over query tiles;
    grid (batch·heads, cdiv(N_KEYS, BLOCK_N)).

    L and Delta are (batch·heads, N_QUERIES) contiguous float32. With ATOMIC_DQ, dQ·(1) is also added
    into the float32 buffer DQ_ACC (batch·heads, N_QUERIES, HEAD_DIM) with atomics: per element, or with
    DQ_TMA one tensor-memory-accelerator reduction per tile through DQ_DESC, a (batch·heads·N_QUERIES,
    HEAD_DIM) descriptor of DQ_ACC with blocks (BLOCK_M, HEAD_DIM)."""
    tl.static_assert(BLOCK_N % BLOCK_M == 0)
    bh = tl.program_id(0)
    pid_n = tl.program_id(1)  # under a causal mask low key tiles see the most queries: they launch first
    sm_scale = tl.cast(sm_scale, tl.float32)
    b = (bh // N_HEADS).to(tl.int64)
    h = (bh % N_HEADS).to(tl.int64)
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    key_ok = offs_n < N_KEYS

    k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=key_ok[:, None], other=0.0)
    v = tl.load(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                mask=key_ok[:, None], other=0.0)
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    do_ptrs = DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod
    row_base = bh.to(tl.int64) * N_QUERIES
    l_ptrs = L + row_base
    delta_ptrs = Delta + row_base
    dq_ptrs = DQ_ACC + row_base * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]

    qk_scale = sm_scale * 1.4426950408889634
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    full_queries = (N_QUERIES // BLOCK_M) * BLOCK_M
    if IS_CAUSAL:
        # queries < start_n see none of these keys; [start_n, start_n + BLOCK_N) is the masked diagonal band
        diag_hi = start_n + BLOCK_N
        dk, dv = _bwd_dkdv_query_loop(
            dk, dv, k, v, q_ptrs, do_ptrs, l_ptrs, delta_ptrs, dq_ptrs, DQ_DESC, bh * N_QUERIES, offs_n, offs_m, key_ok,
            start_n, tl.minimum(diag_hi, N_QUERIES), stride_qm, stride_dom, HEAD_DIM, qk_scale, sm_scale,
            N_QUERIES, BLOCK_M, True, True, ATOMIC_DQ, DQ_TMA, PRECISION, DIRECT,
        )
        lo = diag_hi
    else:
        lo = 0
    dk, dv = _bwd_dkdv_query_loop(
        dk, dv, k, v, q_ptrs, do_ptrs, l_ptrs, delta_ptrs, dq_ptrs, DQ_DESC, bh * N_QUERIES, offs_n, offs_m, key_ok,
        lo, full_queries, stride_qm, stride_dom, HEAD_DIM, qk_scale, sm_scale,
        N_QUERIES, BLOCK_M, False, False, ATOMIC_DQ, DQ_TMA, PRECISION, DIRECT, EXP2_POLY,
    )
    dk, dv = _bwd_dkdv_query_loop(
        dk, dv, k, v, q_ptrs, do_ptrs, l_ptrs, delta_ptrs, dq_ptrs, DQ_DESC, bh * N_QUERIES, offs_n, offs_m, key_ok,
        tl.maximum(lo, full_queries), N_QUERIES, stride_qm, stride_dom, HEAD_DIM, qk_scale, sm_scale,
        N_QUERIES, BLOCK_M, False, True, ATOMIC_DQ, DQ_TMA, PRECISION, DIRECT,
    )

    dk = dk * sm_scale
    tl.store(DK + b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
             dk.to(DK.dtype.element_ty), mask=key_ok[:, None])
    tl.store(DV + b * stride_dvb + h * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :] * stride_dvd,
             dv.to(DV.dtype.element_ty), mask=key_ok[:, None])


@triton.jit
def _bwd_dq_key_loop(
    dq, q, do, l2, delta, k_ptrs, v_ptrs, offs_m, offs_n_base,
    lo, hi, stride_kn, stride_vn, qk_scale, N_KEYS,
    BLOCK_N: tl.constexpr, CAUSAL_MASK: tl.constexpr, KEY_MASK: tl.constexpr, PRECISION: tl.constexpr,
    POLY: tl.constexpr = 0,
):
    """Accumulate dQ (unscaled) of one query tile over key tiles [lo, hi)."""
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + offs_n_base
        if KEY_MASK:
            k = tl.load(k_ptrs + start_n * stride_kn, mask=(offs_n < N_KEYS)[:, None], other=0.0)
            v = tl.load(v_ptrs + start_n * stride_vn, mask=(offs_n < N_KEYS)[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs + start_n * stride_kn)
            v = tl.load(v_ptrs + start_n * stride_vn)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        if CAUSAL_MASK or KEY_MASK:
            qk = _masked_scores(qk, offs_m, offs_n, qk_scale, N_KEYS, CAUSAL_MASK, KEY_MASK)
            p = tl.math.exp2(qk - l2[:, None])
        else:
            p = _exp2(qk * qk_scale - l2[:, None], POLY)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = (p * (dp - delta[:, None])).to(k.dtype)
        dq = tl.dot(ds, k, dq, input_precision=PRECISION)
    return dq


@triton.jit
def flash_bwd_dq_kernel(
    Q, K, V, Out, DO, L, Delta, DQ,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    N_HEADS, N_QUERIES, N_KEYS, sm_scale,
    HEAD_DIM: tl.constexpr, IS_CAUSAL: tl.constexpr, COMPUTE_DELTA: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EXP2_POLY: tl.constexpr = 0,
):
    """One program = one query tile of one (batch, head), looping over key tiles (recomputes P and dP);
    grid (batch·heads, cdiv(N_QUERIES, BLOCK_M)).

    With COMPUTE_DELTA it first computes Delta = rowsum(O ∘ dO) of its tile and stores it for the dK/dV
    kernel that runs next (no separate preprocess launch)."""
    tl.static_assert(BLOCK_M % BLOCK_N == 0)
    bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    if IS_CAUSAL:
        pid_m = tl.num_programs(1) - 1 - pid_m
    sm_scale = tl.cast(sm_scale, tl.float32)
    b = (bh // N_HEADS).to(tl.int64)
    h = (bh % N_HEADS).to(tl.int64)
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < N_QUERIES

    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                 mask=row_ok[:, None], other=0.0)
    row_base = bh.to(tl.int64) * N_QUERIES
    l2 = tl.load(L + row_base + offs_m, mask=row_ok, other=float("inf")) * 1.4426950408889634
    if COMPUTE_DELTA:
        o = tl.load(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
                    mask=row_ok[:, None], other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
        tl.store(Delta + row_base + offs_m, delta, mask=row_ok)
    else:
        delta = tl.load(Delta + row_base + offs_m, mask=row_ok, other=0.0)
    k_ptrs = K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_ptrs = V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd

    qk_scale = sm_scale * 1.4426950408889634
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    full_keys = (N_KEYS // BLOCK_N) * BLOCK_N
    if IS_CAUSAL:
        hi = tl.minimum(start_m + BLOCK_M, N_KEYS)
        mid = tl.minimum(start_m, full_keys)
        dq = _bwd_dq_key_loop(dq, q, do, l2, delta, k_ptrs, v_ptrs, offs_m, offs_n, 0, mid, stride_kn, stride_vn,
                              qk_scale, N_KEYS, BLOCK_N, False, False, PRECISION, EXP2_POLY)
        dq = _bwd_dq_key_loop(dq, q, do, l2, delta, k_ptrs, v_ptrs, offs_m, offs_n, mid, hi, stride_kn, stride_vn,
                              qk_scale, N_KEYS, BLOCK_N, True, True, PRECISION)
    else:
        dq = _bwd_dq_key_loop(dq, q, do, l2, delta, k_ptrs, v_ptrs, offs_m, offs_n, 0, full_keys, stride_kn,
                              stride_vn, qk_scale, N_KEYS, BLOCK_N, False, False, PRECISION, EXP2_POLY)
        dq = _bwd_dq_key_loop(dq, q, do, l2, delta, k_ptrs, v_ptrs, offs_m, offs_n, full_keys, N_KEYS, stride_kn,
                              stride_vn, qk_scale, N_KEYS, BLOCK_N, False, True, PRECISION)
    dq = dq * sm_scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd,
             dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def flash_bwd_dq_convert_kernel(
    DQ_ACC, DQ,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    N_HEADS, N_QUERIES, scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Cast the float32 dQ accumulator (batch·heads, N_QUERIES, HEAD_DIM) times `scale` into dQ's dtype and
    layout (the atomic backward adds scaled tiles and passes 1; the fused one adds unscaled tiles)."""
    bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = (bh // N_HEADS).to(tl.int64)
    h = (bh % N_HEADS).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    ok = (offs_m < N_QUERIES)[:, None]
    acc = tl.load(DQ_ACC + (bh.to(tl.int64) * N_QUERIES + offs_m[:, None]) * HEAD_DIM + offs_d[None, :], mask=ok)
    acc = acc * tl.cast(scale, tl.float32)
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd,
             acc.to(DQ.dtype.element_ty), mask=ok)
