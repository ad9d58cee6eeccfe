"""The engine: owns the step loop over scheduler → model runner → sampling → outputs. Knows nothing of HTTP.

`LLMEngine` is synchronous (`add_request`, `step`, `abort`); `AsyncLLMEngine` runs it on a background thread
and hands each request's outputs to an asyncio consumer, aborting the request (and freeing its blocks) when
that consumer goes away.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

import torch

from cs336_systems.serving.block_manager import BlockManager
from cs336_systems.serving.detokenizer import IncrementalDetokenizer, batch_decoder, find_stop, holdback
from cs336_systems.serving.loader import ServedModel
from cs336_systems.serving.model_runner import LaunchedWindow, ModelRunner, bytes_per_block, is_recurrent
from cs336_systems.serving.params import CompletionOutput, RequestOutput, SamplingParams
from cs336_systems.serving.sampling import sample_rows
from cs336_systems.serving.scheduler import ScheduledBatch, Scheduler
from cs336_systems.serving.sequence import Request, Sequence

log = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    block_size: int = 16
    num_blocks: int | None = None  # None: what `gpu_memory_fraction` of free memory holds (CUDA), else enough for
    gpu_memory_fraction: float = 0.8  # max_num_seqs full-length sequences, capped at that on CUDA too
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    cuda_graphs: bool = True
    # The prefill pass as one torch.compile graph (dynamic shapes; compiled when the engine starts): far fewer
    # host calls per pass than the eager fast prefill, results equal to rounding rather than bit for bit.
    # None: compiled on CUDA only (what `serve` and `bench-serve` pass unless told otherwise).
    compile_prefill: bool | None = False
    # With a compiled prefill: inductor's C++ wrapper launches the pass's kernels instead of its Python one (on
    # an H100 the compiled pass was ~4 ms of host launches for ~1 ms of GPU work on the 17M model). Same graph.
    prefill_cpp_wrapper: bool = False
    # Prefill passes padded to a ladder of (rows, tokens) buckets and replayed from CUDA graphs captured when the
    # engine starts (`ModelRunner.prefill_graphs`): a pass then costs the host one upload and one replay instead
    # of its kernel launches; passes larger than every bucket run as before. CUDA only. None: on with CUDA and
    # CUDA graphs (what `serve` and `bench-serve` pass unless told otherwise: on an H100 it took the 17M engine
    # from 28k to 52-60k tokens/s at 64 streams, at ~25 s more start-up); off here, as the compiled steps.
    prefill_cuda_graphs: bool | None = False
    # The decode step as one torch.compile graph (serving/decode.py), captured per batch size as before: fewer,
    # fused kernels per step; results equal to rounding. None as above. Off here so that the library's default
    # engine stays bit for bit the model's own decoding; the command lines turn both on for CUDA, where they
    # measured +70% server tokens/s at 64 streams on an H100 (assignment2-systems/benchmarks/NOTES.md).
    compile_decode: bool | None = False
    device: str | None = None  # default: cuda when available
    dtype: str | None = None  # default: bfloat16 on CUDA, float32 on CPU
    attention_backend: str = "auto"  # paged decode attention: "auto" (Triton on CUDA), "torch" or "triton"
    # While sequences are decoding, a new prompt may wait this many decode steps so that prompts arriving close
    # together share one prefill pass (each pass costs a fixed launch overhead and stalls every decoding stream).
    prefill_delay_steps: int = 4
    # Decode steps run back to back on the device (sampled tokens fed forward there) before the host reads
    # the tokens, checks stops and streams them: host work per token shrinks by this factor; a stopped
    # sequence wastes at most this many − 1 tokens of compute, and clients get tokens in groups of this size.
    decode_steps: int = 4
    # Asynchronous scheduling (vLLM's): the next decode window is planned and launched from the device-side last
    # tokens before the host reads and processes the one in flight, so host work overlaps device work. A
    # sequence that stops on a stop token/string runs one extra window whose tokens are discarded; outputs are
    # those of the synchronous path (see `LLMEngine._step_async`). On by default: on an H100 it raised the
    # server's tokens/s by 20% at 64 and 256 streams (assignment2-systems/README.md).
    async_scheduling: bool = True
    # With asynchronous scheduling: a prefill that falls due while a decode window is in flight is queued on
    # the device behind that window before the host reads it, so that the pass's host work (launches; a few
    # ms even compiled) overlaps the window's GPU time instead of stalling every stream. Same outputs (greedy
    # or seeded). None: on whenever async_scheduling is (on an H100 it raised the in-process engine's tokens/s
    # by 28% on the 17M model at 64 streams (one run) and changed nothing on the 134M one, whose prefills are
    # GPU-bound; assignment2-systems/benchmarks/NOTES.md).
    overlap_prefill: bool | None = None
    seed: int = 0

    def __post_init__(self):
        checks = [
            (self.block_size >= 1, f"block_size must be >= 1, got {self.block_size}"),
            (self.num_blocks is None or self.num_blocks >= 2, f"num_blocks must be >= 2, got {self.num_blocks}"),
            (0 < self.gpu_memory_fraction < 1,
             f"gpu_memory_fraction must be in (0, 1), got {self.gpu_memory_fraction}"),
            (self.max_num_seqs >= 1, f"max_num_seqs must be >= 1, got {self.max_num_seqs}"),
            (self.prefill_delay_steps >= 0, f"prefill_delay_steps must be >= 0, got {self.prefill_delay_steps}"),
            (1 <= self.decode_steps <= 64, f"decode_steps must be in [1, 64], got {self.decode_steps}"),
            (self.max_num_batched_tokens >= 1,
             f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}"),
            (self.dtype in (None, "float32", "bfloat16", "float16"),
             f"dtype must be float32, bfloat16 or float16, got {self.dtype}"),
            (self.attention_backend in ("auto", "torch", "triton"),
             f"unknown attention backend {self.attention_backend!r}"),
            (self.async_scheduling or self.overlap_prefill is not True,
             "overlap_prefill (--overlap-prefill) needs async_scheduling: a prefill goes behind a decode window "
             "launched ahead, which the synchronous schedule never has"),
            (self.compile_prefill is not False or not self.prefill_cpp_wrapper,
             "prefill_cpp_wrapper (--prefill-cpp-wrapper) is for a compiled prefill: not with --no-compile-prefill"),
            (self.cuda_graphs or self.prefill_cuda_graphs is not True,
             "prefill_cuda_graphs (--prefill-cuda-graphs) is not for an engine without CUDA graphs: "
             "--prefill-cuda-graphs and --no-cuda-graphs contradict each other"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    blocks_total: int
    blocks_used: int
    blocks_free: int
    blocks_high_water: int
    block_size: int
    kv_bytes_per_block: int
    prompt_tokens_total: int
    generation_tokens_total: int
    preemptions_total: int
    requests_finished_total: int
    tokens_per_s: float


def check_request(prompt_token_ids: list[int], params: SamplingParams, vocab_size: int, context_length: int,
                  capacity_blocks: int, block_size: int) -> None:
    """ValueError (one line, for a 400) when a request can never be served as asked: it is refused up front
    rather than truncated or left waiting for blocks that cannot exist."""
    if not prompt_token_ids:
        raise ValueError("the prompt is empty")
    if any(not 0 <= t < vocab_size for t in prompt_token_ids):
        raise ValueError(f"prompt token ids must be in [0, {vocab_size})")
    total = len(prompt_token_ids) + params.max_tokens
    if len(prompt_token_ids) >= context_length:
        raise ValueError(f"this model's maximum context length is {context_length} tokens; the prompt has "
                         f"{len(prompt_token_ids)}")
    if total > context_length:
        raise ValueError(f"this model's maximum context length is {context_length} tokens; the prompt "
                         f"({len(prompt_token_ids)}) plus max_tokens ({params.max_tokens}) is {total}")
    needed = -(-total // block_size)
    if needed > capacity_blocks:
        raise ValueError(f"a sequence of {total} tokens needs {needed} KV blocks; the pool has {capacity_blocks}")


class LLMEngine:
    def __init__(self, served: ServedModel, config: EngineConfig | None = None):
        self.served = served
        self.config = config = config or EngineConfig()
        device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = getattr(torch, config.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
        self.model = served.model.to(device=device, dtype=dtype).eval()
        self.context_length = self.model.config.context_length
        self.device = device
        block_size = self.context_length if is_recurrent(self.model) else config.block_size  # a block = a state
        num_blocks = config.num_blocks or self._default_num_blocks(dtype, block_size)
        on_cuda = device.type == "cuda"
        compile_prefill = on_cuda if config.compile_prefill is None else config.compile_prefill
        if config.prefill_cpp_wrapper and not compile_prefill:
            raise ValueError("prefill_cpp_wrapper (--prefill-cpp-wrapper) is for a compiled prefill, which is off "
                             f"on {device.type} unless asked for (--compile-prefill)")
        prefill_graphs = (on_cuda and config.cuda_graphs) if config.prefill_cuda_graphs is None \
            else config.prefill_cuda_graphs
        if prefill_graphs and not on_cuda:
            raise ValueError(f"prefill_cuda_graphs (--prefill-cuda-graphs) needs a CUDA device, not {device.type}")
        self.runner = ModelRunner(self.model, num_blocks, block_size, config.max_num_seqs,
                                  config.cuda_graphs, config.attention_backend,
                                  compile_prefill=compile_prefill,
                                  compile_decode=on_cuda if config.compile_decode is None else config.compile_decode,
                                  prefill_cpp_wrapper=config.prefill_cpp_wrapper,
                                  prefill_graphs=prefill_graphs,
                                  max_num_batched_tokens=config.max_num_batched_tokens)
        self.blocks = BlockManager(num_blocks, block_size)
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs, config.max_num_batched_tokens,
                                   config.prefill_delay_steps, config.decode_steps)
        self.requests: dict[str, Request] = {}
        # A sliding window W lets the next query see positions > length − W only: older blocks can go.
        self.window = self.model.config.sliding_window if self.model.config.attention == "mha" else None
        self.overlap_prefill = config.async_scheduling if config.overlap_prefill is None else config.overlap_prefill
        self.eos_ids = set(served.eos_token_ids)
        self.decode_batch = batch_decoder(served.tokenizer)
        # Sequences without stop strings take a decode window's tokens and text at once (`_take_windows`);
        # False: every sequence goes token by token (`_process`), the reference the tests compare against.
        self.window_text = True
        self.generator = torch.Generator(device=device).manual_seed(config.seed)
        self.prompt_tokens_total = self.generation_tokens_total = self.requests_finished_total = 0
        self._recent: deque[tuple[float, int]] = deque()
        self._recent_tokens = 0
        # Wall time per kind of step (each ends in a host sync, so this is device time plus host work): where a
        # benchmark's time went. kind -> [steps, seconds, sequence-steps (rows x decode steps, or prompt tokens)]
        self.step_totals: dict[str, list[float]] = {"prefill": [0, 0.0, 0], "decode": [0, 0.0, 0]}
        # Asynchronous scheduling: the decode window launched and not yet read (its batch, its device tokens).
        self._in_flight: tuple[ScheduledBatch, LaunchedWindow] | None = None

    def _default_num_blocks(self, dtype: torch.dtype, block_size: int) -> int:
        per_seq = -(-self.context_length // block_size)
        enough = self.config.max_num_seqs * per_seq + 1
        if self.device.type != "cuda":
            return enough
        free, _ = torch.cuda.mem_get_info(self.device)
        block_bytes = bytes_per_block(self.model, block_size, dtype)
        fits = int(free * self.config.gpu_memory_fraction) // block_bytes
        return max(2, min(enough, fits))

    # -- requests -------------------------------------------------------------------------------------------
    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """ValueError (one line, for a 400) when the request can never be served as asked."""
        check_request(prompt_token_ids, params, self.model.config.vocab_size, self.context_length,
                      self.blocks.allocator.capacity, self.blocks.block_size)

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> Request:
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already running")
        self.check_request(prompt_token_ids, params)
        request = Request(request_id, list(prompt_token_ids), params)
        request.end_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_ids)
        if params.seed is not None:
            # One generator per sample, each drawing once per token of its own: the text of a seeded request
            # is then independent of what shares its batch, of preemption and of multi-step decoding.
            request.generators = [torch.Generator(device=self.device).manual_seed((params.seed + 7919 * i) % 2**63)
                                  for i in range(params.n)]
        parent = self._new_sequence(request, 0, list(prompt_token_ids))
        parent.forks_pending = params.n - 1
        self.requests[request_id] = request
        self.scheduler.add(parent)
        self.prompt_tokens_total += len(prompt_token_ids)
        return request

    def _new_sequence(self, request: Request, index: int, token_ids: list[int]) -> Sequence:
        seq = Sequence(request, index, token_ids)
        seq.detokenizer = IncrementalDetokenizer(self.served.tokenizer.decode, request.prompt_token_ids)
        request.seqs.append(seq)
        return seq

    def abort(self, request_id: str) -> None:
        """Ends a request now (its client went away); its blocks are free when this returns."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return
        for seq in request.seqs:
            if not seq.finished:
                self.scheduler.finish(seq, "abort")

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # -- the step ------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        if self.config.async_scheduling:
            return self._step_async()
        start = time.perf_counter()
        batch = self.scheduler.schedule()
        if batch is None:
            return []
        try:
            return self._run(batch)
        finally:
            self._tally(batch, start)

    def _tally(self, batch: ScheduledBatch, start: float, excluded: float = 0.0) -> None:
        totals = self.step_totals[batch.kind]
        totals[0] += 1
        totals[1] += time.perf_counter() - start - excluded
        totals[2] += (len(batch.seqs) * batch.steps if batch.kind == "decode"
                      else sum(len(slots) for slots in batch.slots))

    def _step_async(self) -> list[RequestOutput]:
        """One step with asynchronous scheduling: the window in flight (or, if none, a freshly scheduled one)
        gets its successor launched behind it from the device-side last tokens (`Scheduler.schedule_ahead`), and
        only then does the host wait for the in-flight window's tokens and process them, while the successor
        runs. Prefills, and any window whose plan needs the host's results (preemption), run as in `step`.

        Why the outputs are those of the synchronous path: each sequence's tokens are made by the same
        computation (its own window boundaries, positions and slots; the next window's first input is the
        device copy of the very token the host later reads), and the host processes every window exactly as
        `step` does, in the same order. What differs is only work whose results are discarded: a sequence that
        stopped (stop token, eos, stop string) or was aborted in window k still runs window k + 1, whose tokens
        are dropped unread (its KV writes land in blocks it held when k + 1 was planned, and anything that reuses
        those blocks is queued on the device after k + 1). With a seed, each sample draws from its own
        generator, once per token it makes; the extra window's draws advance only the generator of a sample
        that has ended and never draws again, so no emitted token changes. Unseeded sampled requests draw from
        the engine-wide generator, whose order depends on the batch (as with any batching change), so their
        tokens differ from the synchronous path's. A sequence whose window ends at max_tokens is not planned
        beyond it, and a sequence is never planned more than one window past its last read one."""
        start = time.perf_counter()
        current, self._in_flight = self._in_flight, None
        if current is not None and all(seq.finished for seq in current[0].seqs):
            current = None  # every row ended (aborted): nothing to read, nothing to follow
        if current is None:
            batch = self.scheduler.schedule()
            if batch is None:
                return []
            if batch.kind == "prefill":
                try:
                    return self._run(batch)
                finally:
                    self._tally(batch, start)
            current = (batch, self._launch(batch, None))
        ahead = self.scheduler.schedule_ahead()
        behind = None  # (a prefill queued behind the window in flight, its launch, the seconds its launch took)
        if ahead is not None:
            self._in_flight = (ahead, self._launch(ahead, current))
        elif self.overlap_prefill and (batch := self.scheduler.schedule_prefill_behind()) is not None:
            launched_at = time.perf_counter()
            launched = self._launch_prefill(batch, overlap=True)
            behind = (batch, launched, time.perf_counter() - launched_at)
        try:
            touched = self._read(*current)
        finally:
            self._tally(current[0], start, excluded=behind[2] if behind else 0.0)
        if behind is not None:  # read after the window, as `step` would have run it after the window
            taken_at = time.perf_counter()
            touched.update(self._take_prefill(behind[0], behind[1]))
            self._tally(behind[0], taken_at - behind[2])
        return [self._output(r) for r in touched.values()]

    def _launch(self, batch: ScheduledBatch, after: tuple[ScheduledBatch, LaunchedWindow] | None,
                overlap: bool = True) -> LaunchedWindow:
        """Queues a decode window; `after`: the window in flight that this one continues (its rows' last tokens
        are still on the device); `overlap`: pinned copies that never wait for the device (see `runner.launch`)."""
        self.runner.copy_blocks(batch.copies)
        seqs = batch.seqs
        tables = [self.blocks.tables[s.seq_id] for s in seqs]
        lengths = [len(s.token_ids) + s.num_inflight for s in seqs]
        feed = last = None
        if after is None:
            last = [s.token_ids[-1] for s in seqs]
        else:
            row = {s.seq_id: i for i, s in enumerate(after[0].seqs)}
            feed = (after[1], [row[s.seq_id] for s in seqs])
        window = self.runner.launch(last, lengths, batch.slots, tables, self._sampler(seqs), batch.steps,
                                    feed=feed, overlap=overlap)
        for seq, seq_slots in zip(seqs, batch.slots, strict=True):
            seq.num_inflight += len(seq_slots)
        return window

    def _read(self, batch: ScheduledBatch, window: LaunchedWindow) -> dict[str, Request]:
        """Waits for a launched window's tokens and processes them as `_run` does; rows of sequences that ended
        since it was launched are discarded. Returns the requests it touched, by id."""
        tokens = self.runner.collect(window)
        for seq, seq_slots in zip(batch.seqs, batch.slots, strict=True):
            seq.num_inflight -= len(seq_slots)
        live = [i for i, seq in enumerate(batch.seqs) if not seq.finished]
        if not live:
            return {}
        columns = list(zip(*tokens, strict=True))
        if len(live) == len(batch.seqs):
            seqs, slots = batch.seqs, batch.slots
        else:
            seqs, columns, slots = ([items[i] for i in live] for items in (batch.seqs, columns, batch.slots))
        self._take(seqs, columns, slots)
        self._slide(seqs)
        return {seq.request.request_id: seq.request for seq in seqs}

    def _run(self, batch) -> list[RequestOutput]:
        if batch.kind == "decode":  # launched and read at once: the synchronous schedule
            touched = self._read(batch, self._launch(batch, None, overlap=False))
        else:
            touched = self._take_prefill(batch, self._launch_prefill(batch))
        return [self._output(r) for r in touched.values()]

    def _launch_prefill(self, batch: ScheduledBatch, overlap: bool = False) -> LaunchedWindow:
        """Queues a prefill pass and the sampling of each prompt's first token (one per sample: a prompt with
        n > 1 samples gives its one logits row to each of them)."""
        self.runner.copy_blocks(batch.copies)
        seqs = batch.seqs
        rows = [(i, s.index + j) for i, s in enumerate(seqs) for j in range(1 + s.forks_pending)]
        sample_rows_of = self._sampler([seqs[i] for i, _ in rows], [index for _, index in rows])

        def sample(logits: torch.Tensor) -> torch.Tensor:
            return sample_rows_of(logits[[i for i, _ in rows]] if len(rows) != len(seqs) else logits)

        return self.runner.launch_prefill([s.token_ids for s in seqs], batch.slots, sample, overlap=overlap)

    def _take_prefill(self, batch: ScheduledBatch, launched: LaunchedWindow) -> dict[str, Request]:
        """The prefill's first tokens into their sequences (forking the extra samples); the requests touched."""
        seqs = batch.seqs
        touched = {seq.request.request_id: seq.request for seq in seqs}
        tokens = self.runner.collect(launched)[0]
        appended: list[Sequence] = []
        for seq in seqs:
            appended += [seq] + [self._fork(seq) for _ in range(seq.forks_pending)]
            seq.forks_pending = 0
        for seq, token in zip(appended, tokens, strict=True):
            seq.num_cached = len(seq.token_ids)
            seq.token_ids.append(token)
        self._process(appended)
        self._count(len(tokens))
        self._slide(appended)
        return touched

    def _slide(self, seqs: list[Sequence]) -> None:
        """Frees the blocks a sliding window has left behind: the next query (position len − 1) sees positions
        from len − W on."""
        if self.window is None:
            return
        for seq in seqs:
            if not seq.finished and seq.seq_id in self.blocks.tables:
                self.blocks.release_before(seq.seq_id, len(seq.token_ids) - self.window)

    def _sampler(self, seqs: list[Sequence], sample_indices: list[int] | None = None):
        """Samples one token per row; row i belongs to sample `sample_indices[i]` (default: its sequence's)."""
        params = [s.request.params for s in seqs]
        temperatures, top_ps = [p.temperature for p in params], [p.top_p for p in params]
        indices = sample_indices if sample_indices is not None else [s.index for s in seqs]
        generators = [None if s.request.generators is None else s.request.generators[i]
                      for s, i in zip(seqs, indices, strict=True)]
        return lambda logits: sample_rows(logits, temperatures, top_ps, generators, self.generator)

    def _take(self, seqs: list[Sequence], columns: list[tuple[int, ...]], slots: list[list[int]]) -> None:
        """A decode window's tokens (`columns[i]`: sequence i's) into the sequences: text, stops, finishing."""
        if not self.window_text:
            self._count(self._take_steps(seqs, columns, slots))
            return
        stepwise = [i for i, seq in enumerate(seqs) if seq.request.params.stop]
        if not stepwise:
            self._count(self._take_windows(seqs, columns, slots))
            return
        windowed = sorted(set(range(len(seqs))) - set(stepwise))
        pick = lambda rows, items: [items[i] for i in rows]
        kept = self._take_steps(pick(stepwise, seqs), pick(stepwise, columns), pick(stepwise, slots))
        kept += self._take_windows(pick(windowed, seqs), pick(windowed, columns), pick(windowed, slots))
        self._count(kept)

    def _take_steps(self, seqs: list[Sequence], columns: list[tuple[int, ...]], slots: list[list[int]]) -> int:
        """Token by token: after each decode step every sequence still going takes its token and `_process`
        checks it (stop strings need this: text is cut at the token where one appears). Returns tokens kept."""
        kept = 0
        for step in range(len(columns[0]) if columns else 0):
            active = [seq for seq, seq_slots in zip(seqs, slots, strict=True)
                      if not seq.finished and step < len(seq_slots)]
            if not active:
                break
            for seq, column, seq_slots in zip(seqs, columns, slots, strict=True):
                if not seq.finished and step < len(seq_slots):
                    seq.num_cached = len(seq.token_ids)
                    seq.token_ids.append(column[step])
            self._process(active)
            kept += len(active)
        return kept

    def _take_windows(self, seqs: list[Sequence], columns: list[tuple[int, ...]], slots: list[list[int]]) -> int:
        """The whole window per sequence at once, for sequences without stop strings: its tokens up to the
        first end-of-text or stop token, or as many as it has slots for (max_tokens), and their text from one
        batched decode for all sequences, the same text, finish reasons and counts as `_take_steps` gives.
        A window whose text ends inside a character (or adds none) is resolved step by step from a second
        batched decode of its shorter windows (`IncrementalDetokenizer.advance_steps`). Returns tokens kept."""
        kept = 0
        texted: list[tuple[Sequence, int, bool]] = []  # (sequence, text tokens taken, ended by a stop token)
        for seq, column, seq_slots in zip(seqs, columns, slots, strict=True):
            new = column[: len(seq_slots)]
            ends = seq.request.end_ids
            cut = None
            if ends and not ends.isdisjoint(new):
                cut = next(j for j, token in enumerate(new) if token in ends)
                new = new[: cut + 1]
            seq.num_cached = len(seq.token_ids) + len(new) - 1
            seq.token_ids.extend(new)
            kept += len(new)
            text_ids = new if cut is None else new[:cut]  # the end-of-text token itself is not text
            if text_ids:
                seq.detokenizer.ids.extend(text_ids)
                texted.append((seq, len(text_ids), cut is not None))
            else:
                seq.text += seq.detokenizer.flush()
                self.scheduler.finish(seq, "stop")
        if not texted:
            return kept
        texts = self.decode_batch([w for seq, _, _ in texted for w in seq.detokenizer.windows()])
        added = []
        for i, (seq, n, _) in enumerate(texted):
            if n > 1 and texts[2 * i].endswith("\ufffd"):  # the read text ends inside a character (only after a
                detok = seq.detokenizer  # prompt that does): token by token, as `_take_steps` would
                new, detok.ids[-n:] = detok.ids[-n:], []
                added.append("".join(map(detok.push, new)))
            else:
                added.append(seq.detokenizer.advance(texts[2 * i], texts[2 * i + 1]))
        unsure = [i for i, (_, n, _) in enumerate(texted)
                  if n > 1 and not added[i] and not texts[2 * i].endswith("\ufffd")]
        if unsure:  # its text ends inside a character: where would the token-by-token path have stopped?
            detoks = [(texted[i][0].detokenizer, texted[i][1]) for i in unsure]
            shorter = self.decode_batch([w for detok, n in detoks for w in detok.step_windows(n)])
            at = 0
            for i in unsure:
                seq, n, _ = texted[i]
                nows = [*shorter[at : at + n - 1], texts[2 * i + 1]]
                added[i] = seq.detokenizer.advance_steps(texts[2 * i], nows)
                at += n - 1
        for (seq, _, stopped), text in zip(texted, added, strict=True):
            seq.text += text
            if stopped:
                seq.text += seq.detokenizer.flush()
                self.scheduler.finish(seq, "stop")
            elif len(seq.token_ids) - seq.prompt_len >= seq.request.params.max_tokens:
                seq.text += seq.detokenizer.flush()
                self.scheduler.finish(seq, "length")
        return kept

    def _fork(self, parent: Sequence) -> Sequence:
        child = self._new_sequence(parent.request, len(parent.request.seqs), list(parent.token_ids))
        self.scheduler.fork(parent, child)
        return child

    def _process(self, seqs: list[Sequence]) -> None:
        """Text, stop conditions and finishing for each sequence's newest token; all new text is decoded in
        one batched call."""
        texted = []
        for seq in seqs:
            token, params = seq.token_ids[-1], seq.request.params
            if token in params.stop_token_ids or (token in self.eos_ids and not params.ignore_eos):
                seq.text += seq.detokenizer.flush()  # the end-of-text token itself is not text
                self.scheduler.finish(seq, "stop")
            else:
                seq.detokenizer.ids.append(token)
                texted.append(seq)
        windows = [w for seq in texted for w in seq.detokenizer.windows()]
        texts = self.decode_batch(windows) if windows else []
        for i, seq in enumerate(texted):
            params = seq.request.params
            before = len(seq.text)
            seq.text += seq.detokenizer.advance(texts[2 * i], texts[2 * i + 1])
            at = find_stop(seq.text, params.stop, before)
            if at is not None:
                seq.text = seq.text[:at]  # the stop string and anything after it are not returned
                self.scheduler.finish(seq, "stop")
            elif len(seq.token_ids) - seq.prompt_len >= params.max_tokens:
                seq.text += seq.detokenizer.flush()
                self.scheduler.finish(seq, "length")

    def _output(self, request: Request) -> RequestOutput:
        outputs = []
        for seq in request.seqs:
            visible = len(seq.text)
            if not seq.finished and request.params.stop:
                visible = max(seq.emitted_chars, visible - holdback(request.params.stop))
            out_ids = seq.output_ids
            outputs.append(CompletionOutput(
                index=seq.index, text=seq.text[:visible], token_ids=out_ids,  # a fresh list: a slice
                delta_text=seq.text[seq.emitted_chars : visible], delta_token_ids=out_ids[seq.emitted_tokens :],
                finish_reason=seq.finish_reason,
            ))
            seq.emitted_chars, seq.emitted_tokens = visible, len(out_ids)
        finished = request.finished
        if finished:
            self.requests.pop(request.request_id, None)
            self.requests_finished_total += 1
        return RequestOutput(request.request_id, request.prompt_token_ids, outputs, finished)

    def _count(self, generated: int) -> None:
        """Tokens of this step, kept for a 10 s window with a running sum (stats() is read every step)."""
        now = time.monotonic()
        self.generation_tokens_total += generated
        self._recent.append((now, generated))
        self._recent_tokens += generated
        while self._recent and now - self._recent[0][0] > 10.0:
            self._recent_tokens -= self._recent.popleft()[1]

    def stats(self) -> EngineStats:
        recent = self._recent
        span = (recent[-1][0] - recent[0][0]) if len(recent) > 1 else 0.0
        rate = (self._recent_tokens - recent[0][1]) / span if span > 0 else 0.0
        return EngineStats(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            blocks_total=self.blocks.allocator.capacity, blocks_used=self.blocks.num_used,
            blocks_free=self.blocks.num_free, blocks_high_water=self.blocks.high_water,
            block_size=self.blocks.block_size, kv_bytes_per_block=self.runner.kv_bytes_per_block,
            prompt_tokens_total=self.prompt_tokens_total, generation_tokens_total=self.generation_tokens_total,
            preemptions_total=self.scheduler.num_preemptions, requests_finished_total=self.requests_finished_total,
            tokens_per_s=rate,
        )

    def generate(self, prompts: list[list[int]],
                 params: SamplingParams | list[SamplingParams]) -> list[RequestOutput]:
        """Offline: runs every prompt to completion, batched, and returns the final outputs in prompt order."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        ids = [f"offline-{i}-{time.monotonic_ns()}" for i in range(len(prompts))]
        for rid, prompt, p in zip(ids, prompts, params_list, strict=True):
            self.add_request(rid, prompt, p)
        final: dict[str, RequestOutput] = {}
        while any(rid not in final for rid in ids):
            for out in self.step():
                if out.finished:
                    final[out.request_id] = out
        return [final[rid] for rid in ids]


class EngineDead(RuntimeError):
    """The engine's step loop failed; every open request gets this error."""


