"""A bounded load generator for an OpenAI-compatible `/v1/completions` server (ours, on loopback only).

N requests with seeded random token-id prompts and output lengths are replayed in a closed loop at a fixed
concurrency (a semaphore: a new request starts when one finishes), each with `stream: true` and
`ignore_eos: true` so it produces exactly its requested number of tokens. Per request we record the time to the
first token (TTFT), the gaps between streamed tokens (inter-token latency, ITL) and the tokens received; the run
reports output tokens/s, TTFT and ITL percentiles, and reads `/metrics` for how many KV blocks were in use.

Counting tokens: a chunk that carries `token_ids` (asked for with our server's `return_token_ids` extension) or
OpenAI `logprobs.tokens` counts those; otherwise a
chunk with text counts as one token. The final usage chunk (`stream_options.include_usage`), when the server
sends one, is authoritative for the total. ITL is the gap between consecutive token-carrying chunks; a chunk
that carries k > 1 tokens (the server merges the updates of a client that lags behind) contributes its gap once,
and the summary counts the tokens that arrived so (`tokens_merged_into_earlier_chunks`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import math
import random
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

# Prompt token ids are drawn from [0, 256): the byte tokens every byte-level BPE of ours starts with, so a
# prompt is valid for any of our tokenizers and models and never contains a special token.
DEFAULT_TOKEN_RANGE = (0, 256)


class LoopbackOnlyError(ValueError):
    """The load generator only ever sends traffic to this machine."""


def check_loopback_url(url: str) -> str:
    """The URL without a trailing slash, or `LoopbackOnlyError` unless it names a loopback host over http(s).

    Hostnames are not resolved: only `localhost` and literal loopback addresses (127.0.0.0/8, ::1) pass."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise LoopbackOnlyError(f"--url {url!r}: expected http://127.0.0.1:PORT (a loopback server)")
    host = parts.hostname
    if host != "localhost":
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise LoopbackOnlyError(
                f"--url {url!r}: host {host!r} is not loopback; the benchmark only targets 127.0.0.0/8, ::1 or "
                "localhost on this machine"
            )
    return url.rstrip("/")


# ------------------------------------------------------------------------------------------------- workload
@dataclass(frozen=True)
class RequestSpec:
    prompt_token_ids: list[int]
    max_tokens: int


def make_workload(
    num_requests: int,
    prompt_len_range: tuple[int, int],
    output_len_range: tuple[int, int],
    seed: int,
    token_range: tuple[int, int] = DEFAULT_TOKEN_RANGE,
) -> list[RequestSpec]:
    """`num_requests` prompts and output lengths, uniform in the inclusive ranges, from `random.Random(seed)`.

    Drawn one request at a time, so a shorter workload of the same seed is a prefix of a longer one: every
    system and concurrency level sees the same requests."""
    (p_lo, p_hi), (o_lo, o_hi), (t_lo, t_hi) = prompt_len_range, output_len_range, token_range
    if num_requests < 1:
        raise ValueError(f"num_requests must be >= 1, got {num_requests}")
    if not 1 <= p_lo <= p_hi or not 1 <= o_lo <= o_hi:
        raise ValueError(f"length ranges must satisfy 1 <= lo <= hi, got prompt {prompt_len_range}, "
                         f"output {output_len_range}")
    if not 0 <= t_lo < t_hi:
        raise ValueError(f"token range must satisfy 0 <= lo < hi, got {token_range}")
    rng = random.Random(seed)
    specs = []
    for _ in range(num_requests):
        prompt_len = rng.randint(p_lo, p_hi)
        max_tokens = rng.randint(o_lo, o_hi)
        specs.append(RequestSpec([rng.randrange(t_lo, t_hi) for _ in range(prompt_len)], max_tokens))
    return specs


