"""The prefill pass of the common decoder shape with its per-pass work done once, not once per layer.

A prefill pass runs eagerly (its shapes change every pass), so on a GPU its cost for small batches is the host's
~850 aten calls through `cs336_basics`' modules (12-layer Llama), not the device work. For the shape that
Llama/Mistral imports and our presets have (pre-norm RMSNorm, multi-head or grouped-query attention with RoPE or
no positions, no sliding window or ALiBi, SwiGLU or SiLU feed-forward), `PrefillForward` computes the same
function with the same kernels in the same order, so its logits and cached keys/values are bit for bit the
model's own (`tests/test_serving_prefill.py`), but:

- q/k/v and W1/W3 are fused once: their parameters are rebound as row views of one concatenated weight (the
  model's own forward, which concatenates them per call, is unchanged and reads the same storage), so a layer
  runs one GEMM per fused projection without a `torch.cat` of its weights, and the transposed views are kept;
- RMSNorm weights are cast to float32 once, and float32 activations skip their no-op casts;
- every row of a prefill starts at position 0, so RoPE's cos/sin are one slice of the table for the whole pass
  (no gather, no cast per layer), laid out so that a rotation is x·cos + swap(x)·sin (three elementwise ops and
  one gather instead of ten calls; the same roundings: x_e·c − x_o·s = x_e·c + x_o·(−s) and sums commute);
- each layer stores its keys and values with one `index_put_` each, indexed by (slot, kv head) so that the
  indexed shape is the attention layout's (batch, kv_heads, seq): no transpose, no reshape copy, no checks;
- tokens, slots and the rows whose logits are wanted go up in one upload (`ModelRunner.prefill`).

With `compile=True` the pass is one `torch.compile` graph with symbolic batch and length (the keys/values
stored in place into the pools, fused with RoPE): a few dozen kernel launches instead of ~500 host-dispatched
calls, at the price of one compilation when the engine starts and of the eager path's bit-for-bit equality
(inductor fuses the elementwise work, so results agree to rounding). Batches are padded to at least 2 rows
of at least 2 tokens (`MIN_COMPILED_SHAPE`) so that one graph serves every pass: torch specialises size-1
dimensions.

Any other configuration (MLA, linear attention, MoE, ALiBi, sliding windows, post-norm, attention backends)
keeps the model's own forward through `PagedLayerCache`; `supports` decides by exact module types, so a
subclass with a different forward is never bypassed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from cs336_basics.attention import MultiHeadSelfAttention
from cs336_basics.layers import Linear, RMSNorm, RotaryPositionalEmbedding, SiLUFeedForward, SwiGLU
from cs336_basics.model import TransformerLM
from cs336_basics.nn_utils import silu


def supports(model: TransformerLM) -> bool:
    """Whether `PrefillForward` computes exactly what this model's layers compute for a fresh prompt."""
    config = model.config
    if (config.attention, config.norm) != ("mha", "pre") or config.position not in ("rope", "none"):
        return False
    if config.sliding_window is not None or config.ffn not in ("swiglu", "silu"):
        return False
    if type(model.ln_final) is not RMSNorm or type(model.lm_head) is not Linear:
        return False
    for layer in model.layers:
        attn = layer.attn
        if type(attn) is not MultiHeadSelfAttention or type(layer.ffn) not in (SwiGLU, SiLUFeedForward):
            return False
        if type(layer.ln1) is not RMSNorm or type(layer.ln2) is not RMSNorm:
            return False
        if attn.attention_backend is not None or attn.alibi_slopes is not None or attn.sliding_window is not None:
            return False
        if (attn.rope is None) != (config.position == "none"):
            return False
        if attn.rope is not None and type(attn.rope) is not RotaryPositionalEmbedding:
            return False
        linears = (attn.q_proj, attn.k_proj, attn.v_proj, attn.output_proj, layer.ffn.w1, layer.ffn.w2)
        if any(type(m) is not Linear for m in linears):
            return False
    return True


@torch.no_grad()
def _fuse(modules: list[Linear]) -> Tensor:
    """One weight whose row blocks are the modules' weights, which become views of it; returns it transposed."""
    fused = torch.cat([m.weight for m in modules])
    start = 0
    for m in modules:
        rows = m.weight.shape[0]
        m.weight.data = fused[start : start + rows]
        start += rows
    return fused.mT


class _Layer:
    __slots__ = ("d", "eps1", "eps2", "grouped", "head_index", "heads", "kv_heads", "ln1", "ln2", "out",
                 "qkv", "swiglu", "w2", "w13")


MIN_COMPILED_SHAPE = (2, 2)  # (rows, tokens) of every compiled pass: size-1 dimensions would each recompile


