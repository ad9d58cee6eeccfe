"""Runs a `cs336_basics` TransformerLM over the paged KV pool: one batched prefill or decode step at a time.

The pool is one K and one V tensor per layer, (num_blocks, block_size, kv_heads, d); MLA keeps its latent
(kv_lora_rank + rope dims per token) in K alone. The model's attention modules receive a `PagedLayerCache`
(cs336_basics' `ExternalKVCache` hook): they store new keys/values at the step's slots and, when decoding,
attend through the block tables with `paged_attention`. Prefill runs the model's own causal attention over
right-padded prompts (for the common decoder shape, `prefill.PrefillForward`: the same computation with its
per-pass work hoisted out of the layers). Decode steps on CUDA replay CUDA graphs captured per padded batch
size, so a step costs a few kernel launches' worth of CPU instead of one Python pass over every module; with
`prefill_graphs`, prefill passes padded to a ladder of (rows, tokens) buckets replay graphs captured per bucket.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from cs336_basics.kv_cache import ExternalKVCache
from cs336_basics.layers import RotaryPositionalEmbedding
from cs336_basics.model import TransformerLM
from cs336_systems.serving.block_manager import SCRATCH_BLOCK, CopyOnWrite
from cs336_systems.serving.decode import DecodeForward
from cs336_systems.serving.paged_attention import paged_attention, write_kv
from cs336_systems.serving.prefill import MIN_COMPILED_SHAPE, PrefillForward
from cs336_systems.serving.prefill import supports as prefill_supports

log = logging.getLogger(__name__)

# Not cuDNN: it builds an execution plan for every new sequence length (~4 ms of CPU per layer on an H100 with
# torch 2.11), and every prefill brings a new length. Flash attention has no per-shape set-up.
PREFILL_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)
# Prefill passes captured as CUDA graphs (`prefill_graphs`): a pass is padded up to the nearest (rows, tokens)
# of these ladders (at most ~25% more tokens past 64, 2 rows or 50% more rows), one graph per pair that fits
# `max_num_batched_tokens`; larger passes run without a graph.
PREFILL_GRAPH_ROWS = (2, 3, 4, 6, 8, 12, 16)
PREFILL_GRAPH_LENGTHS = (16, 32, 48, 64, 80, 96, 128, 160, 192, 256, 320, 384, 512, 640, 768, 1024, 1280, 1536,
                         2048)


@dataclass
class _PrefillGraph:
    graph: torch.cuda.CUDAGraph
    inputs: Int[Tensor, " flat"]  # the upload layout of `ModelRunner.prefill`
    output: Float[Tensor, "rows d_model"]


@dataclass
class StepMeta:
    """What every layer's cache needs for one step: where new keys go and, when decoding, what each row reads."""

    decoding: bool
    slot_mapping: Int[Tensor, " tokens"]
    block_tables: Int[Tensor, "batch max_blocks"] | None = None
    context_lens: Int[Tensor, " batch"] | None = None


@dataclass
class LaunchedWindow:
    """A decode window queued on the device: its sampled tokens (steps, batch) there and, on CUDA, their copy
    into pinned host memory and the event that marks it done."""

    tokens: Tensor
    host: Tensor | None = None
    ready: torch.cuda.Event | None = None

    def copied_to_host(self) -> LaunchedWindow:
        """Queues the tokens' copy into pinned host memory and an event behind it, so that `collect` waits for
        this window only, and nothing before it makes the host wait for the device."""
        self.host = torch.empty(self.tokens.shape, dtype=self.tokens.dtype, pin_memory=True)
        self.host.copy_(self.tokens, non_blocking=True)
        self.ready = torch.cuda.Event()
        self.ready.record()
        return self