# ------------------------------------------------------------------------------------------------ statistics
def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between order statistics (numpy's default);
    NaN for no values."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def latency_summary(seconds: Sequence[float]) -> dict[str, float]:
    """p50 / p90 / p99 / mean / max in milliseconds (NaN when empty)."""
    ms = [s * 1e3 for s in seconds]
    return {
        "p50": percentile(ms, 50),
        "p90": percentile(ms, 90),
        "p99": percentile(ms, 99),
        "mean": sum(ms) / len(ms) if ms else math.nan,
        "max": max(ms) if ms else math.nan,
        "n": len(ms),
    }


# --------------------------------------------------------------------------------------------------- results
@dataclass
class RequestResult:
    prompt_tokens: int
    max_tokens: int
    output_tokens: int = 0  # the server's usage count when it sent one, else counted from the chunks
    chunk_tokens: int = 0  # counted from the chunks
    chunks: int = 0  # chunks that carried tokens (ITL has chunks - 1 gaps)
    ttft_s: float = math.nan
    latency_s: float = math.nan
    itl_s: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None


def _chunk_tokens(choice: dict[str, Any]) -> int:
    """Tokens one streamed choice carries: explicit token ids or logprob tokens, else 1 if it has text."""
    for key in ("token_ids", "delta_token_ids"):
        ids = choice.get(key)
        if isinstance(ids, list):
            return len(ids)
    logprobs = choice.get("logprobs")
    if isinstance(logprobs, dict) and isinstance(logprobs.get("tokens"), list):
        return len(logprobs["tokens"])
    return 1 if choice.get("text") else 0


async def _one_request(client: Any, spec: RequestSpec, model: str, timeout_s: float) -> RequestResult:
    body: dict[str, Any] = {
        "prompt": spec.prompt_token_ids,
        "max_tokens": spec.max_tokens,
        "temperature": 0.0,
        "stream": True,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
        "return_token_ids": True,  # our server's extension (vLLM's name): exact token counts per chunk
        "model": model,
    }
    result = RequestResult(prompt_tokens=len(spec.prompt_token_ids), max_tokens=spec.max_tokens)
    usage_tokens: int | None = None
    start = time.perf_counter()
    last: float | None = None
    try:
        async with client.stream("POST", "/v1/completions", json=body, timeout=timeout_s) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode("utf-8", "replace").strip()
                result.error = f"HTTP {response.status_code}: {text[:200]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                now = time.perf_counter()
                chunk = json.loads(data)
                if isinstance(chunk.get("usage"), dict) and chunk["usage"].get("completion_tokens") is not None:
                    usage_tokens = int(chunk["usage"]["completion_tokens"])
                if "error" in chunk:
                    result.error = str(chunk["error"])[:200]
                    break
                for choice in chunk.get("choices") or []:
                    n = _chunk_tokens(choice)
                    if n:
                        if last is None:
                            result.ttft_s = now - start
                        else:
                            result.itl_s.append(now - last)
                        last = now
                        result.chunk_tokens += n
                        result.chunks += 1
                    if choice.get("finish_reason"):
                        result.finish_reason = choice["finish_reason"]
    except Exception as e:  # a failed request is recorded, not fatal: the report counts them
        result.error = f"{type(e).__name__}: {str(e).strip()[:200]}"
    result.latency_s = time.perf_counter() - start
    result.output_tokens = usage_tokens if usage_tokens is not None else result.chunk_tokens
    return result


# ---------------------------------------------------------------------------------------------------- metrics
_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{[^}]*\})?\s+(\S+)")


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text (`name{labels} value`) or a JSON object of numbers -> {name: value}, labels dropped
    (the last sample of a name wins)."""
    text = text.strip()
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = {}
        flat: dict[str, float] = {}

        def walk(prefix: str, obj: Any) -> None:
            if isinstance(obj, dict):
                for k, v in obj.items():
                    walk(f"{prefix}_{k}" if prefix else str(k), v)
            elif isinstance(obj, int | float) and not isinstance(obj, bool):
                flat[prefix] = float(obj)

        walk("", data)
        return flat
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line.strip())
        if m:
            try:
                out[m.group(1)] = float(m.group(2))
            except ValueError:
                continue
    return out


def metric(metrics: dict[str, float], *suffixes: str) -> float | None:
    """The value of the first metric whose name ends with one of `suffixes` (tried in order), else None."""
    for suffix in suffixes:
        for name, value in metrics.items():
            if name.endswith(suffix):
                return value
    return None


HIGH_WATER = ("blocks_high_water", "kv_blocks_high_water", "blocks_high_water_total")
BLOCKS_USED = ("blocks_used", "kv_blocks_used")
BLOCKS_TOTAL = ("blocks_total", "kv_blocks_total")
BLOCK_SIZE = ("block_size", "kv_block_size")
BLOCK_BYTES = ("block_bytes", "kv_block_bytes", "bytes_per_block")


async def read_metrics(client: Any) -> dict[str, float]:
    try:
        response = await client.get("/metrics", timeout=10.0)
    except Exception:
        return {}
    return parse_metrics(response.text) if response.status_code == 200 else {}


# ------------------------------------------------------------------------------------------------------ run
@dataclass
class LoadResult:
    concurrency: int
    num_requests: int
    duration_s: float
    requests: list[RequestResult]
    metrics_before: dict[str, float]
    metrics_after: dict[str, float]
    blocks_used_sampled_max: float | None
    client_cpu_s: float | None = None  # CPU seconds the load generator's processes spent in their timed windows
    client_workers: int = 1  # its processes

    @property
    def ok(self) -> list[RequestResult]:
        return [r for r in self.requests if r.error is None]

    def summary(self) -> dict[str, Any]:
        """What the report keeps: throughput, latency percentiles, errors, KV blocks (see `kv_blocks_peak`)."""
        ok = self.ok
        out_tokens = sum(r.output_tokens for r in ok)
        itl = [g for r in ok for g in r.itl_s]
        return {
            "system": "server",
            "concurrency": self.concurrency,
            "num_requests": self.num_requests,
            "errors": len(self.requests) - len(ok),
            "first_error": next((r.error for r in self.requests if r.error), None),
            "duration_s": self.duration_s,
            "output_tokens": out_tokens,
            "requested_output_tokens": sum(r.max_tokens for r in self.requests),
            "prompt_tokens": sum(r.prompt_tokens for r in self.requests),
            "output_tokens_per_s": out_tokens / self.duration_s if self.duration_s > 0 else math.nan,
            "client_cpu_cores": (self.client_cpu_s / self.duration_s
                                 if self.client_cpu_s is not None and self.duration_s > 0 else None),
            "client_workers": self.client_workers,
            "tokens_merged_into_earlier_chunks": sum(r.chunk_tokens - r.chunks for r in ok),
            "ttft_ms": latency_summary([r.ttft_s for r in ok if not math.isnan(r.ttft_s)]),
            "itl_ms": latency_summary(itl),
            "latency_ms": latency_summary([r.latency_s for r in ok]),
            "kv_blocks": self.kv_blocks(),
            # the server's event loop: its largest heartbeat delay over the 10 s before the run's end (ours only)
            "event_loop_lag_max_ms": _ms(metric(self.metrics_after, "event_loop_lag_seconds")),
            "per_request": [
                {"prompt_tokens": r.prompt_tokens, "max_tokens": r.max_tokens, "output_tokens": r.output_tokens,
                 "chunk_tokens": r.chunk_tokens, "chunks": r.chunks, "ttft_ms": r.ttft_s * 1e3,
                 "latency_ms": r.latency_s * 1e3, "finish_reason": r.finish_reason, "error": r.error}
                for r in self.requests
            ],
        }

    def kv_blocks(self) -> dict[str, Any]:
        """The peak number of KV blocks this run held.

        The server's high-water mark is exact but counts since the server started: when it rose during this
        run it is this run's peak; otherwise this run stayed below an earlier peak and the most blocks seen
        while polling `/metrics` during the run is used (a lower bound)."""
        before = metric(self.metrics_before, *HIGH_WATER)
        after = metric(self.metrics_after, *HIGH_WATER)
        if after is not None and (before is None or after > before):
            peak, method = after, "high_water"
        elif self.blocks_used_sampled_max is not None:
            peak, method = self.blocks_used_sampled_max, "sampled"
        else:
            peak, method = after, "high_water_cumulative" if after is not None else "unavailable"
        return {
            "peak": peak,
            "method": method,
            "high_water_before": before,
            "high_water_after": after,
            "sampled_max": self.blocks_used_sampled_max,
            "total": metric(self.metrics_after, *BLOCKS_TOTAL),
            "block_size": metric(self.metrics_after, *BLOCK_SIZE),
            "block_bytes": metric(self.metrics_after, *BLOCK_BYTES),
        }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


async def served_model_name(client: Any) -> str:
    """The first model `/v1/models` lists (requests must name one)."""
    response = await client.get("/v1/models", timeout=30.0)
    response.raise_for_status()
    data = response.json().get("data") or []
    if not data:
        raise RuntimeError("the server lists no model at /v1/models")
    return data[0]["id"]


async def _poll_blocks(client: Any, stop: asyncio.Event, interval_s: float, seen: list[float]) -> None:
    while not stop.is_set():
        used = metric(await read_metrics(client), *BLOCKS_USED)
        if used is not None:
            seen.append(used)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)


async def run_load_async(
    url: str,
    workload: Sequence[RequestSpec],
    concurrency: int,
    *,
    model: str | None = None,
    timeout_s: float = 600.0,
    poll_interval_s: float | None = 0.1,
) -> LoadResult:
    """Replays `workload` in order with at most `concurrency` requests in flight; never more than
    `len(workload)` requests, each bounded by `timeout_s`. Every `poll_interval_s` (None: never) `/metrics` is
    read for the KV blocks in use: each read is a request the server handles on the loop that streams."""
    import httpx

    base = check_loopback_url(url)
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    limits = httpx.Limits(max_connections=concurrency + 2, max_keepalive_connections=concurrency + 2)
    # trust_env=False: no proxy from the environment may see (or redirect) loopback traffic
    async with httpx.AsyncClient(base_url=base, limits=limits, trust_env=False, timeout=timeout_s) as client:
        if model is None:
            model = await served_model_name(client)
        before = await read_metrics(client)
        semaphore = asyncio.Semaphore(concurrency)

        async def bounded(spec: RequestSpec) -> RequestResult:
            async with semaphore:
                return await _one_request(client, spec, model, timeout_s)

        stop, seen = asyncio.Event(), []
        poller = asyncio.create_task(_poll_blocks(client, stop, poll_interval_s, seen)) \
            if poll_interval_s is not None else None
        start, cpu_start = time.perf_counter(), time.process_time()
        results = await asyncio.gather(*(bounded(spec) for spec in workload))
        duration, cpu = time.perf_counter() - start, time.process_time() - cpu_start  # this window only
        stop.set()
        if poller is not None:
            await poller
        after = await read_metrics(client)
    return LoadResult(concurrency, len(workload), duration, list(results), before, after, max(seen) if seen else None,
                      cpu)


def run_load(url: str, workload: Sequence[RequestSpec], concurrency: int, **kwargs: Any) -> LoadResult:
    """`run_load_async` from synchronous code (its own event loop)."""
    return asyncio.run(run_load_async(url, workload, concurrency, **kwargs))



# ------------------------------------------------------------------------------------- in a process of its own
def default_workers(concurrency: int) -> int:
    """Client processes for a concurrency, one per 16 streams (at most 8): the client must not be what the
    benchmark measures. Each streamed chunk costs a client process ~250 µs of CPU on the developer machine
    (httpx's line iterator, `json.loads`, the bookkeeping; `client_cpu_cores` in every server point), i.e. ~4k
    chunks/s per process, while a fast server sends ~8k a second at 64 streams (the 17M model on an H100)."""
    return max(1, min(8, concurrency // 16))


def run_load_in_subprocess(url: str, workload: Sequence[RequestSpec], concurrency: int, *, timeout_s: float = 600.0,
                           model: str | None = None, workers: int | None = None) -> LoadResult:
    """`run_load` in fresh Python processes (`python -m cs336_systems.serving.loadgen`), so that the client's
    work (thousands of streamed chunks a second to parse) does not take an in-process server's interpreter lock.
    With `workers` > 1 the requests are dealt round-robin to that many processes, each holding its share of
    the concurrency, all starting at the same instant; the result is their union (duration: first start to last
    end); only the first of them polls `/metrics`. The children import no torch; they get this process's
    `sys.path`."""
    import dataclasses
    import os
    import subprocess
    import sys
    import tempfile
    import time

    check_loopback_url(url)
    workers = max(1, min(workers or default_workers(concurrency), concurrency, len(workload)))
    shares = [concurrency // workers + (1 if w < concurrency % workers else 0) for w in range(workers)]
    with tempfile.TemporaryDirectory(prefix="cs336-loadgen-") as tmp:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        start_at = time.time() + 2.0 + 0.25 * workers  # after every child has imported httpx
        procs = []
        for w in range(workers):
            job, out = os.path.join(tmp, f"job{w}.json"), os.path.join(tmp, f"result{w}.json")
            part = list(workload)[w::workers]
            with open(job, "w") as f:
                json.dump({"url": url, "concurrency": shares[w], "timeout_s": timeout_s, "model": model,
                           "start_at": start_at if workers > 1 else None, "poll": w == 0,
                           "workload": [[r.prompt_token_ids, r.max_tokens] for r in part]}, f)
            procs.append((subprocess.Popen([sys.executable, "-m", "cs336_systems.serving.loadgen", job, out],
                                           env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
                          out, len(part), shares[w]))
        results = []
        for proc, out, count, share in procs:
            # bounded: every request has its own timeout; the whole child gets the sum as a last resort
            limit = 60 + timeout_s * max(1, math.ceil(count / share))
            try:
                _, stderr = proc.communicate(timeout=limit)
            except subprocess.TimeoutExpired:
                for p, *_ in procs:
                    p.kill()
                raise RuntimeError("the load generator timed out") from None
            if proc.returncode != 0:
                tail = stderr.strip().splitlines()[-1:] or ["no output"]
                raise RuntimeError(f"the load generator failed (exit {proc.returncode}): {tail[0]}")
            with open(out) as f:
                results.append(json.load(f))
    fields = {f.name for f in dataclasses.fields(LoadResult)}
    for data in results:
        data["requests"] = [RequestResult(**r) for r in data["requests"]]
    if len(results) == 1:
        return LoadResult(**{k: v for k, v in results[0].items() if k in fields})
    order = [None] * len(workload)
    for w, data in enumerate(results):
        for j, request in enumerate(data["requests"]):
            order[w + j * workers] = request
    first = min(d["started_at"] for d in results)
    last = max(d["started_at"] + d["duration_s"] for d in results)
    latest = max(results, key=lambda d: d["started_at"] + d["duration_s"])
    sampled = [d["blocks_used_sampled_max"] for d in results if d["blocks_used_sampled_max"] is not None]
    cpu = [d.get("client_cpu_s") for d in results]
    return LoadResult(concurrency, len(workload), last - first, order, results[0]["metrics_before"],
                      latest["metrics_after"], max(sampled) if sampled else None,
                      None if None in cpu else sum(cpu), workers)


def _main(argv: list[str]) -> int:
    """`python -m cs336_systems.serving.loadgen JOB.json RESULT.json` (what `run_load_in_subprocess` runs)."""
    import dataclasses

    job_path, out_path = argv
    with open(job_path) as f:
        job = json.load(f)
    import time

    workload = [RequestSpec(list(p), int(n)) for p, n in job["workload"]]
    if job.get("start_at"):
        time.sleep(max(0.0, job["start_at"] - time.time()))  # every worker fires at the same instant
    started_at = time.time()
    polling = {} if job.get("poll", True) else {"poll_interval_s": None}  # run_load_async's interval, or none
    result = run_load(job["url"], workload, int(job["concurrency"]), timeout_s=float(job["timeout_s"]),
                      model=job.get("model"), **polling)
    with open(out_path, "w") as f:
        json.dump({**dataclasses.asdict(result), "started_at": started_at}, f)
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(_main(sys.argv[1:]))
