"""Decode attention over a paged KV cache: one new query token per sequence attends to all of its cached keys,
which live in fixed-size blocks scattered over a shared pool and are found through a per-sequence block table.

Layout (serving design): per layer `k_cache: (num_blocks, block_size, kv_heads, d_k)`, `v_cache: (num_blocks,
block_size, kv_heads, d_v)`; slot s = block · block_size + offset. MLA keeps one latent pool with `v_cache=None`
whose first `value_dim` columns are the values. `block_tables`: int32 (batch, max_blocks_per_seq);
`context_lens`: int32 (batch,), the number of keys INCLUDING the token being decoded (query position ctx − 1).

Three implementations of the same math:
- `paged_attention_reference`: gathers every sequence's blocks with one advanced index, masks, fp32 softmax.
- `paged_attention_triton`: one program per (sequence, kv head[, head chunk][, key split]); every query head of
  the group shares each K/V tile it loads (GQA/MQA/MLA read the cache once per group, not once per head);
  online softmax over key tiles in fp32; optional split-K ("flash-decoding") with a small reduce kernel when
  there are too few (sequence, kv head) programs to fill the GPU. Launch geometry depends on tensor shapes
  only and nothing is read back to the host, so it can be captured in a CUDA graph.
- `paged_attention(..., backend="auto")` checks shapes and picks Triton for CUDA tensors.
"""

from __future__ import annotations

import functools
import math
import os

import torch
from jaxtyping import Float, Int
from torch import Tensor

try:  # Triton is optional: CPU-only installs still get the reference path.
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    HAVE_TRITON = False

LOG2E = 1.4426950408889634
BACKENDS = ("auto", "torch", "triton")
# MHA (one query head per kv head): "1" runs the group product on the tensor cores anyway (the head tile padded
# to 16 rows, 15 of them zero), "0" uses an elementwise multiply-reduce. Read once at import.
_settings = {"mha_dot": os.environ.get("CS336_PAGED_MHA_DOT", "1") == "1"}


def set_mha_dot(enabled: bool) -> None:
    """Whether MHA (group of 1) uses the tl.dot path (default) or the elementwise one."""
    _settings["mha_dot"] = bool(enabled)


# ------------------------------------------------------------------------------------------------ cache writes


def write_kv(
    k_cache: Float[Tensor, "blocks block_size kv_heads d_k"],
    v_cache: Float[Tensor, "blocks block_size kv_heads d_v"] | None,
    k: Float[Tensor, "tokens kv_heads d_k"],
    v: Float[Tensor, "tokens kv_heads d_v"] | None,
    slot_mapping: Int[Tensor, " tokens"],
) -> None:
    """Store each token's K (and V) at its flat slot block·block_size + offset, in place.

    `view` (not `reshape`) so a cache whose first two dims can't be flattened raises instead of silently writing
    into a copy. Slots repeated within one call (padded rows all pointing at scratch block 0) leave an arbitrary
    one of the writes there, which is fine for scratch."""
    if k_cache.dim() != 4 or k.dim() != 3:
        raise ValueError(f"write_kv: k_cache must be 4-D and k 3-D, got {tuple(k_cache.shape)} and {tuple(k.shape)}")
    if (v_cache is None) != (v is None):
        raise ValueError("write_kv: v and v_cache must both be given or both be None (MLA latent pool)")
    if slot_mapping.dim() != 1 or slot_mapping.shape[0] != k.shape[0]:
        raise ValueError(f"write_kv: slot_mapping must be (tokens,)={k.shape[0]}, got {tuple(slot_mapping.shape)}")
    if slot_mapping.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"write_kv: slot_mapping must be int64 (or int32), got {slot_mapping.dtype}")
    slots = slot_mapping.long()
    pairs = [(k_cache, k, "k")] if v_cache is None else [(k_cache, k, "k"), (v_cache, v, "v")]
    for cache, new, name in pairs:
        if cache.dim() != 4 or new.dim() != 3 or cache.shape[2:] != new.shape[1:]:
            raise ValueError(
                f"write_kv: {name} of shape {tuple(new.shape)} does not fit cache rows {tuple(cache.shape[2:])}"
            )
        if cache.device != new.device or slots.device != cache.device:
            raise ValueError(f"write_kv: {name}, its cache and slot_mapping must be on one device")
        flat = cache.view(-1, *cache.shape[2:])
        flat.index_copy_(0, slots, new.to(cache.dtype))