class PagedLayerCache(ExternalKVCache):
    def __init__(self, k_pool: Tensor, v_pool: Tensor | None, meta_ref: list[StepMeta], backend: str):
        self.k_pool, self.v_pool = k_pool, v_pool
        self.meta_ref = meta_ref  # shared one-element list: every layer sees the step's metadata
        self.backend = backend

    @property
    def decoding(self) -> bool:
        return self.meta_ref[0].decoding

    @property
    def bytes_per_token(self) -> int:
        per_token = self.k_pool[0, 0].numel() * self.k_pool.element_size()
        if self.v_pool is not None:
            per_token += self.v_pool[0, 0].numel() * self.v_pool.element_size()
        return per_token

    def store(self, k: Float[Tensor, "batch kv_heads seq d"], v: Tensor | None) -> None:
        flat = lambda t: t.transpose(1, 2).reshape(-1, t.shape[1], t.shape[3])  # (batch·seq, kv_heads, d)
        write_kv(self.k_pool, self.v_pool, flat(k), None if v is None else flat(v), self.meta_ref[0].slot_mapping)

    def attend(self, q, *, scale, value_dim=None, sliding_window=None, alibi_slopes=None):
        meta = self.meta_ref[0]
        out = paged_attention(
            q[:, :, 0], self.k_pool, self.v_pool, meta.block_tables, meta.context_lens, scale=scale,
            value_dim=value_dim, sliding_window=sliding_window, alibi_slopes=alibi_slopes, backend=self.backend,
        )
        return out.unsqueeze(2)


def kv_shapes(model: TransformerLM) -> tuple[tuple[int, int], tuple[int, int] | None]:
    """(kv_heads, d) of K and of V (None: values live inside K, MLA's latent) for every layer."""
    config = model.config
    if config.attention == "mla":
        return (1, config.kv_lora_rank + config.qk_rope_head_dim), None
    return (config.kv_heads, config.d_head), (config.kv_heads, config.d_head)


def is_recurrent(model: TransformerLM) -> bool:
    """Causal linear attention: each sequence holds one constant-size state (S, z) per layer instead of keys and
    values. The server pages it with one "block" per sequence (block_size = context_length), so the block
    manager's allocation, sharing between samples and copy-on-write apply to states unchanged."""
    return model.config.attention == "linear"


def bytes_per_block(model: TransformerLM, block_size: int, dtype: torch.dtype) -> int:
    if is_recurrent(model):
        heads, d = model.config.num_heads, model.config.d_head
        return model.config.num_layers * heads * (d * d + d) * 4  # float32 state and normaliser
    (kh, kd), v = kv_shapes(model)
    per_token = kh * kd + (0 if v is None else v[0] * v[1])
    return per_token * block_size * model.config.num_layers * torch.empty((), dtype=dtype).element_size()