class PrefillForward:
    """Hidden states of a right-padded prefill batch, keys/values stored in the paged pools on the way."""

    def __init__(self, model: TransformerLM, k_pools: list[Tensor], v_pools: list[Tensor], compile: bool = False,
                 cpp_wrapper: bool = False):
        if not supports(model):
            raise ValueError("PrefillForward: unsupported model configuration (see prefill.supports)")
        self.model = model
        config = model.config
        self.dtype = model.lm_head.weight.dtype
        self.k_flat = [k.view(-1, *k.shape[2:]) for k in k_pools]
        self.v_flat = [v.view(-1, *v.shape[2:]) for v in v_pools]
        self.layers: list[_Layer] = []
        head_index: dict[int, Tensor] = {}  # kv_heads -> (kv_heads, 1) indices, shared by the layers
        for block in model.layers:
            attn, ffn = block.attn, block.ffn
            layer = _Layer()
            layer.heads, layer.kv_heads, layer.d, layer.grouped = (attn.num_heads, attn.num_kv_heads, attn.d_head,
                                                                   attn.grouped)
            layer.head_index = head_index.setdefault(
                attn.num_kv_heads, torch.arange(attn.num_kv_heads, device=self.k_flat[0].device)[:, None])
            layer.qkv = _fuse([attn.q_proj, attn.k_proj, attn.v_proj])
            layer.out = attn.output_proj.weight.mT
            layer.swiglu = type(ffn) is SwiGLU
            layer.w13 = _fuse([ffn.w1, ffn.w3]) if layer.swiglu else ffn.w1.weight.mT
            layer.w2 = ffn.w2.weight.mT
            layer.ln1, layer.eps1 = block.ln1.weight.float(), block.ln1.eps
            layer.ln2, layer.eps2 = block.ln2.weight.float(), block.ln2.eps
            self.layers.append(layer)
        self.rope = model.layers[0].attn.rope if config.position == "rope" else None
        self._rope: tuple[Tensor, Tensor, Tensor] | None = None
        if self.rope is not None:
            self._rope_tables(1)  # built now, so that a compiled graph never guards on their absence
        self.compiled = compile
        self.cpp_wrapper = compile and cpp_wrapper
        # cpp_wrapper: inductor launches the graph's kernels from generated C++ instead of Python
        options = {"cpp_wrapper": True} if self.cpp_wrapper else None
        self._run = torch.compile(self._forward, fullgraph=True, options=options) if compile else self._forward

    def _rope_tables(self, length: int) -> tuple[Tensor, Tensor, Tensor]:
        """cos and signed sin of positions 0..length − 1, (length, d) with each pair's angle twice, and the
        pair-swapping index. Built once for the whole context (no per-pass work, and no repeat_interleave,
        whose output size would be a host sync on CUDA)."""
        if self._rope is None:
            rope = self.rope
            cos, sin = rope.cos.to(self.dtype), rope.sin.to(self.dtype)  # what the model's RoPE multiplies by
            cos2 = torch.stack((cos, cos), dim=-1).flatten(-2)
            sin2 = torch.stack((-sin, sin), dim=-1).flatten(-2)
            swap = torch.arange(cos2.shape[-1], device=cos.device) ^ 1
            self._rope = (cos2, sin2, swap)
        cos2, sin2, swap = self._rope
        return cos2[:length], sin2[:length], swap

    @staticmethod
    def _rms(x: Tensor, weight: Tensor, eps: float) -> Tensor:
        x32 = x if x.dtype == torch.float32 else x.float()
        out = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps) * weight
        return out if out.dtype == x.dtype else out.to(x.dtype)

    def stop_compiling(self) -> None:
        """The eager pass from now on (compilation failed); the fused weights stay as they are."""
        self.compiled, self._run = False, self._forward

    def __call__(self, tokens: Tensor, slots: Tensor) -> Tensor:
        """tokens and slots (batch, seq); returns the last layer's output (batch, seq, d_model), before ln_final."""
        if self.compiled:  # batch and length symbolic; everything else (weights, pools, tables) static
            for tensor in (tokens, slots):
                torch._dynamo.maybe_mark_dynamic(tensor, 0)
                torch._dynamo.maybe_mark_dynamic(tensor, 1)
        return self._run(tokens, slots)

    def _forward(self, tokens: Tensor, slots: Tensor) -> Tensor:
        rope = None if self.rope is None else self._rope_tables(tokens.shape[1])
        x = self.model.token_embeddings.weight[tokens]
        slots = slots[:, None, :]  # (batch, 1, seq) against each layer's head index (kv_heads, 1)
        for layer, k_flat, v_flat in zip(self.layers, self.k_flat, self.v_flat, strict=True):
            x = x + self._attention(layer, self._rms(x, layer.ln1, layer.eps1), rope, slots, k_flat, v_flat)
            x = x + self._ffn(layer, self._rms(x, layer.ln2, layer.eps2))
        return x

    @staticmethod
    def _ffn(layer: _Layer, h: Tensor) -> Tensor:
        """SwiGLU through the fused W1/W3 weight, or SiLU."""
        if layer.swiglu:
            gate, up = (h @ layer.w13).chunk(2, dim=-1)
            return (silu(gate) * up) @ layer.w2
        return silu(h @ layer.w13) @ layer.w2

    @staticmethod
    def _rotate(x: Tensor, rope: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        cos2, sin2, swap = rope
        # swapped term first: the sum then takes its contiguous layout, the one the model's torch.stack gives q and k
        return x.index_select(-1, swap) * sin2 + x * cos2

    def _attention(self, layer: _Layer, x: Tensor, rope, slots: Tensor, k_flat: Tensor, v_flat: Tensor) -> Tensor:
        batch, seq, _ = x.shape
        heads, kv_heads, d = layer.heads, layer.kv_heads, layer.d
        qkv = x @ layer.qkv
        if not layer.grouped:  # (three, batch, heads, seq, d), as the model's rearrange lays it out
            qkv = qkv.view(batch, seq, 3, heads, d).permute(2, 0, 3, 1, 4)
            v = qkv[2]
            if rope is None:
                q, k = qkv[0], qkv[1]
            else:
                q, k = self._rotate(qkv[:2], rope).unbind(0)
        else:
            parts = qkv.view(batch, seq, heads + 2 * kv_heads, d).transpose(1, 2)
            q, k, v = parts.split((heads, kv_heads, kv_heads), dim=1)
            if rope is not None:
                q, k = self._rotate(q, rope), self._rotate(k, rope)
        at = (slots, layer.head_index)  # indexed shape (batch, kv_heads, seq): k's own, so no transposed copy
        k_flat[at] = k
        v_flat[at] = v
        gqa = {"enable_gqa": True} if layer.grouped else {}
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, **gqa)
        return out.transpose(1, 2).reshape(batch, seq, heads * d) @ layer.out
