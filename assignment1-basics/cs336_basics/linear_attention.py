"""Causal linear attention (Katharopoulos et al. 2020, "Transformers are RNNs").

Softmax similarity is replaced by a kernel φ(q)·φ(k) with φ = elu + 1 (positive), so

    out_i = φ(q_i)ᵀ S_i / (φ(q_i)ᵀ z_i + ε),   S_i = Σ_{j≤i} φ(k_j) v_jᵀ,   z_i = Σ_{j≤i} φ(k_j).

Training uses the chunked form: quadratic (masked) attention inside each chunk of C tokens plus the state
(S, z) summed over all earlier chunks, O(N·C·d + N·d²) instead of O(N²·d). Decoding carries (S, z), a
constant-size state: no per-token cache. State and sums are kept in float32 (float64 stays float64).
"""

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from cs336_basics.layers import Linear

EPS = 1e-6  # keeps the normaliser positive for a query that has seen only padding (its output is then 0)


def state_dtype(dtype: torch.dtype | None) -> torch.dtype:
    """At least float32: bf16 sums over thousands of tokens would lose the state's small increments."""
    return torch.promote_types(dtype or torch.float32, torch.float32)


def feature_map(x: Tensor) -> Tensor:
    return F.elu(x) + 1


def chunked_linear_attention(
    phi_q: Float[Tensor, "... seq d"],
    phi_k: Float[Tensor, "... seq d"],
    v: Float[Tensor, "... seq e"],
    chunk_size: int,
    state: Float[Tensor, "... d e"],
    normaliser: Float[Tensor, "... d"],
    eps: float = EPS,
) -> tuple[Float[Tensor, "... seq e"], Float[Tensor, "... d e"], Float[Tensor, "... d"]]:
    """Causal linear attention of already feature-mapped queries/keys, continuing from (state, normaliser),
    the S and z of every earlier token. Returns the outputs and the (S, z) after the last token."""
    seq_len = phi_q.shape[-2]
    pad = -seq_len % chunk_size  # zero keys add nothing to S or z; the padded queries are dropped
    qc, kc, vc = (
        rearrange(F.pad(t, (0, 0, 0, pad)), "... (n c) d -> ... n c d", c=chunk_size) for t in (phi_q, phi_k, v)
    )
    chunk_kv = einsum(kc, vc, "... n c d, ... n c e -> ... n d e")
    # S and z up to the end of each chunk, then shifted by one chunk: the state each chunk starts from.
    kv_through = state.unsqueeze(-3) + chunk_kv.cumsum(dim=-3)
    k_through = normaliser.unsqueeze(-2) + kc.sum(dim=-2).cumsum(dim=-2)
    kv_before = torch.cat((state.unsqueeze(-3), kv_through[..., :-1, :, :]), dim=-3)
    k_before = torch.cat((normaliser.unsqueeze(-2), k_through[..., :-1, :]), dim=-2)
    scores = einsum(qc, kc, "... n i d, ... n j d -> ... n i j").tril()  # j ≤ i inside the chunk
    numerator = einsum(scores, vc, "... n i j, ... n j e -> ... n i e") + einsum(
        qc, kv_before, "... n i d, ... n d e -> ... n i e"
    )
    denominator = scores.sum(dim=-1) + einsum(qc, k_before, "... n i d, ... n d -> ... n i")
    out = numerator / (denominator.unsqueeze(-1) + eps)
    out = rearrange(out, "... n c e -> ... (n c) e")[..., :seq_len, :]
    return out, kv_through[..., -1, :, :], k_through[..., -1, :]


class LinearAttentionState:
    """The recurrent state of one layer: S (d×d) and z (d) per head, in float32, whatever the length."""

    def __init__(self, batch: int, num_heads: int, d_head: int, *, device=None, dtype=torch.float32):
        self.state = torch.zeros(batch, num_heads, d_head, d_head, device=device, dtype=dtype)
        self.normaliser = torch.zeros(batch, num_heads, d_head, device=device, dtype=dtype)
        self.length = 0

    @property
    def bytes_per_token(self) -> int:
        return 0  # constant size: a longer sequence costs nothing more


class CausalLinearAttention(nn.Module):
    """Multi-head causal linear attention; parameters named as in MultiHeadSelfAttention. No positional
    encoding (position='none'): order enters only through causality."""

    def __init__(self, d_model: int, num_heads: int, chunk_size: int, device=None, dtype=None):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model={d_model} is not divisible by num_heads={num_heads}")
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        self.num_heads = num_heads
        self.d_head = d_model // num_heads
        self.chunk_size = chunk_size
        self.q_proj = Linear(d_model, d_model, device=device, dtype=dtype)
        self.k_proj = Linear(d_model, d_model, device=device, dtype=dtype)
        self.v_proj = Linear(d_model, d_model, device=device, dtype=dtype)
        self.output_proj = Linear(d_model, d_model, device=device, dtype=dtype)

    def forward(
        self,
        x: Float[Tensor, "batch seq d_model"],
        token_positions: Int[Tensor, "batch seq"] | None = None,
        kv_cache: LinearAttentionState | None = None,
        key_mask: Bool[Tensor, "batch keys"] | None = None,
    ) -> Float[Tensor, "batch seq d_model"]:
        """`token_positions` is unused (no positional encoding); `key_mask`'s last seq columns mark this
        call's real tokens, and padded keys are zeroed so they add nothing to the state."""
        batch, seq_len = x.shape[0], x.shape[-2]
        qkv = x @ torch.cat((self.q_proj.weight, self.k_proj.weight, self.v_proj.weight)).mT
        qkv = qkv.to(state_dtype(qkv.dtype))
        pattern = "... seq (three heads d) -> three ... heads seq d"
        q, k, v = rearrange(qkv, pattern, three=3, heads=self.num_heads).unbind(0)
        phi_q, phi_k = feature_map(q), feature_map(k)
        if key_mask is not None:
            phi_k = phi_k * key_mask[:, None, -seq_len:, None]
        if kv_cache is None:
            state = phi_q.new_zeros(batch, self.num_heads, self.d_head, self.d_head)
            normaliser = phi_q.new_zeros(batch, self.num_heads, self.d_head)
        else:
            state, normaliser = kv_cache.state, kv_cache.normaliser
        out, state, normaliser = chunked_linear_attention(phi_q, phi_k, v, self.chunk_size, state, normaliser)
        if kv_cache is not None:
            kv_cache.state, kv_cache.normaliser = state, normaliser
            kv_cache.length += seq_len
        return self.output_proj(rearrange(out.to(x.dtype), "... heads seq d -> ... seq (heads d)"))

    def new_cache(self, batch: int, max_len: int, device=None, dtype=None) -> LinearAttentionState:
        """`max_len` doesn't matter: the state has a fixed size (kept in float32, or float64 for float64)."""
        return LinearAttentionState(batch, self.num_heads, self.d_head, device=device, dtype=state_dtype(dtype))
