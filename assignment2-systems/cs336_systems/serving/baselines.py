"""The serving benchmark's workload run offline with static batching, the way one would without a server.

Requests are grouped in arrival order into batches of `concurrency`; each batch is left-padded and decoded for
as many steps as its longest request asks for, and only each request's own tokens count as useful output.
Two decoders: Hugging Face `generate` (`min_new_tokens = max_new_tokens`, greedy) and our own contiguous-KV-cache
`cs336_basics.decoding.generate`. Each reports output tokens/s, TTFT and ITL measured per decoding step (a
request "arrives" when its batch starts: a closed loop of `concurrency` clients that wait for the whole batch),
and the KV memory a contiguous pre-allocation takes: batch x (longest prompt + longest output) x bytes per token.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from cs336_systems.serving.loadgen import RequestSpec, latency_summary


def static_batches(workload: Sequence[RequestSpec], concurrency: int) -> list[list[RequestSpec]]:
    """Consecutive groups of `concurrency` requests (the last one may be smaller)."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    return [list(workload[i : i + concurrency]) for i in range(0, len(workload), concurrency)]


def contiguous_kv_bytes(batch: Sequence[RequestSpec], bytes_per_token: int) -> int:
    """What a contiguous cache for this batch reserves: every row as long as the longest prompt + output."""
    longest_prompt = max(len(r.prompt_token_ids) for r in batch)
    longest_output = max(r.max_tokens for r in batch)
    return len(batch) * (longest_prompt + longest_output) * bytes_per_token


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _left_padded(batch: Sequence[RequestSpec], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(r.prompt_token_ids) for r in batch)
    ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), longest), dtype=torch.long)
    for row, r in enumerate(batch):
        ids[row, longest - len(r.prompt_token_ids) :] = torch.as_tensor(r.prompt_token_ids)
        mask[row, longest - len(r.prompt_token_ids) :] = 1
    return ids.to(device), mask.to(device)


def _run_batches(
    system: str,
    workload: Sequence[RequestSpec],
    concurrency: int,
    device: torch.device,
    bytes_per_token: int,
    decode_batch: Callable[[list[RequestSpec], int], tuple[list[int], list[float]]],
) -> dict[str, Any]:
    """Times `decode_batch(batch, steps) -> (tokens generated per row, host times at which each step's token was
    available)` over the static batches; the times are relative to `perf_counter` like the batch start."""
    ttft: list[float] = []
    itl: list[float] = []
    useful = generated = 0
    short_rows = 0
    reserved = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base_mem = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    for batch in static_batches(workload, concurrency):
        steps = max(r.max_tokens for r in batch)
        t0 = time.perf_counter()
        lengths, times = decode_batch(batch, steps)
        _sync(device)
        times = [t - t0 for t in times]
        for r, n in zip(batch, lengths, strict=True):
            own = min(r.max_tokens, n)
            short_rows += n < r.max_tokens
            useful += own
            if own:
                ttft.append(times[0])
                itl.extend(times[j + 1] - times[j] for j in range(own - 1))
        generated += len(batch) * steps
        reserved.append(contiguous_kv_bytes(batch, bytes_per_token))
    duration = time.perf_counter() - start
    out = {
        "system": system,
        "concurrency": concurrency,
        "num_requests": len(workload),
        "errors": 0,
        "rows_short_of_requested": short_rows,
        "duration_s": duration,
        "output_tokens": useful,
        "requested_output_tokens": sum(r.max_tokens for r in workload),
        "generated_tokens": generated,
        "prompt_tokens": sum(len(r.prompt_token_ids) for r in workload),
        "output_tokens_per_s": useful / duration if duration > 0 else math.nan,
        "ttft_ms": latency_summary(ttft),
        "itl_ms": latency_summary(itl),
        "kv": {"bytes_per_token": bytes_per_token, "contiguous_bytes_max": max(reserved),
               "contiguous_bytes_per_batch": reserved},
    }
    if device.type == "cuda":
        out["kv"]["cuda_peak_allocated_bytes_above_weights"] = torch.cuda.max_memory_allocated(device) - base_mem
    return out


# ------------------------------------------------------------------------------------------ Hugging Face
class _StepClock:
    """A `generate` streamer that only notes when each step's tokens reach the host: `generate` hands it the
    prompt first, then every step's new tokens already copied to the CPU (so the time is after the step ran)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # a no-op wait where generate already copied the tokens to the host
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def run_hf_generate(
    model: Any, workload: Sequence[RequestSpec], concurrency: int, *, pad_token_id: int, bytes_per_token: int
) -> dict[str, Any]:
    """(a) transformers `generate`, static batches, greedy, exactly the batch's longest output length."""
    device = next(model.parameters()).device

    @torch.no_grad()
    def decode(batch: list[RequestSpec], steps: int) -> tuple[list[int], list[float]]:
        ids, mask = _left_padded(batch, pad_token_id, device)
        clock = _StepClock()
        out = model.generate(input_ids=ids, attention_mask=mask, min_new_tokens=steps, max_new_tokens=steps,
                             do_sample=False, pad_token_id=pad_token_id, streamer=clock, use_cache=True)
        new = out.shape[1] - ids.shape[1]
        return [new] * len(batch), clock.times

    return _run_batches("hf", workload, concurrency, device, bytes_per_token, decode)


