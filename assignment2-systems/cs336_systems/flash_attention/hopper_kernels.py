"""Hopper (sm_90a) FlashAttention kernels in Triton's Gluon dialect (issue 24), written against Triton 3.6.

Why Gluon: plain Triton follows every warpgroup product (`wgmma`) with `wgmma.wait_group 0`, so the tensor
cores and the exponentials never overlap (NOTES.md, v5 and v7). Gluon exposes the asynchronous
`warpgroup_mma` and `warpgroup_mma_wait(num_outstanding=...)`, TMA copies and mbarriers directly, so the
schedule below is ours and not the compiler's.

Forward schedule per program (one query tile of BLOCK_M rows; with 8 warps the two warpgroups each own 64 rows
and the warp schedulers interleave them, so one warpgroup's exponentials also run under the other's products):

    S_0 = Q K_0ᵀ; wait; P_0 = softmax part of S_0
    for j = 1 .. n-1:
        issue S_j = Q K_jᵀ               (async)
        issue O += P_{j-1} V_{j-1}        (async)
        wait until one group is left      (S_j is done, the PV product may still run)
        softmax of S_j                    (runs under O += P_{j-1} V_{j-1})
        wait for the PV product; refill the K/V stage it used by TMA; rescale O
    O += P_{n-1} V_{n-1}; O /= l

P_{j-1}, the A operand of the PV product, lives in shared memory by default (P_IN_SMEM: two buffers, the step
writes one while the running product reads the other). With P in registers (P_IN_SMEM=False) the PTX has the
same schedule, but ptxas (Triton 3.6's) allocates P_j into the registers the running product still reads and
moves `wgmma.wait_group 0` above the exponentials: no MUFU.EX2 runs under a product (NOTES.md, "Hopper path").

K and V tiles arrive through a ring of STAGES shared-memory buffers, each with an mbarrier that the TMA
signals; the same warps issue the copies, up to STAGES tiles ahead of the products.

Conventions shared with `triton_kernels` (so that its backward can take our O and L): tensors are contiguous
(batch, heads, seq, d) seen as 2-D (batch·heads·seq, d) by the descriptors; a query tile or key tile that runs
past its head reads the next head's rows (or TMA zero fill at the end), which the key mask and the masked
stores make harmless; scores are in base 2 (s₂ = s·log₂e/√d) and L is the natural-log logsumexp, float32,
(batch, heads, seq); the causal mask is top-left aligned (query i sees keys 0..i).
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

LN2: gl.constexpr = gl.constexpr(0.6931471805599453)
LOG2E: gl.constexpr = gl.constexpr(1.4426950408889634)
P_SMEM_LAYOUT: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)


@gluon.jit
def _issue_pair(a_desc, b_desc, a_smem, b_smem, bars, tile, row0, n_tiles,
                BLOCK: gl.constexpr, STAGES: gl.constexpr):
    """TMA copies of tile `tile` of two row-aligned tensors (K and V in the forward, Q and dO in the backward)
    into ring stage tile % STAGES, both on that stage's barrier; nothing past the last tile."""
    stage = tile % STAGES
    valid = tile < n_tiles
    bar = bars.index(stage)
    mbarrier.expect(bar, a_desc.block_type.nbytes + b_desc.block_type.nbytes, pred=valid)
    row = row0 + tile * BLOCK
    tma.async_copy_global_to_shared(a_desc, [row, 0], bar, a_smem.index(stage), pred=valid)
    tma.async_copy_global_to_shared(b_desc, [row, 0], bar, b_smem.index(stage), pred=valid)


@gluon.jit
def _softmax_tile(s, m_i, l_i, start_m, start_n, mask_from, n_keys, qk_scale,
                  IS_CAUSAL: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                  s_layout: gl.constexpr):
    """Online-softmax step on raw scores s (fp32, BLOCK_M × BLOCK_N): the new row maxima (raw units), the
    factor that rescales O and l, the unnormalised probabilities and the new row sums. Only tiles that reach
    past `mask_from` (the diagonal or the ragged last key tile) pay for the index compares."""
    if start_n + BLOCK_N > mask_from:
        offs_n = start_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        keep = offs_n[None, :] < n_keys
        if IS_CAUSAL:
            offs_m = start_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
            keep = keep & (offs_m[:, None] >= offs_n[None, :])
        s = gl.where(keep, s, -float("inf"))
    m_new = gl.maximum(m_i, gl.max(s, axis=1))
    m_scaled = m_new * qk_scale
    # one FMA per score: s·scale − m·scale; masked scores stay −inf and give 0
    p = gl.exp2(s * qk_scale - m_scaled[:, None])
    alpha = gl.exp2(m_i * qk_scale - m_scaled)
    l_i = l_i * alpha + gl.sum(p, axis=1)
    return m_new, alpha, p, l_i