class AsyncLLMEngine:
    """An `LLMEngine` stepping on its own thread. Requests and aborts cross into it through a locked inbox;
    each step's outputs cross back with one `call_soon_threadsafe` per event loop."""

    def __init__(self, engine: LLMEngine, model_name: str | None = None):
        self.engine = engine
        self.model_name = model_name or engine.served.name
        self._inbox: list[tuple] = []
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._routes: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}  # engine thread only
        self.error: BaseException | None = None

    @classmethod
    def from_served(cls, served: ServedModel, config: EngineConfig | None = None,
                    model_name: str | None = None) -> AsyncLLMEngine:
        return cls(LLMEngine(served, config), model_name)

    @property
    def served(self) -> ServedModel:
        return self.engine.served

    @property
    def context_length(self) -> int:
        return self.engine.context_length

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="cs336-engine", daemon=True)
            self._thread.start()

    def shutdown(self) -> None:
        self._stop = True
        self._wakeup.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def reset_high_water(self) -> None:
        """Starts the KV blocks' high-water mark afresh (between benchmark phases, while idle)."""
        self.engine.blocks.high_water = self.engine.blocks.num_used

    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.engine.check_request(prompt_token_ids, params)

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._inbox.append(("abort", request_id))
        self._wakeup.set()

    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Outputs of one request as they come; closing the iterator early aborts the request."""
        if self.error is not None:
            raise EngineDead(f"the engine stopped: {self.error}")
        self.check_request(prompt_token_ids, params)
        self.start()
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            self._inbox.append(("add", request_id, list(prompt_token_ids), params, asyncio.get_running_loop(), queue))
        self._wakeup.set()
        finished = False
        try:
            async for item in queued_outputs(queue):
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.abort(request_id)

    # -- the engine thread ---------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop:
            with self._lock:
                inbox, self._inbox = self._inbox, []
            for item in inbox:
                self._take(item)
            if not self.engine.has_unfinished():
                self._wakeup.wait(timeout=1.0)
                self._wakeup.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as error:  # a bug or a CUDA failure: fail every open request, keep no half state
                log.exception("engine step failed")
                self.error = error
                for rid in list(self._routes):
                    self._send(rid, EngineDead(f"the engine stopped: {error}"))
                    self.engine.abort(rid)
                self._routes.clear()
                return
            by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
            for out in outputs:
                route = self._routes.get(out.request_id)
                if route is None:
                    continue
                if out.finished:
                    del self._routes[out.request_id]
                by_loop.setdefault(route[0], []).append((route[1], out))
            for loop, items in by_loop.items():
                self._post(loop, _deliver, items)

    def _take(self, item: tuple) -> None:
        if item[0] == "abort":
            self.engine.abort(item[1])
            self._routes.pop(item[1], None)
            return
        _, rid, prompt, params, loop, queue = item
        try:
            self.engine.add_request(rid, prompt, params)
        except ValueError as error:
            self._post(loop, _deliver, [(queue, error)])
            return
        self._routes[rid] = (loop, queue)

    def _send(self, rid: str, item) -> None:
        loop, queue = self._routes[rid]
        self._post(loop, _deliver, [(queue, item)])

    @staticmethod
    def _post(loop: asyncio.AbstractEventLoop, fn, arg) -> None:
        with contextlib.suppress(RuntimeError):  # that event loop has closed: nobody is listening any more
            loop.call_soon_threadsafe(fn, arg)


async def queued_outputs(queue: asyncio.Queue) -> AsyncIterator[RequestOutput]:
    """One request's outputs from its queue until the finished one; an exception in the queue is raised. A
    consumer that fell behind (a slow client, a busy event loop) gets one merged update instead of a backlog
    of single-step ones."""
    while True:
        item = await queue.get()
        while not isinstance(item, BaseException) and not queue.empty():
            newer = queue.get_nowait()
            item = newer if isinstance(newer, BaseException) else merge_outputs(item, newer)
        if isinstance(item, BaseException):
            raise item
        yield item
        if item.finished:
            return


def merge_outputs(older: RequestOutput, newer: RequestOutput) -> RequestOutput:
    """One update equivalent to `older` followed by `newer`: newer's cumulative state, both deltas."""
    deltas = {o.index: o for o in older.outputs}
    merged = []
    for out in newer.outputs:
        before = deltas.get(out.index)
        if before is not None:
            out = CompletionOutput(out.index, out.text, out.token_ids, before.delta_text + out.delta_text,
                                   before.delta_token_ids + out.delta_token_ids, out.finish_reason)
        merged.append(out)
    return RequestOutput(newer.request_id, newer.prompt_token_ids, merged, newer.finished)


def _deliver(items: list[tuple[asyncio.Queue, object]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)