class ModelRunner:
    def __init__(self, model: TransformerLM, num_blocks: int, block_size: int, max_num_seqs: int,
                 cuda_graphs: bool = True, attention_backend: str = "auto", fast_prefill: bool = True,
                 compile_prefill: bool = False, compile_decode: bool = False, prefill_cpp_wrapper: bool = False,
                 prefill_graphs: bool = False, max_num_batched_tokens: int = 8192):
        self.model = model
        self.config = model.config
        weight = model.lm_head.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.max_blocks_per_seq = -(-self.config.context_length // block_size)
        for layer in model.layers:  # flash/SDPA kernels for prefill where the module offers them
            if hasattr(layer.attn, "use_torch_sdpa"):
                layer.attn.use_torch_sdpa = True
        for module in model.modules():  # the engine checks every position against the context up front
            if isinstance(module, RotaryPositionalEmbedding):
                module.check_positions = False
        self.meta_ref: list[StepMeta] = [StepMeta(False, torch.zeros(1, dtype=torch.long, device=self.device))]
        self.recurrent = is_recurrent(model)
        if self.recurrent:
            from cs336_basics.linear_attention import LinearAttentionState

            heads, d = self.config.num_heads, self.config.d_head
            self.k_pools = [torch.zeros(num_blocks, heads, d, d, device=self.device) for _ in model.layers]
            self.v_pools = [torch.zeros(num_blocks, heads, d, device=self.device) for _ in model.layers]
            self.caches = [LinearAttentionState(0, heads, d, device=self.device) for _ in model.layers]
        else:
            (kh, kd), v_shape = kv_shapes(model)
            self.k_pools = [torch.zeros(num_blocks, block_size, kh, kd, device=self.device, dtype=self.dtype)
                            for _ in model.layers]
            self.v_pools = [None if v_shape is None else
                            torch.zeros(num_blocks, block_size, *v_shape, device=self.device, dtype=self.dtype)
                            for _ in model.layers]
            self.caches = [PagedLayerCache(k, v, self.meta_ref, attention_backend)
                           for k, v in zip(self.k_pools, self.v_pools, strict=True)]
        # The common decoder shape prefills through `PrefillForward` (same results, per-pass work done once).
        self.prefill_forward = (PrefillForward(model, self.k_pools, self.v_pools, compile=compile_prefill,
                                               cpp_wrapper=prefill_cpp_wrapper)
                                if fast_prefill and not self.recurrent and prefill_supports(model) else None)
        self.prefill_buckets: list[tuple[int, int]] = []
        self.prefill_graphs: dict[tuple[int, int], _PrefillGraph] = {}
        if self.prefill_forward is not None and self.prefill_forward.compiled:
            self._compile_prefill()
        self.decode_forward: DecodeForward | None = None
        if compile_decode and self.prefill_forward is not None:
            self._compile_decode(attention_backend)
        elif (compile_decode or compile_prefill) and self.prefill_forward is None:
            log.warning("--compile-prefill/--compile-decode cover the common decoder shape (prefill.supports); "
                        "this model runs its own forward")
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        if cuda_graphs and self.device.type == "cuda":
            self._capture(max_num_seqs)
        # Prefill passes padded to the buckets (on any device, so that the CPU tests run the padding) and, on
        # CUDA, replayed from graphs captured now; only for `PrefillForward`'s shape.
        if prefill_graphs and self.prefill_forward is not None:
            fitting = [(rows, length) for length in PREFILL_GRAPH_LENGTHS for rows in PREFILL_GRAPH_ROWS
                       if length <= self.config.context_length and rows <= max(max_num_seqs, 2)
                       and rows * length <= max_num_batched_tokens]
            self.prefill_buckets = sorted(fitting, key=lambda b: (b[0] * b[1], b[1]))  # fewest tokens first
            if self.device.type == "cuda":
                self._capture_prefill()

    @property
    def kv_bytes_per_block(self) -> int:
        return bytes_per_block(self.model, self.block_size, self.dtype)

    # -- forward --------------------------------------------------------------------------------------------
    def _hidden(self, tokens: Tensor, positions: Tensor, key_mask: Tensor | None = None,
                state_rows: Tensor | None = None, fresh: bool = False) -> Tensor:
        """`state_rows`: each row's state slot (recurrent models), gathered before and written back after."""
        if self.recurrent:
            for cache, state, norm in zip(self.caches, self.k_pools, self.v_pools, strict=True):
                cache.state = torch.zeros_like(state[state_rows]) if fresh else state[state_rows]
                cache.normaliser = torch.zeros_like(norm[state_rows]) if fresh else norm[state_rows]
        x = self.model.token_embeddings(tokens)
        for layer, cache in zip(self.model.layers, self.caches, strict=True):
            x = layer(x, positions, cache, key_mask)
        if self.recurrent:
            for cache, state, norm in zip(self.caches, self.k_pools, self.v_pools, strict=True):
                state[state_rows] = cache.state
                norm[state_rows] = cache.normaliser
        return x

    def _logits(self, hidden: Float[Tensor, "batch d_model"]) -> Float[Tensor, "batch vocab"]:
        return self.model.lm_head(self.model.ln_final(hidden)).float()

    def copy_blocks(self, copies: list[CopyOnWrite]) -> None:
        if not copies:
            return
        src = torch.tensor([c.src for c in copies], device=self.device)
        dst = torch.tensor([c.dst for c in copies], device=self.device)
        for pool in (*self.k_pools, *(v for v in self.v_pools if v is not None)):
            pool[dst] = pool[src]

    def _compile_decode(self, attention_backend: str) -> None:
        """The decode step as one compiled graph (see `decode.py`), compiled now on two scratch rows; where
        compilation fails, decode steps keep the model's own forward."""
        self.decode_forward = DecodeForward(self.prefill_forward, self.k_pools, self.v_pools, attention_backend,
                                            compile=True)
        packed = torch.zeros(MIN_COMPILED_SHAPE[0], 4 + self.max_blocks_per_seq, dtype=torch.long,
                             device=self.device)
        packed[:, 1] = 1  # one key each, at the scratch block's first slot (block table and slot all zero)
        packed[:, 2] = SCRATCH_BLOCK * self.block_size
        packed[:, 4:] = SCRATCH_BLOCK
        start = time.perf_counter()
        try:
            with torch.inference_mode():
                self.decode_forward(packed)
        except Exception as error:  # any compiler failure: the model's own decode step works
            log.warning("decode compilation failed (%s); decoding through the model", str(error).splitlines()[0])
            self.decode_forward = None
            return
        log.info("compiled the decode step in %.1f s (--no-compile-decode skips this)", time.perf_counter() - start)

    def _compile_prefill(self) -> None:
        """Compiles the prefill graph now (a pass over scratch slots only), not on the first request; where
        compilation fails (no compiler for the device, say), prefills run eagerly."""
        rows, tokens = MIN_COMPILED_SHAPE[0], MIN_COMPILED_SHAPE[1] + 1  # unequal: equal sizes would share a symbol
        scratch = [SCRATCH_BLOCK * self.block_size] * tokens
        start = time.perf_counter()
        try:
            self.prefill([[0] * tokens] * rows, [scratch] * rows)
        except Exception as error:  # any compiler failure: the eager path works
            log.warning("prefill compilation failed (%s); prefilling eagerly", str(error).splitlines()[0])
            self.prefill_forward.stop_compiling()
            return
        log.info("compiled the prefill pass in %.1f s (--no-compile-prefill skips this)", time.perf_counter() - start)

    @torch.inference_mode()
    def launch_prefill(self, prompts: list[list[int]], slots: list[list[int]], sample: Callable[[Tensor], Tensor],
                       overlap: bool = False) -> LaunchedWindow:
        """`prefill` and the sampling of each prompt's first token, queued without a host sync: `collect` gives
        [[token of each prompt]]. `overlap`: as in `launch` (pinned copies, so that a pass queued behind a decode
        window in flight never makes the host wait for that window)."""
        overlap = overlap and self.device.type == "cuda"
        window = LaunchedWindow(sample(self.prefill(prompts, slots, pinned=overlap)).unsqueeze(0))
        return window.copied_to_host() if overlap else window

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]], slots: list[list[int]],
                pinned: bool = False) -> Float[Tensor, "batch vocab"]:
        """Logits after each prompt's last token; every prompt token's keys/values land at its slots. `pinned`:
        the inputs go up from pinned memory (an upload from pageable memory may wait for the device)."""
        batch, longest = len(prompts), max(map(len, prompts))
        real = batch
        bucket = self._prefill_bucket(batch, longest)
        if bucket is not None:
            rows, longest = bucket
        elif self.prefill_forward is not None and self.prefill_forward.compiled:  # one graph for every pass
            rows, longest = max(batch, MIN_COMPILED_SHAPE[0]), max(longest, MIN_COMPILED_SHAPE[1])
        else:
            rows = batch
        # padding: rows of token 0 at scratch slots and positions past the prompts, whose outputs are not read
        prompts = [*prompts, *[[0]] * (rows - batch)]
        slots = [*slots, *[[SCRATCH_BLOCK * self.block_size]] * (rows - batch)]
        batch = rows
        # One upload: tokens, slots (batch, longest) and each row's last token's flat index.
        host = np.zeros((2 * batch * longest + batch,), dtype=np.int64)
        tokens, slot_mapping = host[: batch * longest].reshape(batch, longest), host[batch * longest : -batch]
        slot_mapping = slot_mapping.reshape(batch, longest)
        slot_mapping[:] = SCRATCH_BLOCK * self.block_size
        for row, (prompt, row_slots) in enumerate(zip(prompts, slots, strict=True)):
            tokens[row, : len(prompt)] = prompt
            slot_mapping[row, : len(prompt)] = row_slots
        host[-batch:] = np.arange(batch) * longest + np.fromiter(map(len, prompts), np.int64, batch) - 1
        staged = torch.from_numpy(host)
        if pinned:
            staged = staged.pin_memory()
        captured = self.prefill_graphs.get(bucket) if bucket is not None else None
        if captured is not None:  # into the graph's own input buffer, behind any earlier replay that reads it
            captured.inputs.copy_(staged, non_blocking=True)
            captured.graph.replay()
            return self._logits(captured.output[:real])
        device = staged.to(self.device, non_blocking=True)
        tokens_d = device[: batch * longest].view(batch, longest)
        slots_d = device[batch * longest : -batch].view(batch, longest)
        return self._logits(self._prefill_last_hidden(tokens_d, slots_d, device[-batch:], prompts, slots)[:real])

    def _prefill_last_hidden(self, tokens: Int[Tensor, "batch seq"], slots: Int[Tensor, "batch seq"],
                             last: Int[Tensor, " batch"], prompts: list[list[int]] | None = None,
                             prompt_slots: list[list[int]] | None = None) -> Float[Tensor, "batch d_model"]:
        """Each row's hidden state at its last prompt token (flat index `last`), before ln_final. `prompts` and
        `prompt_slots` only for the model's own path of a recurrent model (its key mask and state rows)."""
        batch, longest = tokens.shape
        with sdpa_kernel(PREFILL_SDPA_BACKENDS):
            if self.prefill_forward is not None:
                hidden = self.prefill_forward(tokens, slots)
            else:
                positions = torch.arange(longest, device=self.device).expand(batch, longest)
                self.meta_ref[0] = StepMeta(False, slots.reshape(-1))
                key_mask = rows = None
                if self.recurrent:
                    key_mask = positions < torch.tensor([len(p) for p in prompts], device=self.device)[:, None]
                    rows = torch.tensor([row_slots[0] // self.block_size for row_slots in prompt_slots],
                                        device=self.device)
                hidden = self._hidden(tokens, positions, key_mask, rows, fresh=True)
        return hidden.reshape(batch * longest, -1).index_select(0, last)

    def _prefill_bucket(self, batch: int, longest: int) -> tuple[int, int] | None:
        """The smallest (rows, tokens) bucket that holds the pass, if any (the buckets are sorted by size)."""
        return next((b for b in self.prefill_buckets if b[0] >= batch and b[1] >= longest), None)

    def _capture_prefill(self) -> None:
        """One CUDA graph per bucket, largest first into one memory pool, each with its own input buffer (tokens,
        slots, last-token indices: `prefill`'s upload layout) and its output (rows, d_model). Where capture fails,
        prefills run without graphs."""
        scratch = SCRATCH_BLOCK * self.block_size
        pool, start = None, time.perf_counter()
        try:
            with torch.inference_mode():
                for rows, length in reversed(self.prefill_buckets):
                    inputs = torch.zeros(2 * rows * length + rows, dtype=torch.long, device=self.device)
                    inputs[rows * length : 2 * rows * length] = scratch
                    args = (inputs[: rows * length].view(rows, length),
                            inputs[rows * length : -rows].view(rows, length), inputs[-rows:])
                    stream = torch.cuda.Stream()
                    stream.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(stream):
                        self._prefill_last_hidden(*args)  # warm-up: lazy initialisation outside the capture
                    torch.cuda.current_stream().wait_stream(stream)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool):
                        output = self._prefill_last_hidden(*args)
                    pool = graph.pool()
                    self.prefill_graphs[(rows, length)] = _PrefillGraph(graph, inputs, output)
            torch.cuda.synchronize()
        except Exception as error:  # e.g. a kernel that syncs with the host: prefills run without graphs
            log.warning("prefill CUDA graph capture failed (%s); prefilling without graphs",
                        str(error).splitlines()[0])
            self.prefill_graphs.clear()
            return
        log.info("captured %d prefill graphs in %.1f s", len(self.prefill_graphs), time.perf_counter() - start)

    def decode(self, last_tokens: list[int], lengths: list[int], slots: list[list[int]], tables: list[list[int]],
               sample: Callable[[Tensor], Tensor], steps: int = 1) -> list[list[int]]:
        """`steps` decode steps back to back, the sampled tokens fed forward on the device, one host sync at
        the end: returns the tokens of each step, (steps, batch). Sequence i feeds its newest token at position
        lengths[i] − 1 and then its own samples; step j stores keys/values at slots[i][j], or in the scratch
        block once a sequence has all the tokens it may take (its later samples are discarded)."""
        return self.collect(self.launch(last_tokens, lengths, slots, tables, sample, steps))

    @torch.inference_mode()
    def launch(self, last_tokens: list[int] | None, lengths: list[int], slots: list[list[int]],
               tables: list[list[int]], sample: Callable[[Tensor], Tensor], steps: int = 1,
               feed: tuple[LaunchedWindow, list[int]] | None = None, overlap: bool = False) -> LaunchedWindow:
        """`decode` without its host sync: the window's work is queued on the device; `collect` waits for its
        tokens. `overlap` (asynchronous scheduling; implied by `feed`): on CUDA the inputs go up from pinned
        memory and the tokens come back into pinned memory behind an event, so that neither copy makes the
        host wait for the device's earlier work. With `feed` =
        (an earlier window still in flight, rows), row i's first input is that window's last sampled token of
        its row rows[i] (asynchronous scheduling: the host has not read it yet), and `last_tokens` is unused."""
        batch = len(lengths)
        size = next((b for b in sorted(self.graphs) if b >= batch), None)
        # a compiled decode step takes at least two rows (a one-row batch would compile a second graph)
        padded = size or (max(batch, MIN_COMPILED_SHAPE[0]) if self.decode_forward is not None else batch)
        host = np.zeros((padded, 4 + self.max_blocks_per_seq), dtype=np.int64)
        if feed is None:
            host[:batch, 0] = last_tokens
        host[:batch, 1] = lengths
        host[:, 1] = np.maximum(host[:, 1], 1)  # padded rows: one key, the scratch block's
        for row, table in enumerate(tables):
            host[row, 4 : 4 + len(table)] = table
        schedule = np.full((padded, steps), SCRATCH_BLOCK * self.block_size, dtype=np.int64)
        for row, row_slots in enumerate(slots):
            schedule[row, : len(row_slots)] = row_slots
        overlap = (overlap or feed is not None) and self.device.type == "cuda"
        # (an upload from pageable memory may wait for the device)
        to = lambda a: (torch.from_numpy(a).pin_memory() if overlap else torch.from_numpy(a)).to(
            self.device, non_blocking=True)
        packed, schedule = to(host), to(schedule)
        inputs = packed
        if size is not None:
            inputs = self.static_inputs[:size]
            inputs.copy_(packed)  # queued behind the previous window's replays, which read the same buffer
        if feed is not None:
            previous, rows = feed
            inputs[:batch, 0] = previous.tokens[-1][to(np.asarray(rows, dtype=np.int64))]
        sampled = []
        for step in range(steps):
            inputs[:, 2] = schedule[:, step]
            if size is not None:
                graph, logits = self.graphs[size]
                graph.replay()
            else:
                logits = self._decode_forward(inputs)
            tokens = sample(logits[:batch])
            sampled.append(tokens)
            if step + 1 < steps:
                inputs[:batch, 0] = tokens
                inputs[:, 1] += 1
        window = LaunchedWindow(torch.stack(sampled))
        return window.copied_to_host() if overlap else window

    def collect(self, window: LaunchedWindow) -> list[list[int]]:
        """The launched window's tokens, (steps, batch), once the device has made them."""
        if window.ready is None:
            return window.tokens.tolist()
        window.ready.synchronize()
        return window.host.tolist()

    def _decode_forward(self, packed: Int[Tensor, "batch columns"]) -> Float[Tensor, "batch vocab"]:
        """packed[:, 0] token, [:, 1] length (keys incl. this token), [:, 2] slot, [:, 4:] block table."""
        if self.decode_forward is not None:
            return self.decode_forward(packed)
        tokens, lengths = packed[:, 0:1], packed[:, 1]
        self.meta_ref[0] = StepMeta(
            True, packed[:, 2], packed[:, 4:].to(torch.int32), lengths.to(torch.int32)
        )
        # A row past its last real token (multi-step decoding) may run past the context: its samples are
        # discarded, but its position must still index the RoPE table.
        positions = (lengths - 1).clamp(max=self.config.context_length - 1).unsqueeze(1)
        hidden = self._hidden(tokens, positions, state_rows=packed[:, 4] if self.recurrent else None)
        return self._logits(hidden[:, 0])

    def _capture(self, max_num_seqs: int) -> None:
        sizes = [b for b in GRAPH_BATCH_SIZES if b < max_num_seqs] + [max_num_seqs]
        if self.decode_forward is not None and max_num_seqs >= MIN_COMPILED_SHAPE[0]:  # one graph: no 1-row batch
            sizes = [b for b in sizes if b >= MIN_COMPILED_SHAPE[0]]
        self.static_inputs = torch.zeros(max(sizes), 4 + self.max_blocks_per_seq, dtype=torch.long,
                                         device=self.device)
        self.static_inputs[:, 1] = 1
        pool = None
        try:
            with torch.inference_mode():
                for size in sorted(sizes, reverse=True):
                    inputs = self.static_inputs[:size]
                    stream = torch.cuda.Stream()
                    stream.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(stream):
                        self._decode_forward(inputs)  # warm-up: Triton compiles, allocator settles
                    torch.cuda.current_stream().wait_stream(stream)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool):
                        logits = self._decode_forward(inputs)
                    pool = graph.pool()
                    self.graphs[size] = (graph, logits)
            torch.cuda.synchronize()
        except Exception as error:  # e.g. a module with a host sync (MoE routing): decode stays eager
            log.warning("CUDA graph capture failed (%s); decoding eagerly", str(error).splitlines()[0])
            self.graphs.clear()