@gluon.jit
def _fwd_step(j, q_smem, k_smem, v_smem, kv_bars, k_desc, v_desc, kv_row0, n_tiles, m_i, l_i, acc, p_op, s_zero,
              start_m, mask_from, n_keys, qk_scale, p_smem, IS_CAUSAL: gl.constexpr, BLOCK_M: gl.constexpr,
              BLOCK_N: gl.constexpr, STAGES: gl.constexpr, s_layout: gl.constexpr, p_layout: gl.constexpr,
              row_o: gl.constexpr, P_IN_SMEM: gl.constexpr, PARITY: gl.constexpr):
    """Key tile j: S_j = Q K_jᵀ and O += P_{j-1} V_{j-1} issued together, the softmax of S_j under the second."""
    stage = j % STAGES
    prev = (j - 1) % STAGES
    if j >= 2:
        # the stage of tile j - 2 is free (its products finished in the last step): refill it. Issued here and
        # not right after that wait, because the CTA barrier before a TMA copy would drag the wait up with it
        _issue_pair(k_desc, v_desc, k_smem, v_smem, kv_bars, j - 2 + STAGES, kv_row0, n_tiles, BLOCK_N, STAGES)
    mbarrier.wait(kv_bars.index(stage), (j // STAGES) & 1)
    s_tok = warpgroup_mma(q_smem, k_smem.index(stage).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    if P_IN_SMEM:
        o_tok = warpgroup_mma(p_smem.index(1 - PARITY), v_smem.index(prev), acc, is_async=True)
    else:
        o_tok = warpgroup_mma(p_op, v_smem.index(prev), acc, is_async=True)
    # groups retire in order: with one left outstanding, S_j is ready and O += P_{j-1} V_{j-1} may still run
    s = warpgroup_mma_wait(1, deps=(s_tok, ))
    m_i, alpha, p, l_i = _softmax_tile(s, m_i, l_i, start_m, j * BLOCK_N, mask_from, n_keys, qk_scale, IS_CAUSAL,
                                       BLOCK_M, BLOCK_N, s_layout)
    # P_j is packed before the wait and passed through it, so the value carried to the next step is the wait's
    # result and not a cast (LLVM would fold a phi of two casts into a cast of an fp32 phi)
    if P_IN_SMEM:
        # the other buffer of P; the running product reads this step's `1 - PARITY` one
        p_smem.index(PARITY).store(p.to(p_smem.dtype))
        fence_async_shared()
        acc = warpgroup_mma_wait(0, deps=(o_tok, ))
        p_next = p_op
    else:
        p_next = gl.convert_layout(p.to(p_op.dtype), p_layout)
        acc, p_next = warpgroup_mma_wait(0, deps=(o_tok, p_next))
    acc = acc * gl.convert_layout(alpha, row_o)[:, None]
    return m_i, l_i, acc, p_next


@gluon.jit
def _query_tile_start(N_QUERIES, BLOCK_M: gl.constexpr, IS_CAUSAL: gl.constexpr):
    """This program's first query row; grid axis 1 runs the longest causal tiles first (both forward kernels)."""
    n_m_tiles = gl.cdiv(N_QUERIES, BLOCK_M)
    if IS_CAUSAL:
        tile_m = n_m_tiles - 1 - gl.program_id(1)
    else:
        tile_m = gl.program_id(1)
    return tile_m * BLOCK_M


@gluon.jit
def _key_bounds(start_m, N_KEYS, BLOCK_M: gl.constexpr, IS_CAUSAL: gl.constexpr):
    """How many keys the query tile at `start_m` reads, and the key from which its tiles need masking."""
    if IS_CAUSAL:
        hi = gl.minimum(N_KEYS, start_m + BLOCK_M)
        mask_from = gl.minimum(N_KEYS, start_m + 1)
    else:
        hi = N_KEYS
        mask_from = N_KEYS
    return hi, mask_from


@gluon.jit
def _store_rows(acc, m_i, l_i, start_m, pid_bh, N_QUERIES, qk_scale, o_ptr, lse_ptr, ROWS: gl.constexpr,
                HEAD_DIM: gl.constexpr, o_layout: gl.constexpr, dtype: gl.constexpr):
    """O = acc / l and the natural-log logsumexp of rows start_m.. (both forward kernels); masked stores: a tile's
    rows past N_QUERIES belong to the next head."""
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    l_o = gl.convert_layout(l_i, row_o)
    acc = acc / l_o[:, None]
    offs_m = start_m + gl.arange(0, ROWS, layout=row_o)
    offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
    row_ok = offs_m < N_QUERIES
    rows = (pid_bh * N_QUERIES + offs_m).to(gl.int64)
    gl.store(o_ptr + rows[:, None] * HEAD_DIM + offs_d[None, :], acc.to(dtype), mask=row_ok[:, None])
    lse = (gl.convert_layout(m_i, row_o) * qk_scale + gl.log2(l_o)) * LN2
    gl.store(lse_ptr + rows, lse, mask=row_ok)


@gluon.jit
def flash_fwd_hopper_kernel(
    q_desc, k_desc, v_desc, o_ptr, lse_ptr,
    N_QUERIES, N_KEYS, sm_scale,
    HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
    IS_CAUSAL: gl.constexpr, P_IN_SMEM: gl.constexpr = False,
):
    """One (batch·head, query tile) per program; grid axis 1 runs the longest causal tiles first."""
    NUM_WARPS: gl.constexpr = gl.num_warps()
    dtype: gl.constexpr = q_desc.dtype
    pid_bh = gl.program_id(0)
    start_m = _query_tile_start(N_QUERIES, BLOCK_M, IS_CAUSAL)
    q_row0 = pid_bh * N_QUERIES + start_m
    kv_row0 = pid_bh * N_KEYS

    # one warpgroup per 64 rows: [4, 1] warps per 64 × N atom, stacked along M
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)

    q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM], q_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    kv_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(kv_bars.index(i), count=1)

    hi, mask_from = _key_bounds(start_m, N_KEYS, BLOCK_M, IS_CAUSAL)
    n_tiles = gl.cdiv(hi, BLOCK_N)

    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [q_row0, 0], q_bar, q_smem)
    for i in gl.static_range(STAGES):
        _issue_pair(k_desc, v_desc, k_smem, v_smem, kv_bars, i, kv_row0, n_tiles, BLOCK_N, STAGES)

    qk_scale = sm_scale * 1.4426950408889634
    m_i = gl.full([BLOCK_M], -1.0e30, gl.float32, layout=row_s)  # finite: exp2(m_old - m_new) never sees -inf - -inf
    l_i = gl.zeros([BLOCK_M], gl.float32, layout=row_s)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=o_layout)

    # tile 0: its scores alone, nothing to overlap with yet
    mbarrier.wait(q_bar, 0)
    mbarrier.wait(kv_bars.index(0), 0)
    s_tok = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    s = warpgroup_mma_wait(0, deps=(s_tok, ))
    m_i, _, p, l_i = _softmax_tile(s, m_i, l_i, start_m, 0, mask_from, N_KEYS, qk_scale, IS_CAUSAL, BLOCK_M,
                                       BLOCK_N, s_layout)
    p_op = gl.convert_layout(p.to(dtype), p_layout)
    if P_IN_SMEM:
        # P through shared memory (two buffers, alternating by step parity) instead of registers
        p_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_M, BLOCK_N], P_SMEM_LAYOUT)
        p_smem.index(0).store(p.to(dtype))
        fence_async_shared()
    else:
        p_smem = q_smem  # unused

    # two steps per trip, so that the P buffer each step writes (PARITY) is a compile-time choice
    for j in range(1, n_tiles - 1, 2):
        m_i, l_i, acc, p_op = _fwd_step(j, q_smem, k_smem, v_smem, kv_bars, k_desc, v_desc, kv_row0, n_tiles,
                                        m_i, l_i, acc, p_op, s_zero, start_m, mask_from, N_KEYS, qk_scale,
                                        p_smem, IS_CAUSAL, BLOCK_M, BLOCK_N, STAGES, s_layout, p_layout, row_o,
                                        P_IN_SMEM, 1)
        m_i, l_i, acc, p_op = _fwd_step(j + 1, q_smem, k_smem, v_smem, kv_bars, k_desc, v_desc, kv_row0, n_tiles,
                                        m_i, l_i, acc, p_op, s_zero, start_m, mask_from, N_KEYS, qk_scale,
                                        p_smem, IS_CAUSAL, BLOCK_M, BLOCK_N, STAGES, s_layout, p_layout, row_o,
                                        P_IN_SMEM, 0)
    if (n_tiles - 1) % 2 == 1:
        m_i, l_i, acc, p_op = _fwd_step(n_tiles - 1, q_smem, k_smem, v_smem, kv_bars, k_desc, v_desc, kv_row0,
                                        n_tiles, m_i, l_i, acc, p_op, s_zero, start_m, mask_from, N_KEYS, qk_scale,
                                        p_smem, IS_CAUSAL, BLOCK_M, BLOCK_N, STAGES, s_layout, p_layout, row_o,
                                        P_IN_SMEM, 1)

    last = (n_tiles - 1) % STAGES
    if P_IN_SMEM:
        o_tok = warpgroup_mma(p_smem.index((n_tiles - 1) % 2), v_smem.index(last), acc, is_async=True)
    else:
        o_tok = warpgroup_mma(p_op, v_smem.index(last), acc, is_async=True)
    acc = warpgroup_mma_wait(0, deps=(o_tok, ))

    mbarrier.invalidate(q_bar)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(kv_bars.index(i))

    _store_rows(acc, m_i, l_i, start_m, pid_bh, N_QUERIES, qk_scale, o_ptr, lse_ptr, BLOCK_M, HEAD_DIM, o_layout,
                dtype)


# ---------------------------------------------------------------------------------------------- backward
#
# dK/dV per key tile (fa3-v2). One program owns BLOCK_N keys (K, V resident in shared memory, one warpgroup
# per 64 key rows) and walks the query tiles that see them; Q and dO tiles arrive by TMA through a ring of
# STAGES buffers. Everything is computed transposed (keys × queries), so P^T and dS^T are the A operands of
# dV += P^T dO and dK += dS^T Q with no transpose:
#
#     issue S^T = K Q^T, issue dP^T = V dO^T      (async, two groups)
#     wait(1): S^T ready, dP^T may still run      -> P^T = exp2(S^T·scale − L₂) under the dP^T product
#     P^T to shared memory; wait(0)                -> dP^T
#     issue dV += P^T dO                           (async)
#     dS^T = P^T ∘ (dP^T − D) under the dV product; dS^T to shared memory
#     issue dK += dS^T Q; wait(0); refill the ring stage
#
# P^T and dS^T go through shared memory (the forward's lesson: as register A operands ptxas reuses the running
# product's registers and serialises the wait). dQ is not computed here: the Triton dQ kernel runs first and
# also writes D = rowsum(dO ∘ O).