# ------------------------------------------------------------------------------------------------ validation


def _check_inputs(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor | None,
    block_tables: Tensor,
    context_lens: Tensor,
    value_dim: int | None,
    sliding_window: int | None,
    alibi_slopes: Tensor | None,
) -> tuple[int, int, int]:
    """Shape/dtype/device checks only (no reads of tensor contents: no host sync). Returns (group, d_k, d_v)."""
    if q.dim() != 3:
        raise ValueError(f"q must be (batch, heads, d_k), got shape {tuple(q.shape)}")
    if k_cache.dim() != 4:
        raise ValueError(f"k_cache must be (blocks, block_size, kv_heads, d_k), got shape {tuple(k_cache.shape)}")
    batch, heads, d_k = q.shape
    _, block_size, kv_heads, ck = k_cache.shape
    if ck != d_k:
        raise ValueError(f"q head dim {d_k} != k_cache head dim {ck}")
    if kv_heads < 1 or heads % kv_heads:
        raise ValueError(f"query heads ({heads}) must be a multiple of kv heads ({kv_heads})")
    if block_size < 1:
        raise ValueError("block_size must be positive")
    if k_cache.dtype != q.dtype:
        raise ValueError(f"q ({q.dtype}) and k_cache ({k_cache.dtype}) must have the same dtype")
    tensors = {"k_cache": k_cache, "block_tables": block_tables, "context_lens": context_lens}
    if v_cache is None:
        d_v = d_k if value_dim is None else value_dim
        if not 1 <= d_v <= d_k:
            raise ValueError(f"value_dim must be in [1, {d_k}] when v_cache is None, got {value_dim}")
    else:
        if v_cache.dim() != 4 or v_cache.shape[:3] != k_cache.shape[:3]:
            raise ValueError(
                f"v_cache {tuple(v_cache.shape)} must share (blocks, block_size, kv_heads) with k_cache "
                f"{tuple(k_cache.shape)}"
            )
        if v_cache.dtype != q.dtype:
            raise ValueError(f"q ({q.dtype}) and v_cache ({v_cache.dtype}) must have the same dtype")
        d_v = v_cache.shape[3]
        if value_dim is not None and value_dim != d_v:
            raise ValueError(f"value_dim {value_dim} != v_cache head dim {d_v}")
        tensors["v_cache"] = v_cache
    if block_tables.dtype != torch.int32 or block_tables.dim() != 2 or block_tables.shape[0] != batch:
        raise ValueError(
            f"block_tables must be int32 (batch={batch}, max_blocks), got {block_tables.dtype} "
            f"{tuple(block_tables.shape)}"
        )
    if context_lens.dtype != torch.int32 or tuple(context_lens.shape) != (batch,):
        raise ValueError(
            f"context_lens must be int32 (batch={batch},), got {context_lens.dtype} {tuple(context_lens.shape)}"
        )
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be a positive int or None, got {sliding_window}")
    if alibi_slopes is not None:
        if tuple(alibi_slopes.shape) != (heads,):
            raise ValueError(f"alibi_slopes must be (heads={heads},), got {tuple(alibi_slopes.shape)}")
        if not alibi_slopes.is_floating_point():
            raise ValueError(f"alibi_slopes must be floating point, got {alibi_slopes.dtype}")
        tensors["alibi_slopes"] = alibi_slopes
    for name, t in tensors.items():
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    return heads // kv_heads, d_k, d_v


# ------------------------------------------------------------------------------------------------ reference