# ---------------------------------------------------------------------------------------- ours, non-paged
def run_nonpaged(model: Any, workload: Sequence[RequestSpec], concurrency: int) -> dict[str, Any]:
    """(b) `cs336_basics.decoding.generate`: left-padded static batches over a contiguous pre-allocated cache.

    A forward pre-hook notes when each call starts: call i > 0 starts right after `generate` copied token i - 1 to
    the host (`.tolist()`), and the last token is on the host when `generate` returns."""
    from cs336_basics.decoding import generate

    device = model.lm_head.weight.device
    bytes_per_token = model.new_kv_caches(1, max_len=1).bytes_per_token

    def decode(batch: list[RequestSpec], steps: int) -> tuple[list[int], list[float]]:
        starts: list[float] = []
        handle = model.register_forward_pre_hook(lambda *_: starts.append(time.perf_counter()))
        try:
            rows = generate(model, [r.prompt_token_ids for r in batch], max_new_tokens=steps, temperature=0.0)
        finally:
            handle.remove()
        times = [*starts[1:], time.perf_counter()]
        return [len(row) for row in rows], times

    return _run_batches("nonpaged", workload, concurrency, device, bytes_per_token, decode)


# ------------------------------------------------------------------------------- ours, engine without HTTP
def run_engine_offline(engine: Any, workload: Sequence[RequestSpec], concurrency: int) -> dict[str, Any]:
    """(c) the server's own `LLMEngine` (continuous batching, paged KV, CUDA graphs) stepped in this process
    with no HTTP, no SSE and no engine process: what the server would give if serving cost nothing, so the
    gap to the server row is the serving path's share. At most `concurrency` sequences run (the scheduler's
    `max_num_seqs`, restored afterwards); every request is queued up front and admitted in order as slots free,
    i.e. a closed loop of `concurrency` clients: request k ≥ concurrency "arrives" when the (k − concurrency +
    1)-th request finishes. TTFT and ITL are taken, like the load generator's, when a step hands back a
    request's new tokens (ITL per chunk of `decode_steps` tokens)."""
    from cs336_systems.serving.params import SamplingParams

    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    scheduler = engine.scheduler
    saved = scheduler.max_num_seqs
    scheduler.max_num_seqs = min(saved, concurrency)
    ids = [f"bench-{i}-{time.monotonic_ns()}" for i in range(len(workload))]
    index = {rid: i for i, rid in enumerate(ids)}
    arrival = [math.nan] * len(workload)
    last = [math.nan] * len(workload)
    ttft: list[float] = []
    itl: list[float] = []
    produced = [0] * len(workload)
    finished = 0
    device = engine.device
    engine.blocks.high_water = engine.blocks.num_used
    before = {kind: list(t) for kind, t in engine.step_totals.items()}
    try:
        _sync(device)
        start = time.perf_counter()
        for i, (rid, r) in enumerate(zip(ids, workload, strict=True)):
            engine.add_request(rid, list(r.prompt_token_ids),
                               SamplingParams(max_tokens=r.max_tokens, temperature=0.0, ignore_eos=True))
            if i < concurrency:
                arrival[i] = start
        while engine.has_unfinished():
            outputs = engine.step()
            now = time.perf_counter()
            for out in outputs:
                i = index[out.request_id]
                count = len(out.outputs[0].token_ids)
                if count > produced[i]:
                    if produced[i] == 0:
                        ttft.append(now - arrival[i])
                    else:
                        itl.append(now - last[i])
                    produced[i], last[i] = count, now
                if out.finished:
                    if finished + concurrency < len(workload):
                        arrival[finished + concurrency] = now
                    finished += 1
        duration = time.perf_counter() - start
    finally:
        scheduler.max_num_seqs = saved
    useful = sum(produced)
    return {
        "system": "engine",
        "concurrency": concurrency,
        "num_requests": len(workload),
        "errors": 0,
        "duration_s": duration,
        "output_tokens": useful,
        "requested_output_tokens": sum(r.max_tokens for r in workload),
        "prompt_tokens": sum(len(r.prompt_token_ids) for r in workload),
        "output_tokens_per_s": useful / duration if duration > 0 else math.nan,
        "ttft_ms": latency_summary(ttft),
        "itl_ms": latency_summary(itl),
        "kv_blocks_high_water": engine.blocks.high_water,
        "decode_steps": engine.config.decode_steps,
        "async_scheduling": engine.config.async_scheduling,
        "overlap_prefill": engine.overlap_prefill,
        "compile_prefill": engine.runner.prefill_forward is not None and engine.runner.prefill_forward.compiled,
        "compile_decode": engine.runner.decode_forward is not None,
        # where the time went: passes, seconds and rows (prompt tokens; sequences x decode steps) per step kind
        "steps": {kind: {"passes": t[0] - before[kind][0], "seconds": t[1] - before[kind][1],
                         "rows": t[2] - before[kind][2]} for kind, t in engine.step_totals.items()},
    }


# ------------------------------------------------------------------------------------------------ loading
def load_hf_causal_lm(hf_dir: str, device: str | torch.device, dtype: torch.dtype) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype).to(device).eval()


def load_ours(hf_dir: str, device: str | torch.device, dtype: torch.dtype) -> Any:
    from cs336_basics.hf import from_hf

    model, _ = from_hf(hf_dir)
    return model.to(device=device, dtype=dtype).eval()


def load_engine(hf_dir: str, engine_config: Any) -> Any:
    from cs336_systems.serving.engine import LLMEngine
    from cs336_systems.serving.loader import load_hf_model

    return LLMEngine(load_hf_model(hf_dir), engine_config)


def warm_up(system: str, model: Any, pad_token_id: int, bytes_per_token: int) -> None:
    """One short batch so that first-call costs (CUDA context, kernel selection) stay out of the timings."""
    spec = [RequestSpec(list(range(1, 9)), 4), RequestSpec(list(range(1, 5)), 4)]
    if system == "engine":
        run_engine_offline(model, spec, 2)
    elif system == "hf":
        run_hf_generate(model, spec, 2, pad_token_id=pad_token_id, bytes_per_token=bytes_per_token)
    else:
        run_nonpaged(model, spec, 2)