@gluon.jit
def _store_key_rows(dk, dv, dk_ptr, dv_ptr, key0, pid_bh, N_KEYS, sm_scale, ROWS: gl.constexpr,
                    HEAD_DIM: gl.constexpr, acc_layout: gl.constexpr):
    """dK (scaled) and dV of ROWS keys from key0, masked: key rows past N_KEYS belong to the next head."""
    offs_k = key0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, acc_layout))
    offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, acc_layout))
    key_ok = (offs_k < N_KEYS)[:, None]
    rows = (pid_bh * N_KEYS + offs_k).to(gl.int64)
    ptr_off = rows[:, None] * HEAD_DIM + offs_d[None, :]
    gl.store(dk_ptr + ptr_off, (dk * sm_scale).to(dk_ptr.dtype.element_ty), mask=key_ok)
    gl.store(dv_ptr + ptr_off, dv.to(dv_ptr.dtype.element_ty), mask=key_ok)


@gluon.jit
def _bwd_step(j, k_smem, v_smem, q_smem, do_smem, p_smem, ds_smem, bars, q_desc, do_desc, q_row0, n_tiles,
              lo, mask_until, offs_n, dk, dv, s_zero, lse_ptr, delta_ptr, row_base, N_QUERIES, qk_scale,
              IS_CAUSAL: gl.constexpr, BLOCK_M: gl.constexpr, STAGES: gl.constexpr, s_layout: gl.constexpr):
    """Query tile j of this key tile: the exponentials run under the dP^T product, dS^T under the dV one."""
    stage = j % STAGES
    start_m = lo + j * BLOCK_M
    offs_m = start_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, s_layout))
    row_ok = offs_m < N_QUERIES
    # rows past N_QUERIES (the next head's, or TMA zero fill) get L₂ = +inf, hence P = 0 and dS = 0
    l2 = gl.load(lse_ptr + row_base + offs_m, mask=row_ok, other=float("inf")) * LOG2E
    delta = gl.load(delta_ptr + row_base + offs_m, mask=row_ok, other=0.0)
    q_s = q_smem.index(stage)
    do_s = do_smem.index(stage)
    mbarrier.wait(bars.index(stage), (j // STAGES) & 1)
    s_tok = warpgroup_mma(k_smem, q_s.permute((1, 0)), s_zero, use_acc=False, is_async=True)
    dp_tok = warpgroup_mma(v_smem, do_s.permute((1, 0)), s_zero, use_acc=False, is_async=True)
    s = warpgroup_mma_wait(1, deps=(s_tok, ))
    # two ifs, not `and`: the outer one is resolved at compile time, the inner one at run time
    if IS_CAUSAL:  # noqa: SIM102
        if start_m < mask_until:  # the diagonal band only: query i sees keys 0..i
            s = gl.where(offs_m[None, :] >= offs_n[:, None], s, -float("inf"))
    p = gl.exp2(s * qk_scale - l2[None, :])
    p_smem.store(p.to(p_smem.dtype))
    fence_async_shared()
    dp = warpgroup_mma_wait(0, deps=(dp_tok, ))
    dv_tok = warpgroup_mma(p_smem, do_s, dv, is_async=True)
    ds = p * (dp - delta[None, :])
    ds_smem.store(ds.to(ds_smem.dtype))
    fence_async_shared()
    dk_tok = warpgroup_mma(ds_smem, q_s, dk, is_async=True)
    dv, dk = warpgroup_mma_wait(0, deps=(dv_tok, dk_tok))
    # every product that read this stage has finished: refill it with tile j + STAGES
    _issue_pair(q_desc, do_desc, q_smem, do_smem, bars, j + STAGES, q_row0, n_tiles, BLOCK_M, STAGES)
    return dk, dv


@gluon.jit
def flash_bwd_dkdv_hopper_kernel(
    q_desc, k_desc, v_desc, do_desc, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    N_QUERIES, N_KEYS, sm_scale,
    HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
    IS_CAUSAL: gl.constexpr,
):
    """dK, dV of one (batch·head, key tile) per program, grid (batch·heads, cdiv(N_KEYS, BLOCK_N)); under a
    causal mask the low key tiles see the most queries, and they launch first.

    lse_ptr: L (natural log, float32, (batch·heads, N_QUERIES)); delta_ptr: D = rowsum(dO ∘ O), same shape.
    dk_ptr, dv_ptr: contiguous (batch·heads, N_KEYS, HEAD_DIM) in the inputs' dtype."""
    NUM_WARPS: gl.constexpr = gl.num_warps()
    dtype: gl.constexpr = q_desc.dtype
    pid_bh = gl.program_id(0)
    start_n = gl.program_id(1) * BLOCK_N
    kv_row0 = pid_bh * N_KEYS + start_n
    row_base = pid_bh.to(gl.int64) * N_QUERIES

    # one warpgroup per 64 key rows
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                       instr_shape=[16, BLOCK_M, 16])
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                         instr_shape=[16, HEAD_DIM, 16])

    k_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, HEAD_DIM], v_desc.layout)
    q_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, HEAD_DIM], q_desc.layout)
    do_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, HEAD_DIM], do_desc.layout)
    # rows of P^T, dS^T are BLOCK_M 2-byte values: the swizzle may not span more than a row
    PS_SWIZZLE: gl.constexpr = 128 if BLOCK_M >= 64 else 2 * BLOCK_M
    ps_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=PS_SWIZZLE, element_bitwidth=16, rank=2)
    p_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, BLOCK_M], ps_layout)
    ds_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, BLOCK_M], ps_layout)
    kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(kv_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(bars.index(i), count=1)

    if IS_CAUSAL:
        lo = start_n  # queries before the tile's first key see none of it (BLOCK_N is a multiple of BLOCK_M)
        mask_until = start_n + BLOCK_N
    else:
        lo = 0
        mask_until = 0
    n_tiles = gl.cdiv(gl.maximum(N_QUERIES - lo, 0), BLOCK_M)
    q_row0 = pid_bh * N_QUERIES + lo

    mbarrier.expect(kv_bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(k_desc, [kv_row0, 0], kv_bar, k_smem)
    tma.async_copy_global_to_shared(v_desc, [kv_row0, 0], kv_bar, v_smem)
    for i in gl.static_range(STAGES):
        _issue_pair(q_desc, do_desc, q_smem, do_smem, bars, i, q_row0, n_tiles, BLOCK_M, STAGES)

    qk_scale = sm_scale * 1.4426950408889634
    offs_n = start_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, s_layout))
    s_zero = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=s_layout)
    dk = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, layout=acc_layout)
    dv = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, layout=acc_layout)
    mbarrier.wait(kv_bar, 0)
    for j in range(0, n_tiles):
        dk, dv = _bwd_step(j, k_smem, v_smem, q_smem, do_smem, p_smem, ds_smem, bars, q_desc, do_desc, q_row0,
                           n_tiles, lo, mask_until, offs_n, dk, dv, s_zero, lse_ptr, delta_ptr, row_base,
                           N_QUERIES, qk_scale, IS_CAUSAL, BLOCK_M, STAGES, s_layout)

    mbarrier.invalidate(kv_bar)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(i))
    _store_key_rows(dk, dv, dk_ptr, dv_ptr, start_n, pid_bh, N_KEYS, sm_scale, BLOCK_N, HEAD_DIM, acc_layout)