def paged_attention_reference(
    q: Float[Tensor, "batch heads d_k"],
    k_cache: Float[Tensor, "blocks block_size kv_heads d_k"],
    v_cache: Float[Tensor, "blocks block_size kv_heads d_v"] | None,
    block_tables: Int[Tensor, "batch max_blocks"],
    context_lens: Int[Tensor, " batch"],
    *,
    scale: float,
    value_dim: int | None = None,
    sliding_window: int | None = None,
    alibi_slopes: Float[Tensor, " heads"] | None = None,
) -> Float[Tensor, "batch heads d_v"]:
    """Gather all max_blocks·block_size candidate keys per sequence, mask those outside [lo, ctx), softmax in fp32.

    Memory is O(batch · max_blocks · block_size · kv_heads · d) in fp32: a test/fallback path, not a fast one."""
    group, _, d_v = _check_inputs(
        q, k_cache, v_cache, block_tables, context_lens, value_dim, sliding_window, alibi_slopes
    )
    batch, heads, d_k = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    length = block_tables.shape[1] * block_size
    idx = block_tables.long()
    keys = k_cache[idx].reshape(batch, length, kv_heads, d_k).float()  # (B, L, KV, D)
    values = (k_cache[..., :d_v] if v_cache is None else v_cache)[idx].reshape(batch, length, kv_heads, d_v).float()
    qg = q.float().view(batch, kv_heads, group, d_k)
    scores = torch.einsum("bkgd,blkd->bkgl", qg, keys) * scale  # (B, KV, G, L)

    pos = torch.arange(length, device=q.device)
    ctx = context_lens.long()[:, None]
    valid = pos[None, :] < ctx
    if sliding_window is not None:
        valid &= pos[None, :] >= ctx - sliding_window
    if alibi_slopes is not None:
        distance = (ctx - 1 - pos[None, :]).float()  # query pos − key pos, (B, L)
        slopes = alibi_slopes.float().view(kv_heads, group)
        scores = scores - slopes[None, :, :, None] * distance[:, None, None, :]
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row with no keys (ctx 0) gives zeros, not NaN
    # Unused slots (scratch block 0, a block's tail, torch.empty pools) may hold NaN/inf: 0·NaN would leak in.
    values = values.masked_fill(~valid[:, :, None, None], 0.0)
    out = torch.einsum("bkgl,blkd->bkgd", probs, values)
    return out.reshape(batch, heads, d_v).to(q.dtype)


# ------------------------------------------------------------------------------------------------ Triton

