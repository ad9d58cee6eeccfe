"""The decode step of the common decoder shape written out once, to be compiled into few kernels.

A decode step replays a captured CUDA graph, so its host cost is gone; what is left is the device's cost of the
step's kernels. Through `cs336_basics`' modules a 12-layer Llama step is several hundred small kernels (each
RMSNorm, RoPE and cast its own launches, the q/k/v and W1/W3 weights concatenated per call) for a batch of a
few dozen rows, and a graph's kernels each cost a few microseconds however little they do.

`DecodeForward` computes the model's decode step for the shape `prefill.supports` accepts (it reuses the
prefill pass's fused weights and RoPE tables): embedding, then per layer RMSNorm, one q/k/v GEMM, RoPE at each
row's position, the new key and value written into the paged pools, paged attention, the output projection,
RMSNorm and the fused feed-forward; then the final norm and the LM head. With `compile=True` (the engine's
`compile_decode`) it is one `torch.compile` graph with a symbolic batch, which the runner then captures per
padded batch size as before: inductor fuses each layer's elementwise work into a few kernels. Each layer's
cache write and paged attention are one opaque operator (`cs336_serving::paged_decode`), so its Triton kernel
is launched as written.

The pools stay outside the graph: the operator finds a layer's pools by (step, layer) in a registry instead of
taking them as arguments (the way vLLM keeps its KV cache out of its graphs). Passed in and written by
`index_put_` inside the graph, a pool is a mutated graph input read afterwards by the operator; on the H200
inductor then cloned every pool, scattered the new rows into the clone and copied it back, twice per layer and
step (~94 µs each at the 125M model's pool size, 18 of a window's 21 ms of kernels;
`benchmarks/results/serving_profile_compiled_h200_pool_copy.json`), though on the CPU it wrote in place.

Results equal the model's own decode step up to rounding (inductor's fusions, and the fused GEMMs, may round
differently), not bit for bit; `tests/test_serving_decode.py` checks both forms against it.
"""

from __future__ import annotations

import itertools
import math
import weakref

import torch
from torch import Tensor

from cs336_systems.serving.paged_attention import paged_attention
from cs336_systems.serving.prefill import PrefillForward

_POOLS: dict[int, tuple[list[Tensor], list[Tensor]]] = {}  # DecodeForward key -> its (k pools, v pools)
_KEYS = itertools.count()


@torch.library.custom_op("cs336_serving::paged_decode", mutates_args=())
def paged_decode(q: Tensor, k: Tensor, v: Tensor, slots: Tensor, block_tables: Tensor, context_lens: Tensor,
                 pools: int, layer: int, scale: float, backend: str) -> Tensor:
    """Writes the step's keys/values at `slots` of layer `layer`'s pools (registry entry `pools`), then
    `paged_attention` over them: one operator that torch.compile keeps whole, pools out of its sight."""
    k_pools, v_pools = _POOLS[pools]
    k_pool, v_pool = k_pools[layer], v_pools[layer]
    k_pool.view(-1, *k.shape[1:])[slots] = k
    v_pool.view(-1, *v.shape[1:])[slots] = v
    return paged_attention(q, k_pool, v_pool, block_tables, context_lens, scale=scale, backend=backend)


@paged_decode.register_fake
def _paged_decode_fake(q, k, v, slots, block_tables, context_lens, pools, layer, scale, backend):
    return q.new_empty(q.shape[0], q.shape[1], v.shape[-1])


class DecodeForward:
    """Logits (batch, vocab) in float32 of one decode step from the runner's packed inputs."""

    def __init__(self, prefill: PrefillForward, k_pools: list[Tensor], v_pools: list[Tensor], backend: str,
                 compile: bool = False):
        self.model = prefill.model
        self.layers = prefill.layers
        self.rms = prefill._rms
        self.rotate = prefill._rotate
        self.ffn = prefill._ffn
        self.rope = None if prefill.rope is None else prefill._rope_tables(self.model.config.context_length)
        self.pools_key = next(_KEYS)
        _POOLS[self.pools_key] = (k_pools, v_pools)
        weakref.finalize(self, _POOLS.pop, self.pools_key, None)
        self.backend = backend
        self.context_length = self.model.config.context_length
        self.compiled = compile
        self._run = torch.compile(self._forward, fullgraph=True) if compile else self._forward

    def __call__(self, packed: Tensor) -> Tensor:
        """packed[:, 0] token, [:, 1] length (keys incl. this token), [:, 2] slot, [:, 4:] block table."""
        if self.compiled:
            torch._dynamo.maybe_mark_dynamic(packed, 0)
        return self._run(packed)

    def _forward(self, packed: Tensor) -> Tensor:
        tokens, lengths, slots = packed[:, 0], packed[:, 1], packed[:, 2]
        tables, context_lens = packed[:, 4:].to(torch.int32), lengths.to(torch.int32)
        batch = tokens.shape[0]
        rope = None
        if self.rope is not None:  # a row past its last real token may run past the context: clamp (discarded)
            cos2, sin2, swap = self.rope
            positions = (lengths - 1).clamp(max=self.context_length - 1)
            rope = (cos2[positions][:, None, :], sin2[positions][:, None, :], swap)
        x = self.model.token_embeddings.weight[tokens]
        for index, layer in enumerate(self.layers):
            heads, kv_heads, d = layer.heads, layer.kv_heads, layer.d
            q, k, v = (self.rms(x, layer.ln1, layer.eps1) @ layer.qkv).split(
                (heads * d, kv_heads * d, kv_heads * d), dim=-1)
            q, k, v = q.view(batch, heads, d), k.view(batch, kv_heads, d), v.view(batch, kv_heads, d)
            if rope is not None:
                q, k = self.rotate(q, rope), self.rotate(k, rope)
            out = paged_decode(q, k, v, slots, tables, context_lens, self.pools_key, index, 1 / math.sqrt(d),
                               self.backend)
            x = x + out.reshape(batch, heads * d) @ layer.out
            x = x + self.ffn(layer, self.rms(x, layer.ln2, layer.eps2))
        return self.model.lm_head(self.model.ln_final(x)).float()