# ------------------------------------------------------------------------------ pipelined dK/dV (fa3-v5)
#
# fa3-v2 waited for every product of a query tile before the next tile's first one, so per tile the tensor
# cores idled through the exponentials (only the dP^T product ran under them) and through the P^T and dS^T
# stores. Here the products of consecutive tiles interleave (software pipelining across loop trips), so the
# exponentials of tile j run under three products:
#
#     tensor pipe:  ... S_j | dV_{j-1} | dK_{j-1} | dP_j | S_{j+1} | dV_j | dK_j | dP_{j+1} ...
#     warps:        issue all four -> wait S_j -> P_j = exp2(...) -> P_j to smem -> wait all -> dS_j to smem
#
# (Issuing S_{j+1} before dS_j as well, to hide dS_j under it, keeps an accumulator in flight across the loop's
# back edge, and ptxas then serialises every product: NOTES.md, fa3-v5.) One warpgroup per program (4 warps,
# 64 keys × 64 queries per tile), so the only barriers are its own and two programs share an SM, filling each
# other's gaps (fa3-v2's two warpgroups met at a CTA barrier before every shared-memory operand). P^T and dS^T
# are double-buffered: tile j writes buffer j % 2 while dV_{j-1}, dK_{j-1} read the other. A ring stage is
# refilled only once dK_{j-1}, its last reader, has finished, so the ring needs STAGES >= 3 to keep a copy in
# flight. The causal diagonal of a 64-key tile is its first query tile only, which runs before the loop with
# the mask; the loop itself has none.