if HAVE_TRITON:

    @triton.jit
    def _paged_decode_kernel(
        q_ptr, k_ptr, v_ptr, bt_ptr, ctx_ptr, slopes_ptr, out_ptr, m_ptr, l_ptr,
        scale_log2, window, partition, max_blocks,
        stride_qb, stride_qh, stride_qd,
        stride_kb, stride_kt, stride_kh, stride_kd,
        stride_vb, stride_vt, stride_vh, stride_vd,
        stride_btb, stride_btn,
        stride_ob, stride_oh, stride_os, stride_od,
        stride_mb, stride_mh, stride_ms,
        GROUP: tl.constexpr, HEAD_BLOCK: tl.constexpr, HEAD_CHUNKS: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
        D: tl.constexpr, D_P: tl.constexpr, DV: tl.constexpr, DV_P: tl.constexpr,
        USE_DOT: tl.constexpr, PRECISION: tl.constexpr,
        HAS_WINDOW: tl.constexpr, HAS_ALIBI: tl.constexpr, SPLIT: tl.constexpr,
    ):  # fmt: skip
        """Program (b, kv_head·HEAD_CHUNKS + chunk, split): HEAD_BLOCK query heads of one kv group against the
        keys [max(lo, split start), min(ctx, split end)) of sequence b, BLOCK_N keys per step.

        Scores are kept in base 2 (exp2); padded heads (≥ GROUP) and padded dims read zeros and are not stored.
        USE_DOT: the group's heads times the key tile on the tensor cores (heads padded to ≥ 16); otherwise
        (one head per kv head, MHA) an elementwise multiply-reduce, which wastes nothing on padding."""
        b = tl.program_id(0)
        pid1 = tl.program_id(1)
        split = tl.program_id(2)
        kvh = pid1 // HEAD_CHUNKS
        g = (pid1 % HEAD_CHUNKS) * HEAD_BLOCK + tl.arange(0, HEAD_BLOCK)
        head_ok = g < GROUP
        h = kvh * GROUP + g

        ctx = tl.load(ctx_ptr + b)
        lo = 0
        if HAS_WINDOW:
            lo = tl.maximum(ctx - window, 0)
        if SPLIT:
            start = split * partition
            end = tl.minimum(start + partition, ctx)
        else:
            start = 0
            end = ctx
        start = tl.maximum(start, (lo // BLOCK_SIZE) * BLOCK_SIZE)  # skip whole blocks before the window

        offs_d = tl.arange(0, D_P)
        offs_dv = tl.arange(0, DV_P)
        d_ok = offs_d < D
        dv_ok = offs_dv < DV
        q = tl.load(
            q_ptr + b * stride_qb + h[:, None] * stride_qh + offs_d[None, :] * stride_qd,
            mask=head_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        if not USE_DOT:
            q = q.to(tl.float32)
        if HAS_ALIBI:
            slopes = tl.load(slopes_ptr + h, mask=head_ok, other=0.0).to(tl.float32) * 1.4426950408889634

        m_i = tl.full([HEAD_BLOCK], float("-inf"), tl.float32)
        l_i = tl.zeros([HEAD_BLOCK], tl.float32)
        acc = tl.zeros([HEAD_BLOCK, DV_P], tl.float32)
        bt_row = bt_ptr + b.to(tl.int64) * stride_btb
        k_head = k_ptr + kvh.to(tl.int64) * stride_kh
        v_head = v_ptr + kvh.to(tl.int64) * stride_vh
        for t0 in range(start, end, BLOCK_N):
            offs_n = t0 + tl.arange(0, BLOCK_N)
            logical = offs_n // BLOCK_SIZE
            valid = (offs_n >= lo) & (offs_n < end) & (logical < max_blocks)
            blk = tl.load(bt_row + logical * stride_btn, mask=valid, other=0).to(tl.int64)
            row = blk * stride_kb + (offs_n % BLOCK_SIZE) * stride_kt
            k = tl.load(
                k_head + row[:, None] + offs_d[None, :] * stride_kd, mask=valid[:, None] & d_ok[None, :], other=0.0
            )
            if USE_DOT:
                qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
            else:
                qk = tl.trans(tl.sum(k.to(tl.float32) * q, axis=1)[:, None])  # (1, BLOCK_N)
            s = qk * scale_log2
            if HAS_ALIBI:  # −slope·(q_pos − k_pos) = slope·(k_pos − (ctx − 1)), in base 2
                s += slopes[:, None] * (offs_n - (ctx - 1)).to(tl.float32)[None, :]
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a fully masked tile gives p = 0, not NaN
            alpha = tl.math.exp2(m_i - m_safe)
            p = tl.math.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)

            vrow = blk * stride_vb + (offs_n % BLOCK_SIZE) * stride_vt
            v = tl.load(
                v_head + vrow[:, None] + offs_dv[None, :] * stride_vd,
                mask=valid[:, None] & dv_ok[None, :],
                other=0.0,
            )
            if USE_DOT:
                pv = tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            else:
                pv = tl.sum(tl.trans(p) * v.to(tl.float32), axis=0)[None, :]  # (1, DV_P)
            acc = acc * alpha[:, None] + pv
            m_i = m_new

        out_mask = head_ok[:, None] & dv_ok[None, :]
        if SPLIT:  # unnormalised partials; the reduce kernel rescales them by exp2(m − max m)
            o_ptrs = out_ptr + b * stride_ob + h[:, None] * stride_oh + split * stride_os + offs_dv[None, :]
            tl.store(o_ptrs, acc, mask=out_mask)
            ml = b * stride_mb + h * stride_mh + split * stride_ms
            tl.store(m_ptr + ml, m_i, mask=head_ok)
            tl.store(l_ptr + ml, l_i, mask=head_ok)
        else:
            denom = tl.where(l_i == 0.0, 1.0, l_i)
            out = acc / denom[:, None]
            o_ptrs = out_ptr + b * stride_ob + h[:, None] * stride_oh + offs_dv[None, :] * stride_od
            tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=out_mask)

    @triton.jit
    def _paged_reduce_kernel(
        part_ptr, m_ptr, l_ptr, out_ptr,
        stride_pb, stride_ph, stride_ps,
        stride_mb, stride_mh, stride_ms,
        stride_ob, stride_oh, stride_od,
        NUM_SPLITS: tl.constexpr, S_P: tl.constexpr, DV: tl.constexpr, DV_P: tl.constexpr,
    ):  # fmt: skip
        """Program (b, h): out = Σ_s 2^(m_s − M)·acc_s / Σ_s 2^(m_s − M)·l_s over the key splits."""
        b = tl.program_id(0)
        h = tl.program_id(1)
        s = tl.arange(0, S_P)
        s_ok = s < NUM_SPLITS
        offs_dv = tl.arange(0, DV_P)
        ml = b * stride_mb + h * stride_mh + s * stride_ms
        m = tl.load(m_ptr + ml, mask=s_ok, other=float("-inf"))
        l = tl.load(l_ptr + ml, mask=s_ok, other=0.0)  # noqa: E741
        m_max = tl.max(m, axis=0)
        m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
        w = tl.math.exp2(m - m_safe)
        denom = tl.sum(w * l, axis=0)
        denom = tl.where(denom == 0.0, 1.0, denom)
        part = tl.load(
            part_ptr + b * stride_pb + h * stride_ph + s[:, None] * stride_ps + offs_dv[None, :],
            mask=s_ok[:, None] & (offs_dv < DV)[None, :],
            other=0.0,
        )
        out = tl.sum(w[:, None] * part, axis=0) / denom
        tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_dv * stride_od, out.to(out_ptr.dtype.element_ty),
                 mask=offs_dv < DV)  # fmt: skip


_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":  # Triton's CPU interpreter (debugging): a few "SMs" so split-K gets exercised
        return 8
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def _pow2(n: int, minimum: int = 1) -> int:
    return max(minimum, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


@functools.lru_cache(maxsize=256)
def _launch_config(group: int, d_k: int, d_v: int, block_size: int, mha_dot: bool) -> dict:
    """Tile sizes from shapes only. Heads of a group share the tile: ≥ 16 rows for tl.dot, capped so the fp32
    accumulator (HEAD_BLOCK × DV_P) stays in registers; larger groups (MLA's 16..128 heads) take several chunks."""
    d_p, dv_p = _pow2(d_k, 16), _pow2(d_v, 16)
    use_dot = group > 1 or mha_dot
    if use_dot:
        cap = 64 if dv_p <= 128 else (32 if dv_p <= 256 else 16)
        head_block = min(_pow2(group, 16), cap)
    else:
        head_block = 1
    block_n = max(_pow2(block_size, 16), min(64, _pow2(8192 // d_p, 16)))
    if not use_dot:
        block_n = max(_pow2(block_size, 16), min(64, _pow2(4096 // d_p, 16)))
    num_warps = 8 if d_p * block_n >= 8192 and use_dot else 4
    return {
        "HEAD_BLOCK": head_block,
        "HEAD_CHUNKS": -(-group // head_block),
        "BLOCK_N": block_n,
        "D_P": d_p,
        "DV_P": dv_p,
        "USE_DOT": use_dot,
        "num_warps": num_warps,
    }


def _choose_splits(programs: int, max_tokens: int, block_n: int, device: torch.device) -> tuple[int, int]:
    """Split-K only when (sequence, kv head, chunk) programs can't fill the SMs and the table is long: aim for
    ~2 waves, each split ≥ 256 keys. Depends on shapes only (max_tokens = max_blocks·block_size), never on
    context_lens, so a captured graph stays valid for any lengths that fit the table."""
    sms = _sm_count(device)
    if programs >= sms or max_tokens < 512:
        return 1, max_tokens
    splits = min(-(-2 * sms // programs), max(1, max_tokens // 256), 64)
    partition = -(-max_tokens // splits)
    partition = -(-partition // block_n) * block_n
    return -(-max_tokens // partition), partition


def paged_attention_triton(
    q: Float[Tensor, "batch heads d_k"],
    k_cache: Float[Tensor, "blocks block_size kv_heads d_k"],
    v_cache: Float[Tensor, "blocks block_size kv_heads d_v"] | None,
    block_tables: Int[Tensor, "batch max_blocks"],
    context_lens: Int[Tensor, " batch"],
    *,
    scale: float,
    value_dim: int | None = None,
    sliding_window: int | None = None,
    alibi_slopes: Float[Tensor, " heads"] | None = None,
    num_splits: int | None = None,
) -> Float[Tensor, "batch heads d_v"]:
    """Triton decode kernel (CUDA only). `num_splits`: None picks split-K from shapes; 1 disables it; n > 1
    forces n key splits (tests)."""
    group, d_k, d_v = _check_inputs(
        q, k_cache, v_cache, block_tables, context_lens, value_dim, sliding_window, alibi_slopes
    )
    if not HAVE_TRITON:
        raise RuntimeError("paged_attention_triton needs Triton")
    if q.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"paged_attention_triton needs CUDA tensors, q is on {q.device}")
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"unsupported dtype {q.dtype}")
    batch, heads, _ = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    v_src = k_cache if v_cache is None else v_cache
    cfg = _launch_config(group, d_k, d_v, block_size, _settings["mha_dot"])
    max_blocks = block_tables.shape[1]
    max_tokens = max_blocks * block_size
    programs = batch * kv_heads * cfg["HEAD_CHUNKS"]
    if num_splits is None:
        splits, partition = _choose_splits(programs, max_tokens, cfg["BLOCK_N"], q.device)
    else:
        if num_splits < 1:
            raise ValueError(f"num_splits must be >= 1, got {num_splits}")
        partition = -(-max(max_tokens, 1) // num_splits)
        partition = -(-partition // cfg["BLOCK_N"]) * cfg["BLOCK_N"]
        splits = num_splits
    out = torch.empty(batch, heads, d_v, device=q.device, dtype=q.dtype)
    if batch == 0:
        return out
    slopes = alibi_slopes if alibi_slopes is not None else context_lens  # dummy pointer when unused
    common = dict(
        GROUP=group, HEAD_BLOCK=cfg["HEAD_BLOCK"], HEAD_CHUNKS=cfg["HEAD_CHUNKS"], BLOCK_SIZE=block_size,
        BLOCK_N=cfg["BLOCK_N"], D=d_k, D_P=cfg["D_P"], DV=d_v, DV_P=cfg["DV_P"], USE_DOT=cfg["USE_DOT"],
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        HAS_WINDOW=sliding_window is not None, HAS_ALIBI=alibi_slopes is not None,
        num_warps=cfg["num_warps"], num_stages=2,
    )  # fmt: skip
    grid = (batch, kv_heads * cfg["HEAD_CHUNKS"], splits)
    scalars = (scale * LOG2E, sliding_window or 0, partition, max_blocks)
    strides = (
        *q.stride(), *k_cache.stride(), *v_src.stride(), *block_tables.stride(),
    )  # fmt: skip
    if splits == 1:
        _paged_decode_kernel[grid](
            q, k_cache, v_src, block_tables, context_lens, slopes, out, out, out,
            *scalars, *strides,
            out.stride(0), out.stride(1), 0, out.stride(2), 0, 0, 0,
            SPLIT=False, **common,
        )  # fmt: skip
        return out
    part = torch.empty(batch, heads, splits, cfg["DV_P"], device=q.device, dtype=torch.float32)
    m = torch.empty(batch, heads, splits, device=q.device, dtype=torch.float32)
    lse = torch.empty_like(m)
    _paged_decode_kernel[grid](
        q, k_cache, v_src, block_tables, context_lens, slopes, part, m, lse,
        *scalars, *strides,
        part.stride(0), part.stride(1), part.stride(2), 1, m.stride(0), m.stride(1), m.stride(2),
        SPLIT=True, **common,
    )  # fmt: skip
    _paged_reduce_kernel[(batch, heads)](
        part, m, lse, out,
        part.stride(0), part.stride(1), part.stride(2), m.stride(0), m.stride(1), m.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        NUM_SPLITS=splits, S_P=_pow2(splits), DV=d_v, DV_P=cfg["DV_P"], num_warps=4,
    )  # fmt: skip
    return out


# ------------------------------------------------------------------------------------------------ dispatch


def paged_attention(
    q: Float[Tensor, "batch heads d_k"],
    k_cache: Float[Tensor, "blocks block_size kv_heads d_k"],
    v_cache: Float[Tensor, "blocks block_size kv_heads d_v"] | None,
    block_tables: Int[Tensor, "batch max_blocks"],
    context_lens: Int[Tensor, " batch"],
    *,
    scale: float,
    value_dim: int | None = None,
    sliding_window: int | None = None,
    alibi_slopes: Float[Tensor, " heads"] | None = None,
    backend: str = "auto",
) -> Float[Tensor, "batch heads d_v"]:
    """Decode attention of q (one token per sequence) over its paged cache. backend "auto": Triton on CUDA
    (when installed), the PyTorch reference elsewhere."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "triton" if q.is_cuda and HAVE_TRITON else "torch"
    fn = paged_attention_triton if backend == "triton" else paged_attention_reference
    return fn(
        q, k_cache, v_cache, block_tables, context_lens,
        scale=scale, value_dim=value_dim, sliding_window=sliding_window, alibi_slopes=alibi_slopes,
    )  # fmt: skip