@gluon.constexpr_function
def _warpgroup_mma_layout(columns):
    """The register layout of a 64-row product accumulator (or operand tile) of one warpgroup, `columns` wide."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, columns, 16])


@gluon.jit
def _v5_vectors(lse_ptr, delta_ptr, row_base, start_m, N_QUERIES, BLOCK_M: gl.constexpr, s_layout: gl.constexpr):
    """L₂ (base-2 logsumexp) and D of one query tile; rows past N_QUERIES get L₂ = +inf, hence P = dS = 0."""
    offs_m = start_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, s_layout))
    row_ok = offs_m < N_QUERIES
    l2 = gl.load(lse_ptr + row_base + offs_m, mask=row_ok, other=float("inf")) * LOG2E
    delta = gl.load(delta_ptr + row_base + offs_m, mask=row_ok, other=0.0)
    return l2, delta


@gluon.jit
def _dkdv_pipelined(k_s, v_s, q_smem, do_smem, p_smem, ds_smem, ready, empty, q_desc, do_desc, q_row0, lse_ptr,
                    delta_ptr, row_base, lo, t0, n_tiles, offs_n, N_QUERIES, qk_scale, dk, dv, s_zero, l2, delta,
                    IS_CAUSAL: gl.constexpr, BLOCK_M: gl.constexpr, STAGES: gl.constexpr, s_layout: gl.constexpr,
                    PRODUCER: gl.constexpr):
    """dK, dV of one warpgroup's 64 keys over query tiles t0 … n_tiles − 1 (t0 the causal diagonal, masked, run
    before the loop; l2, delta: its vectors, loaded by the caller while K and V arrive). A ring stage is released
    once its last reader, the dK product, has finished: by arriving at its `empty` barrier when a producer
    partition refills the ring (PRODUCER), else by refilling it here."""
    if t0 < n_tiles:
        # query tile t0: nothing of an earlier tile to interleave yet
        mbarrier.wait(ready.index(t0 % STAGES), (t0 // STAGES) & 1)
        s_tok = warpgroup_mma(k_s, q_smem.index(t0 % STAGES).permute((1, 0)), s_zero, use_acc=False,
                              is_async=True)
        dp_tok = warpgroup_mma(v_s, do_smem.index(t0 % STAGES).permute((1, 0)), s_zero, use_acc=False,
                               is_async=True)
        s = warpgroup_mma_wait(1, deps=(s_tok, ))
        if IS_CAUSAL:
            offs_m = lo + t0 * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, s_layout))
            s = gl.where(offs_m[None, :] >= offs_n[:, None], s, -float("inf"))
        p = gl.exp2(s * qk_scale - l2[None, :])
        p_smem.index(t0 % 2).store(p.to(p_smem.dtype))
        dp = warpgroup_mma_wait(0, deps=(dp_tok, ))
        ds = p * (dp - delta[None, :])
        ds_smem.index(t0 % 2).store(ds.to(ds_smem.dtype))
        fence_async_shared()

        for j in range(t0 + 1, n_tiles):
            stage = j % STAGES
            prev = (j - 1) % STAGES
            buf = j % 2
            l2, delta = _v5_vectors(lse_ptr, delta_ptr, row_base, lo + j * BLOCK_M, N_QUERIES, BLOCK_M, s_layout)
            mbarrier.wait(ready.index(stage), (j // STAGES) & 1)
            # this tile's scores first, then the previous tile's dV and dK, then this tile's dP^T
            s_tok = warpgroup_mma(k_s, q_smem.index(stage).permute((1, 0)), s_zero, use_acc=False, is_async=True)
            dv_tok = warpgroup_mma(p_smem.index(1 - buf), do_smem.index(prev), dv, is_async=True)
            dk_tok = warpgroup_mma(ds_smem.index(1 - buf), q_smem.index(prev), dk, is_async=True)
            dp_tok = warpgroup_mma(v_s, do_smem.index(stage).permute((1, 0)), s_zero, use_acc=False,
                                   is_async=True)
            s = warpgroup_mma_wait(3, deps=(s_tok, ))
            p = gl.exp2(s * qk_scale - l2[None, :])  # under dV_{j-1}, dK_{j-1} and dP_j
            p_smem.index(buf).store(p.to(p_smem.dtype))
            dp, dv, dk = warpgroup_mma_wait(0, deps=(dp_tok, dv_tok, dk_tok))
            # dK_{j-1} was the last reader of tile j-1's stage
            if PRODUCER:
                mbarrier.arrive(empty.index(prev), count=1)
            else:
                _issue_pair(q_desc, do_desc, q_smem, do_smem, ready, j - 1 + STAGES, q_row0, n_tiles, BLOCK_M,
                            STAGES)
            ds = p * (dp - delta[None, :])
            ds_smem.index(buf).store(ds.to(ds_smem.dtype))
            fence_async_shared()

        last = (n_tiles - 1) % 2
        last_stage = (n_tiles - 1) % STAGES
        dv_tok = warpgroup_mma(p_smem.index(last), do_smem.index(last_stage), dv, is_async=True)
        dk_tok = warpgroup_mma(ds_smem.index(last), q_smem.index(last_stage), dk, is_async=True)
        dv, dk = warpgroup_mma_wait(0, deps=(dv_tok, dk_tok))
        if PRODUCER:
            mbarrier.arrive(empty.index(last_stage), count=1)
    return dk, dv


@gluon.jit
def flash_bwd_dkdv_hopper_v5_kernel(
    q_desc, k_desc, v_desc, do_desc, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    N_QUERIES, N_KEYS, sm_scale,
    HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
    IS_CAUSAL: gl.constexpr,
):
    """dK, dV of one (batch·head, key tile) per program, as `flash_bwd_dkdv_hopper_kernel` (same arguments and
    grid) with the products of consecutive query tiles interleaved; 4 warps, BLOCK_N = BLOCK_M = 64."""
    gl.static_assert(gl.num_warps() == 4, "one warpgroup per program")
    gl.static_assert(BLOCK_N == BLOCK_M, "the causal diagonal must be the first query tile alone")
    gl.static_assert(STAGES >= 3, "a stage is refilled one tile after its last reader")
    dtype: gl.constexpr = q_desc.dtype
    pid_bh = gl.program_id(0)
    start_n = gl.program_id(1) * BLOCK_N
    kv_row0 = pid_bh * N_KEYS + start_n
    row_base = pid_bh.to(gl.int64) * N_QUERIES

    s_layout: gl.constexpr = _warpgroup_mma_layout(BLOCK_M)
    acc_layout: gl.constexpr = _warpgroup_mma_layout(HEAD_DIM)
    k_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, HEAD_DIM], v_desc.layout)
    q_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, HEAD_DIM], q_desc.layout)
    do_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, HEAD_DIM], do_desc.layout)
    ps_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    p_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_N, BLOCK_M], ps_layout)
    ds_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_N, BLOCK_M], ps_layout)
    kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(kv_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(bars.index(i), count=1)

    lo = start_n if IS_CAUSAL else 0  # queries before the tile's first key see none of it
    n_tiles = gl.cdiv(gl.maximum(N_QUERIES - lo, 0), BLOCK_M)
    q_row0 = pid_bh * N_QUERIES + lo
    mbarrier.expect(kv_bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(k_desc, [kv_row0, 0], kv_bar, k_smem)
    tma.async_copy_global_to_shared(v_desc, [kv_row0, 0], kv_bar, v_smem)
    for i in gl.static_range(STAGES):
        _issue_pair(q_desc, do_desc, q_smem, do_smem, bars, i, q_row0, n_tiles, BLOCK_M, STAGES)

    qk_scale = sm_scale * 1.4426950408889634
    offs_n = start_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, s_layout))
    s_zero = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=s_layout)
    dk = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, layout=acc_layout)
    dv = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, layout=acc_layout)
    l2, delta = _v5_vectors(lse_ptr, delta_ptr, row_base, lo, N_QUERIES, BLOCK_M, s_layout)
    mbarrier.wait(kv_bar, 0)
    # a causal key tile past the last query (more keys than queries) has no query tile: dK = dV = 0
    dk, dv = _dkdv_pipelined(k_smem, v_smem, q_smem, do_smem, p_smem, ds_smem, bars, bars, q_desc, do_desc, q_row0,
                             lse_ptr, delta_ptr, row_base, lo, 0, n_tiles, offs_n, N_QUERIES, qk_scale, dk, dv,
                             s_zero, l2, delta, IS_CAUSAL, BLOCK_M, STAGES, s_layout, False)
    mbarrier.invalidate(kv_bar)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(i))
    _store_key_rows(dk, dv, dk_ptr, dv_ptr, start_n, pid_bh, N_KEYS, sm_scale, BLOCK_N, HEAD_DIM, acc_layout)


# ------------------------------------------------------------------------------- warp-specialised forward
#
# fa3-v4: FlashAttention-3's structure with Gluon's `warp_specialize` (Triton 3.6). Partitions of one program
# (one 128-row query tile of one batch·head):
#
#   producer (1 warp, 24 registers): Q once, then K_t and V_t by TMA into ring stage t % STAGES, each on its own
#       "ready" mbarrier (expect-tx bytes), after waiting for that stage's "empty" mbarrier;
#   consumer(s): the schedule of `_fwd_step` (S_j and O += P_{j-1} V_{j-1} issued together, the softmax of S_j
#       under the PV product, P through shared memory), waiting on K_j's and V_{j-1}'s "ready" barriers and
#       arriving on the "empty" barrier of tile j-1's stage once the PV product that read it has finished. No
#       CTA-wide barrier in the loop: the copies are the producer's, and the only barrier the compiler puts in
#       (before a product reads P from shared memory) spans the consumer's own warps.
#
# PINGPONG=False: one consumer partition of num_warps warps (8: two warpgroups of 64 rows in lockstep, as in
# the v1 forward). PINGPONG=True: two consumer partitions of one warpgroup each (rows 0-63: the default
# partition, rows 64-127: a worker), taking turns to issue their products through a pair of "turn" mbarriers
# (FA3's warp-scheduler barriers), so that one warpgroup's softmax runs while the other's products do.
# The default partition gets the registers the others leave under the kernel's `maxnreg` (WS_MAXNREG).

WS_PRODUCER_REGS: gl.constexpr = gl.constexpr(24)
WS_CONSUMER_REGS: gl.constexpr = gl.constexpr(240)
# 12 warps (the default partition's 8, or 4 + a 4-warp consumer, plus the producer warp padded to a
# warpgroup) × 32 threads × 168 registers fits the 64 K register file
WS_MAXNREG = 168


@gluon.jit
def _ws_producer(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_empty,
                 q_row0, kv_row0, n_tiles, NUM_CONSUMERS: gl.constexpr, BLOCK_N: gl.constexpr,
                 STAGES: gl.constexpr):
    """The load partition: Q (one block per consumer) on q_bar, then every K/V tile through the ring."""
    M_C: gl.constexpr = q_desc.block_type.shape[0]
    mbarrier.expect(q_bar, NUM_CONSUMERS * q_desc.block_type.nbytes)
    for c in gl.static_range(NUM_CONSUMERS):
        tma.async_copy_global_to_shared(q_desc, [q_row0 + c * M_C, 0], q_bar, q_smem.index(c))
    for t in range(n_tiles):
        stage = t % STAGES
        # a fresh mbarrier counts as having completed the phase before phase 0: the first round passes
        mbarrier.wait(kv_empty.index(stage), ((t // STAGES) & 1) ^ 1)
        row = kv_row0 + t * BLOCK_N
        kb = k_ready.index(stage)
        mbarrier.expect(kb, k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [row, 0], kb, k_smem.index(stage))
        vb = v_ready.index(stage)
        mbarrier.expect(vb, v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(v_desc, [row, 0], vb, v_smem.index(stage))


@gluon.jit
def _ws_consumer(q_smem, k_smem, v_smem, p_smem, q_bar, k_ready, v_ready, kv_empty, turn_bars, o_ptr, lse_ptr,
                 pid_bh, tile_start, n_tiles, mask_from, N_QUERIES, N_KEYS, qk_scale,
                 WG: gl.constexpr, PINGPONG: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr,
                 STAGES: gl.constexpr, IS_CAUSAL: gl.constexpr):
    """A consumer partition: 16 × num_warps query rows (64 per warpgroup), consumer WG of the program's tile."""
    NW: gl.constexpr = gl.num_warps()
    M_C: gl.constexpr = 16 * NW
    dtype: gl.constexpr = q_smem.dtype
    start_m = tile_start + WG * M_C
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    q_s = q_smem.index(WG)
    p_base = 2 * WG  # this consumer's two P buffers

    m_i = gl.full([M_C], -1.0e30, gl.float32, layout=row_s)
    l_i = gl.zeros([M_C], gl.float32, layout=row_s)
    s_zero = gl.zeros([M_C, BLOCK_N], gl.float32, layout=s_layout)
    acc = gl.zeros([M_C, HEAD_DIM], gl.float32, layout=o_layout)

    # tile 0: its scores alone
    mbarrier.wait(q_bar, 0)
    mbarrier.wait(k_ready.index(0), 0)
    if PINGPONG:
        mbarrier.wait(turn_bars.index(WG), 0)
    s_tok = warpgroup_mma(q_s, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    if PINGPONG:
        mbarrier.arrive(turn_bars.index(1 - WG), count=1)
    s = warpgroup_mma_wait(0, deps=(s_tok, ))
    m_i, _, p, l_i = _softmax_tile(s, m_i, l_i, start_m, 0, mask_from, N_KEYS, qk_scale, IS_CAUSAL, M_C,
                                   BLOCK_N, s_layout)
    p_smem.index(p_base).store(p.to(dtype))
    fence_async_shared()

    for j in range(1, n_tiles):
        stage = j % STAGES
        prev = (j - 1) % STAGES
        mbarrier.wait(k_ready.index(stage), (j // STAGES) & 1)
        mbarrier.wait(v_ready.index(prev), ((j - 1) // STAGES) & 1)
        if PINGPONG:
            # my turn to issue: the other warpgroup has issued its products of the same step
            mbarrier.wait(turn_bars.index(WG), j & 1)
        s_tok = warpgroup_mma(q_s, k_smem.index(stage).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        o_tok = warpgroup_mma(p_smem.index(p_base + (j - 1) % 2), v_smem.index(prev), acc, is_async=True)
        if PINGPONG:
            mbarrier.arrive(turn_bars.index(1 - WG), count=1)
        s = warpgroup_mma_wait(1, deps=(s_tok, ))
        m_i, alpha, p, l_i = _softmax_tile(s, m_i, l_i, start_m, j * BLOCK_N, mask_from, N_KEYS, qk_scale,
                                           IS_CAUSAL, M_C, BLOCK_N, s_layout)
        # the other P buffer: its last reader, O += P_{j-2} V_{j-2}, finished in the previous step
        p_smem.index(p_base + j % 2).store(p.to(dtype))
        fence_async_shared()
        acc = warpgroup_mma_wait(0, deps=(o_tok, ))
        # both products that read tile j-1's stage (S_{j-1}, and O += P_{j-1} V_{j-1}) have finished
        mbarrier.arrive(kv_empty.index(prev), count=1)
        acc = acc * gl.convert_layout(alpha, row_o)[:, None]

    last = (n_tiles - 1) % STAGES
    mbarrier.wait(v_ready.index(last), ((n_tiles - 1) // STAGES) & 1)
    o_tok = warpgroup_mma(p_smem.index(p_base + (n_tiles - 1) % 2), v_smem.index(last), acc, is_async=True)
    acc = warpgroup_mma_wait(0, deps=(o_tok, ))

    _store_rows(acc, m_i, l_i, start_m, pid_bh, N_QUERIES, qk_scale, o_ptr, lse_ptr, M_C, HEAD_DIM, o_layout, dtype)


@gluon.jit
def flash_fwd_hopper_ws_kernel(
    q_desc, k_desc, v_desc, o_ptr, lse_ptr,
    N_QUERIES, N_KEYS, sm_scale,
    HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
    IS_CAUSAL: gl.constexpr, PINGPONG: gl.constexpr = True,
):
    """Warp-specialised forward (fa3-v4), same grid, outputs and conventions as `flash_fwd_hopper_kernel`.

    q_desc's block is one consumer's rows: [64, d] with PINGPONG (4 warps per consumer, two consumers),
    [BLOCK_M, d] without (one consumer of num_warps = BLOCK_M / 16 warps). Launch with maxnreg=WS_MAXNREG."""
    NUM_CONSUMERS: gl.constexpr = 2 if PINGPONG else 1
    M_C: gl.constexpr = BLOCK_M // NUM_CONSUMERS
    gl.static_assert(q_desc.block_type.shape[0] == M_C, "q_desc's block must be one consumer's rows")
    gl.static_assert(gl.num_warps() * 16 == M_C, "a consumer warpgroup owns 64 rows")
    dtype: gl.constexpr = q_desc.dtype
    pid_bh = gl.program_id(0)
    tile_start = _query_tile_start(N_QUERIES, BLOCK_M, IS_CAUSAL)
    q_row0 = pid_bh * N_QUERIES + tile_start
    kv_row0 = pid_bh * N_KEYS
    hi, mask_from = _key_bounds(tile_start, N_KEYS, BLOCK_M, IS_CAUSAL)
    n_tiles = gl.cdiv(hi, BLOCK_N)
    qk_scale = sm_scale * 1.4426950408889634

    q_smem = gl.allocate_shared_memory(dtype, [NUM_CONSUMERS, M_C, HEAD_DIM], q_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], v_desc.layout)
    p_smem = gl.allocate_shared_memory(dtype, [2 * NUM_CONSUMERS, M_C, BLOCK_N], P_SMEM_LAYOUT)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    kv_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turn_bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(kv_empty.index(i), count=NUM_CONSUMERS)  # one arrive per consumer partition
    for i in gl.static_range(2):
        mbarrier.init(turn_bars.index(i), count=1)
    if PINGPONG:
        mbarrier.arrive(turn_bars.index(0), count=1)  # consumer 0 issues first

    # the partitions' argument lists are written out in full: the frontend takes a function only as the first
    # element of each (function, arguments) pair
    if PINGPONG:
        gl.warp_specialize([
            (_ws_consumer, (q_smem, k_smem, v_smem, p_smem, q_bar, k_ready, v_ready, kv_empty, turn_bars, o_ptr,
                            lse_ptr, pid_bh, tile_start, n_tiles, mask_from, N_QUERIES, N_KEYS, qk_scale,
                            0, PINGPONG, HEAD_DIM, BLOCK_N, STAGES, IS_CAUSAL)),
            (_ws_consumer, (q_smem, k_smem, v_smem, p_smem, q_bar, k_ready, v_ready, kv_empty, turn_bars, o_ptr,
                            lse_ptr, pid_bh, tile_start, n_tiles, mask_from, N_QUERIES, N_KEYS, qk_scale,
                            1, PINGPONG, HEAD_DIM, BLOCK_N, STAGES, IS_CAUSAL)),
            (_ws_producer, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_empty,
                            q_row0, kv_row0, n_tiles, NUM_CONSUMERS, BLOCK_N, STAGES)),
        ], [4, 1], [WS_CONSUMER_REGS, WS_PRODUCER_REGS])
    else:
        gl.warp_specialize([
            (_ws_consumer, (q_smem, k_smem, v_smem, p_smem, q_bar, k_ready, v_ready, kv_empty, turn_bars, o_ptr,
                            lse_ptr, pid_bh, tile_start, n_tiles, mask_from, N_QUERIES, N_KEYS, qk_scale,
                            0, PINGPONG, HEAD_DIM, BLOCK_N, STAGES, IS_CAUSAL)),
            (_ws_producer, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_empty,
                            q_row0, kv_row0, n_tiles, NUM_CONSUMERS, BLOCK_N, STAGES)),
        ], [1], [WS_PRODUCER_REGS])


# ------------------------------------------------------------------------------ pipelined dQ (fa3-v7)
#
# The dQ side of the split backward with fa3-v5's interleaving: one warpgroup per 64-query tile walks the key
# tiles that tile sees, K and V through a TMA ring, and issues per key tile j: S_j = Q K_jᵀ, then the previous
# tile's dQ += dS_{j−1} K_{j−1} (dS from double-buffered shared memory), then dP_j = dO V_jᵀ; waits for S_j only,
# so the exponentials run under the other two products. Every key tile but the last is wholly visible (below the
# causal diagonal, inside N_KEYS): only the last one is masked, so it runs after the loop. Like the Triton dQ
# kernel it runs first in the backward and writes D = rowsum(dO ∘ O) for the dK/dV kernel.


@gluon.jit
def _dq_step(j, q_smem, do_smem, k_smem, v_smem, ds_smem, kv_bars, k_desc, v_desc, kv_row0, n_tiles, dq, s_zero,
             l2, delta, offs_m, N_KEYS, qk_scale, IS_CAUSAL: gl.constexpr, HAS_PREV: gl.constexpr,
             MASKED: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, s_layout: gl.constexpr,
             ANCHOR_P: gl.constexpr):
    """Key tile j: its S and dP products around the previous tile's dQ product, its dS into shared memory."""
    stage = j % STAGES
    buf = j % 2
    mbarrier.wait(kv_bars.index(stage), (j // STAGES) & 1)
    s_tok = warpgroup_mma(q_smem, k_smem.index(stage).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    if HAS_PREV:
        dq_tok = warpgroup_mma(ds_smem.index(1 - buf), k_smem.index((j - 1) % STAGES), dq, is_async=True)
    dp_tok = warpgroup_mma(do_smem, v_smem.index(stage).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    if HAS_PREV:
        s = warpgroup_mma_wait(2, deps=(s_tok, ))
    else:
        s = warpgroup_mma_wait(1, deps=(s_tok, ))
    if MASKED:  # keys past N_KEYS (the next head's rows, or zero fill) and, causal, past each query
        offs_n = j * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        keep = offs_n[None, :] < N_KEYS
        if IS_CAUSAL:
            keep = keep & (offs_n[None, :] <= offs_m[:, None])
        s = gl.where(keep, s, -float("inf"))
    p = gl.exp2(s * qk_scale - l2[:, None])  # under dQ_{j-1} and dP_j
    if HAS_PREV:
        if ANCHOR_P:
            # a store of P (overwritten by dS below) that ptxas keeps above the wait, and with it the exponentials
            # it needs: without one it sinks all but 6 of the 32 below the wait (nothing else reads them first)
            ds_smem.index(buf).store(p.to(ds_smem.dtype))
        dp, dq = warpgroup_mma_wait(0, deps=(dp_tok, dq_tok))
        # dQ_{j-1} was the last reader of tile j-1's stage: refill it
        _issue_pair(k_desc, v_desc, k_smem, v_smem, kv_bars, j - 1 + STAGES, kv_row0, n_tiles, BLOCK_N, STAGES)
    else:
        dp = warpgroup_mma_wait(0, deps=(dp_tok, ))
    ds = p * (dp - delta[:, None])
    ds_smem.index(buf).store(ds.to(ds_smem.dtype))
    fence_async_shared()
    return dq


@gluon.jit
def flash_bwd_dq_hopper_kernel(
    q_desc, k_desc, v_desc, do_desc, o_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
    N_QUERIES, N_KEYS, sm_scale,
    HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
    IS_CAUSAL: gl.constexpr, ANCHOR_P: gl.constexpr = True,
):
    """dQ of one (batch·head, 64-query tile) per program, grid (batch·heads, cdiv(N_QUERIES, 64)), the longest
    tiles first under a causal mask; also writes D. o_ptr, do_ptr, dq_ptr: contiguous (batch·heads, N_QUERIES,
    HEAD_DIM) in the inputs' dtype; lse_ptr (natural log) and delta_ptr: float32 (batch·heads, N_QUERIES)."""
    gl.static_assert(gl.num_warps() == 4, "one warpgroup per program")
    gl.static_assert(BLOCK_M == 64, "one warpgroup's rows")
    gl.static_assert(STAGES >= 2, "a stage is refilled after the dQ product that reads it")
    dtype: gl.constexpr = q_desc.dtype
    pid_bh = gl.program_id(0)
    pid_m = gl.program_id(1)
    if IS_CAUSAL:
        pid_m = gl.num_programs(1) - 1 - pid_m
    start_m = pid_m * BLOCK_M
    q_row0 = pid_bh * N_QUERIES + start_m
    kv_row0 = pid_bh * N_KEYS
    row_base = pid_bh.to(gl.int64) * N_QUERIES
    hi = gl.minimum(start_m + BLOCK_M, N_KEYS) if IS_CAUSAL else N_KEYS
    n_tiles = gl.cdiv(hi, BLOCK_N)

    s_layout: gl.constexpr = _warpgroup_mma_layout(BLOCK_N)
    acc_layout: gl.constexpr = _warpgroup_mma_layout(HEAD_DIM)
    q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM], q_desc.layout)
    do_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM], do_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], v_desc.layout)
    ds_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    ds_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_M, BLOCK_N], ds_layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    kv_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(kv_bars.index(i), count=1)
    mbarrier.expect(q_bar, q_desc.block_type.nbytes + do_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [q_row0, 0], q_bar, q_smem)
    tma.async_copy_global_to_shared(do_desc, [q_row0, 0], q_bar, do_smem)
    for i in gl.static_range(STAGES):
        _issue_pair(k_desc, v_desc, k_smem, v_smem, kv_bars, i, kv_row0, n_tiles, BLOCK_N, STAGES)

    # D = rowsum(dO ∘ O) of this tile (for the dK/dV kernel too) and L₂; rows past N_QUERIES: D = 0, L₂ = +inf
    io_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    rows_io = start_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, io_layout))
    cols_io = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, io_layout))
    io_off = (row_base + rows_io)[:, None] * HEAD_DIM + cols_io[None, :]
    io_ok = (rows_io < N_QUERIES)[:, None]
    o = gl.load(o_ptr + io_off, mask=io_ok, other=0.0).to(gl.float32)
    do = gl.load(do_ptr + io_off, mask=io_ok, other=0.0).to(gl.float32)
    delta_io = gl.sum(o * do, axis=1)
    gl.store(delta_ptr + row_base + rows_io, delta_io, mask=rows_io < N_QUERIES)
    delta = gl.convert_layout(delta_io, gl.SliceLayout(1, s_layout))
    offs_m = start_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
    l2 = gl.load(lse_ptr + row_base + offs_m, mask=offs_m < N_QUERIES, other=float("inf")) * LOG2E

    qk_scale = sm_scale * 1.4426950408889634
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
    dq = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=acc_layout)
    mbarrier.wait(q_bar, 0)
    if n_tiles > 1:
        dq = _dq_step(0, q_smem, do_smem, k_smem, v_smem, ds_smem, kv_bars, k_desc, v_desc, kv_row0, n_tiles, dq,
                      s_zero, l2, delta, offs_m, N_KEYS, qk_scale, IS_CAUSAL, False, False, BLOCK_N, STAGES,
                      s_layout, ANCHOR_P)
        for j in range(1, n_tiles - 1):
            dq = _dq_step(j, q_smem, do_smem, k_smem, v_smem, ds_smem, kv_bars, k_desc, v_desc, kv_row0, n_tiles,
                          dq, s_zero, l2, delta, offs_m, N_KEYS, qk_scale, IS_CAUSAL, True, False, BLOCK_N, STAGES,
                          s_layout, ANCHOR_P)
        dq = _dq_step(n_tiles - 1, q_smem, do_smem, k_smem, v_smem, ds_smem, kv_bars, k_desc, v_desc, kv_row0,
                      n_tiles, dq, s_zero, l2, delta, offs_m, N_KEYS, qk_scale, IS_CAUSAL, True, True, BLOCK_N,
                      STAGES, s_layout, ANCHOR_P)
    else:
        dq = _dq_step(0, q_smem, do_smem, k_smem, v_smem, ds_smem, kv_bars, k_desc, v_desc, kv_row0, n_tiles, dq,
                      s_zero, l2, delta, offs_m, N_KEYS, qk_scale, IS_CAUSAL, False, True, BLOCK_N, STAGES,
                      s_layout, ANCHOR_P)
    last = n_tiles - 1
    dq_tok = warpgroup_mma(ds_smem.index(last % 2), k_smem.index(last % STAGES), dq, is_async=True)
    dq = warpgroup_mma_wait(0, deps=(dq_tok, ))
    mbarrier.invalidate(q_bar)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(kv_bars.index(i))

    rows = start_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, acc_layout))
    cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, acc_layout))
    out_off = (row_base + rows)[:, None] * HEAD_DIM + cols[None, :]
    gl.store(dq_ptr + out_off, (dq * sm_scale).to(dtype), mask=(rows < N_QUERIES)[:, None])


# --------------------------------------------------------------- pipelined dK/dV, shared copies (fa3-v6)
#
# fa3-v5's schedule in two consumer warpgroups of one program, each owning 64 of the program's 128 keys, fed by a
# producer warp that copies each Q/dO tile once for both: half the L2-to-SM traffic of v5's 64-key programs (each
# 64-key program reads every Q/dO tile above its diagonal; at the leaderboard shape that is ~8.6 GB a backward).
# Ring stages are freed by an "empty" mbarrier that each consumer arrives at once its dK product of that tile has
# finished (count 2), so the consumers never meet at a CTA barrier; their own barriers (before a product reads the
# P^T / dS^T they stored) span their own 128 threads. Under a causal mask the second consumer's keys see nothing of
# query tile 0, so it frees that stage at once and starts on tile 1, its diagonal.


@gluon.jit
def _v6_producer(q_desc, k_desc, v_desc, do_desc, q_smem, k_smem, v_smem, do_smem, kv_bar, ready, empty,
                 kv_row0, q_row0, n_tiles, BLOCK_M: gl.constexpr, STAGES: gl.constexpr):
    """The load partition: both consumers' K and V halves once, then every Q/dO tile through the ring."""
    H: gl.constexpr = k_desc.block_type.shape[0]
    mbarrier.expect(kv_bar, 2 * (k_desc.block_type.nbytes + v_desc.block_type.nbytes))
    for c in gl.static_range(2):
        tma.async_copy_global_to_shared(k_desc, [kv_row0 + c * H, 0], kv_bar, k_smem.index(c))
        tma.async_copy_global_to_shared(v_desc, [kv_row0 + c * H, 0], kv_bar, v_smem.index(c))
    for t in range(n_tiles):
        stage = t % STAGES
        # a fresh mbarrier counts as having completed the phase before phase 0: the first round passes
        mbarrier.wait(empty.index(stage), ((t // STAGES) & 1) ^ 1)
        bar = ready.index(stage)
        mbarrier.expect(bar, q_desc.block_type.nbytes + do_desc.block_type.nbytes)
        row = q_row0 + t * BLOCK_M
        tma.async_copy_global_to_shared(q_desc, [row, 0], bar, q_smem.index(stage))
        tma.async_copy_global_to_shared(do_desc, [row, 0], bar, do_smem.index(stage))


@gluon.jit
def _v6_consumer(k_smem, v_smem, q_smem, do_smem, p_smem, ds_smem, kv_bar, ready, empty, lse_ptr, delta_ptr,
                 dk_ptr, dv_ptr, pid_bh, start_n, lo, n_tiles, N_QUERIES, N_KEYS, sm_scale,
                 WG: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, STAGES: gl.constexpr,
                 IS_CAUSAL: gl.constexpr):
    """Keys start_n + 64·WG … +64: fa3-v5's loop on the shared ring, freeing each stage through `empty`."""
    gl.static_assert(gl.num_warps() == 4, "a consumer is one warpgroup")
    H: gl.constexpr = 64
    s_layout: gl.constexpr = _warpgroup_mma_layout(BLOCK_M)
    acc_layout: gl.constexpr = _warpgroup_mma_layout(HEAD_DIM)
    k_s = k_smem.index(WG)
    v_s = v_smem.index(WG)
    key0 = start_n + WG * H
    row_base = pid_bh.to(gl.int64) * N_QUERIES
    qk_scale = sm_scale * 1.4426950408889634
    offs_n = key0 + gl.arange(0, H, layout=gl.SliceLayout(1, s_layout))
    s_zero = gl.zeros([H, BLOCK_M], gl.float32, layout=s_layout)
    dk = gl.zeros([H, HEAD_DIM], gl.float32, layout=acc_layout)
    dv = gl.zeros([H, HEAD_DIM], gl.float32, layout=acc_layout)
    # the first query tile that sees these keys: under a causal mask the second consumer's diagonal is tile 1
    t0 = WG if IS_CAUSAL else 0
    if t0 > 0:
        mbarrier.arrive(empty.index(0), count=1, pred=n_tiles > 0)
    l2, delta = _v5_vectors(lse_ptr, delta_ptr, row_base, lo + t0 * BLOCK_M, N_QUERIES, BLOCK_M, s_layout)
    mbarrier.wait(kv_bar, 0)
    # the copies are the producer's: no descriptors here (the refill branch of the loop is compiled out)
    dk, dv = _dkdv_pipelined(k_s, v_s, q_smem, do_smem, p_smem, ds_smem, ready, empty, None, None, 0,
                             lse_ptr, delta_ptr, row_base, lo, t0, n_tiles, offs_n, N_QUERIES, qk_scale, dk, dv,
                             s_zero, l2, delta, IS_CAUSAL, BLOCK_M, STAGES, s_layout, True)
    _store_key_rows(dk, dv, dk_ptr, dv_ptr, key0, pid_bh, N_KEYS, sm_scale, H, HEAD_DIM, acc_layout)


@gluon.jit
def flash_bwd_dkdv_hopper_v6_kernel(
    q_desc, k_desc, v_desc, do_desc, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    N_QUERIES, N_KEYS, sm_scale,
    HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
    IS_CAUSAL: gl.constexpr,
):
    """dK, dV of one (batch·head, 128-key tile) per program, grid (batch·heads, cdiv(N_KEYS, 128)): two fa3-v5
    consumers of 64 keys each (the default partition of 4 warps and a 4-warp worker) and a 1-warp producer.
    k_desc and v_desc have 64-row blocks (one consumer's keys), q_desc and do_desc BLOCK_M = 64. Launch with
    num_warps=4 and maxnreg=WS_MAXNREG."""
    gl.static_assert(BLOCK_N == 128, "two consumers of 64 keys")
    gl.static_assert(BLOCK_M == 64, "the causal diagonal of a consumer must be one query tile")
    gl.static_assert(k_desc.block_type.shape[0] == 64, "k_desc's block is one consumer's keys")
    dtype: gl.constexpr = q_desc.dtype
    pid_bh = gl.program_id(0)
    start_n = gl.program_id(1) * BLOCK_N
    kv_row0 = pid_bh * N_KEYS + start_n
    lo = start_n if IS_CAUSAL else 0
    n_tiles = gl.cdiv(gl.maximum(N_QUERIES - lo, 0), BLOCK_M)
    q_row0 = pid_bh * N_QUERIES + lo

    k_smem = gl.allocate_shared_memory(dtype, [2, 64, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [2, 64, HEAD_DIM], v_desc.layout)
    q_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, HEAD_DIM], q_desc.layout)
    do_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, HEAD_DIM], do_desc.layout)
    ps_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    p0 = gl.allocate_shared_memory(dtype, [2, 64, BLOCK_M], ps_layout)  # each consumer's own P^T, dS^T pairs
    ds0 = gl.allocate_shared_memory(dtype, [2, 64, BLOCK_M], ps_layout)
    p1 = gl.allocate_shared_memory(dtype, [2, 64, BLOCK_M], ps_layout)
    ds1 = gl.allocate_shared_memory(dtype, [2, 64, BLOCK_M], ps_layout)
    kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(kv_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)  # one arrive per consumer

    # the partitions' argument lists are written out in full (see flash_fwd_hopper_ws_kernel)
    gl.warp_specialize([
        (_v6_consumer, (k_smem, v_smem, q_smem, do_smem, p0, ds0, kv_bar, ready, empty, lse_ptr, delta_ptr,
                        dk_ptr, dv_ptr, pid_bh, start_n, lo, n_tiles, N_QUERIES, N_KEYS, sm_scale,
                        0, HEAD_DIM, BLOCK_M, STAGES, IS_CAUSAL)),
        (_v6_consumer, (k_smem, v_smem, q_smem, do_smem, p1, ds1, kv_bar, ready, empty, lse_ptr, delta_ptr,
                        dk_ptr, dv_ptr, pid_bh, start_n, lo, n_tiles, N_QUERIES, N_KEYS, sm_scale,
                        1, HEAD_DIM, BLOCK_M, STAGES, IS_CAUSAL)),
        (_v6_producer, (q_desc, k_desc, v_desc, do_desc, q_smem, k_smem, v_smem, do_smem, kv_bar, ready, empty,
                        kv_row0, q_row0, n_tiles, BLOCK_M, STAGES)),
    ], [4, 1], [WS_CONSUMER_REGS, WS_PRODUCER_REGS])
