"""The serving benchmark: workload, statistics, loopback guard, metrics parsing, baselines, report, and the whole
`benchmarks/serving.py --tiny` path (real server in-process, load generator, both baselines, JSON, figure) on CPU.

Checks relations between the numbers (token counts equal the requested lengths, percentiles ordered, KV bytes
= blocks x block bytes), never the numbers themselves."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from cs336_basics.cli_support import UserError
from cs336_systems.serving import baselines as bl
from cs336_systems.serving import bench_cli, loadgen, report
from cs336_systems.serving.bench_models import kv_bytes_per_token, synthetic_bpe, write_random_llama
from cs336_systems.serving.loadgen import RequestSpec, make_workload

SYSTEMS = {"server", "engine", "hf", "nonpaged"}


# ------------------------------------------------------------------------------------------------- workload
def test_workload_is_seeded_within_ranges_and_prefix_stable():
    a = make_workload(20, (3, 9), (2, 5), seed=7)
    assert a == make_workload(20, (3, 9), (2, 5), seed=7)
    assert a != make_workload(20, (3, 9), (2, 5), seed=8)
    assert make_workload(5, (3, 9), (2, 5), seed=7) == a[:5]  # every concurrency level sees the same requests
    assert all(3 <= len(r.prompt_token_ids) <= 9 and 2 <= r.max_tokens <= 5 for r in a)
    assert all(0 <= t < 256 for r in a for t in r.prompt_token_ids)
    assert {len(r.prompt_token_ids) for r in a} != {3}  # mixed lengths
    for bad in [dict(num_requests=0), dict(prompt_len_range=(5, 4)), dict(output_len_range=(0, 3))]:
        kwargs = dict(num_requests=3, prompt_len_range=(1, 4), output_len_range=(1, 4), seed=0) | bad
        with pytest.raises(ValueError):
            make_workload(**kwargs)


def test_percentiles_match_numpy_and_summary_is_ordered():
    rng = np.random.default_rng(0)
    xs = rng.exponential(size=101).tolist()
    for q in (0, 50, 90, 99, 100):
        assert loadgen.percentile(xs, q) == pytest.approx(np.percentile(xs, q))
    s = loadgen.latency_summary(xs)
    assert s["p50"] <= s["p90"] <= s["p99"] <= s["max"] and s["n"] == 101
    assert math.isnan(loadgen.latency_summary([])["p99"])


# ------------------------------------------------------------------------------------------------ loopback
@pytest.mark.parametrize("url", ["http://127.0.0.1:8000", "http://localhost:1/", "http://[::1]:80", "http://127.9.0.1"])
def test_loopback_urls_pass(url):
    assert loadgen.check_loopback_url(url) == url.rstrip("/")


@pytest.mark.parametrize("url", ["http://10.0.0.1:8000", "http://192.168.1.5", "http://example.com", "http://0.0.0.0:80",
                                 "ftp://127.0.0.1", "127.0.0.1:8000", "http://localhost.evil.com"])
def test_non_loopback_urls_are_refused_before_any_traffic(url):
    with pytest.raises(loadgen.LoopbackOnlyError, match="loopback"):
        loadgen.check_loopback_url(url)
    with pytest.raises(loadgen.LoopbackOnlyError):
        loadgen.run_load(url, [RequestSpec([1, 2], 2)], 1)
    args = _cli_args(["--url", url])
    with pytest.raises(UserError, match="loopback"):
        bench_cli.check_settings(args)


# ------------------------------------------------------------------------------------------------ metrics
PROM = """# HELP cs336_serving_kv_blocks_used KV cache blocks held by sequences now.
# TYPE cs336_serving_kv_blocks_used gauge
cs336_serving_kv_blocks_used 3
cs336_serving_kv_blocks_high_water{engine="0"} 12
cs336_serving_kv_blocks_total 64
cs336_serving_kv_block_size 16
cs336_serving_generation_tokens_per_second 1.5e3
"""


def test_prometheus_metrics_parse_and_kv_peak_rules():
    m = loadgen.parse_metrics(PROM)
    assert m["cs336_serving_kv_blocks_high_water"] == 12 and m["cs336_serving_generation_tokens_per_second"] == 1500
    assert loadgen.metric(m, *loadgen.BLOCK_SIZE) == 16 and loadgen.metric(m, "nothing") is None
    assert loadgen.parse_metrics('{"kv": {"blocks_used": 4}}') == {"kv_blocks_used": 4.0}

    def kv(before, after, sampled):
        r = loadgen.LoadResult(1, 0, 1.0, [], {"kv_blocks_high_water": before} if before is not None else {},
                               {"kv_blocks_high_water": after}, sampled)
        return r.kv_blocks()

    assert kv(3, 9, 5)["peak"] == 9 and kv(3, 9, 5)["method"] == "high_water"  # rose during the run: exact
    assert kv(9, 9, 5)["peak"] == 5 and kv(9, 9, 5)["method"] == "sampled"  # an earlier run set the mark
    assert kv(None, 9, None)["peak"] == 9


# ------------------------------------------------------------------------------------------------ baselines
def test_static_batches_and_contiguous_reservation():
    wl = [RequestSpec([1] * p, o) for p, o in [(3, 4), (5, 2), (2, 9), (4, 1), (1, 1)]]
    batches = bl.static_batches(wl, 2)
    assert [len(b) for b in batches] == [2, 2, 1] and [r for b in batches for r in b] == wl
    assert bl.contiguous_kv_bytes(batches[0], 10) == 2 * (5 + 4) * 10
    assert bl.contiguous_kv_bytes(batches[1], 10) == 2 * (4 + 9) * 10


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama") / "hf"
    return write_random_llama(path, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, vocab_size=300,
                              max_position=128)


def test_baselines_produce_each_requests_own_tokens(tiny_llama):
    torch.manual_seed(0)
    wl = make_workload(5, (2, 9), (1, 6), seed=3)
    hf = bl.load_hf_causal_lm(tiny_llama["hf_dir"], "cpu", torch.float32)
    ours = bl.load_ours(tiny_llama["hf_dir"], "cpu", torch.float32)
    bpt = kv_bytes_per_token(tiny_llama["hf_dir"], 4)
    assert bpt == ours.new_kv_caches(1, max_len=1).bytes_per_token  # config.json and our cache agree
    for result in [bl.run_hf_generate(hf, wl, 2, pad_token_id=tiny_llama["eos_token_id"], bytes_per_token=bpt),
                   bl.run_nonpaged(ours, wl, 2)]:
        assert result["output_tokens"] == sum(r.max_tokens for r in wl) == result["requested_output_tokens"]
        assert result["rows_short_of_requested"] == 0
        padded = sum(len(b) * max(r.max_tokens for r in b) for b in bl.static_batches(wl, 2))
        assert result["generated_tokens"] == padded >= result["output_tokens"]  # static batches decode padding
        assert result["itl_ms"]["n"] == sum(r.max_tokens - 1 for r in wl) and result["ttft_ms"]["n"] == len(wl)
        assert result["kv"]["contiguous_bytes_max"] == max(bl.contiguous_kv_bytes(b, bpt)
                                                           for b in bl.static_batches(wl, 2))
        assert result["output_tokens_per_s"] > 0


def test_engine_offline_is_a_closed_loop_of_concurrency_clients(tiny_llama):
    """At most `concurrency` sequences run at any step, every request gets exactly its tokens (greedy, the same
    as the engine's own `generate`), TTFT counts from each request's closed-loop arrival, and the scheduler's
    limit is restored afterwards."""
    from cs336_systems.serving.engine import EngineConfig
    from cs336_systems.serving.params import SamplingParams

    wl = make_workload(7, (2, 9), (1, 6), seed=4)
    engine = bl.load_engine(tiny_llama["hf_dir"], EngineConfig(max_num_seqs=8, device="cpu", decode_steps=2))
    running: list[int] = []
    tokens: dict[int, list[int]] = {}
    step = engine.step

    def counting_step():
        outputs = step()
        running.append(len(engine.scheduler.running) + sum(o.finished for o in outputs))
        tokens.update({int(o.request_id.split("-")[1]): o.outputs[0].token_ids for o in outputs if o.finished})
        return outputs

    engine.step = counting_step
    result = bl.run_engine_offline(engine, wl, 3)
    assert max(running) == 3 and engine.scheduler.max_num_seqs == 8
    steps = result["steps"]  # every prompt token prefilled once (no preemption here); each later token decoded
    assert steps["prefill"]["rows"] == sum(len(r.prompt_token_ids) for r in wl) and steps["prefill"]["passes"] >= 3
    assert steps["decode"]["rows"] >= sum(r.max_tokens - 1 for r in wl)
    assert all(steps[k]["seconds"] > 0 for k in ("prefill", "decode"))
    assert result["output_tokens"] == result["requested_output_tokens"] == sum(r.max_tokens for r in wl)
    assert result["ttft_ms"]["n"] == len(wl) and result["ttft_ms"]["p50"] > 0
    assert sum(-(-(r.max_tokens - 1) // 2) for r in wl) <= result["itl_ms"]["n"] <= sum(r.max_tokens - 1 for r in wl)
    engine.step = step
    alone = engine.generate([r.prompt_token_ids for r in wl],
                            [SamplingParams(max_tokens=r.max_tokens, temperature=0.0, ignore_eos=True) for r in wl])
    assert [o.outputs[0].token_ids for o in alone] == [tokens[i] for i in range(len(wl))]
    assert [len(tokens[i]) for i in range(len(wl))] == [r.max_tokens for r in wl]


def test_synthetic_tokenizer_fills_the_vocabulary_and_decodes_every_id(tmp_path):
    vocab, merges = synthetic_bpe(300)
    assert len(vocab) == 299 and len(merges) == 43  # + <|endoftext|> = 300 ids
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(write_random_llama(tmp_path / "m", hidden_size=16, num_layers=1, num_heads=2,
                                                           intermediate_size=32, vocab_size=300,
                                                           max_position=64)["hf_dir"])
    assert len(tok) == 300 and tok.eos_token_id == 299
    assert tok.convert_ids_to_tokens(298) is not None
    with pytest.raises(ValueError):
        synthetic_bpe(100)


# ------------------------------------------------------------------------------------------------- report
def test_report_renders_points_and_skips(tmp_path):
    point = {"concurrency": 4, "num_requests": 8, "output_tokens_per_s": 100.0, "ttft_ms": {"p50": 1, "p99": 2},
             "itl_ms": {"p50": 0.5, "p99": 0.9}, "kv_used_bytes": 2**20, "kv_contiguous_bytes": 3 * 2**20,
             "status": "ok"}
    results = {"env": {"gpu": "test"}, "workload": {"seed": 0}, "models": [{"name": "m", "info": {"parameters": 1e6},
               "points": [{**point, "system": "server"}, {**point, "system": "hf", "kv_used_bytes": None},
                          {"system": "nonpaged", "concurrency": 4, "num_requests": 8,
                           "status": "skipped: time budget"}]}]}
    md = report.markdown(results)
    assert "| 4 | ours: continuous batching, paged KV | 8 | 100 |" in md and "skipped: time budget" in md
    assert report.figure(results, tmp_path / "f.png") and (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"
    assert not report.figure({"models": []}, tmp_path / "g.png")


# -------------------------------------------------------------------------------------------------- the CLI
def _cli_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    bench_cli.add_arguments(p)
    return p.parse_args(argv)


@pytest.mark.parametrize("argv, match", [
    ([], "nothing to serve"),
    (["--preset", "quickstart", "--hf-model", "."], "one of"),
    (["--preset", "nope"], "choose from"),
    (["--preset", "quickstart", "--prompt-len-range", "9", "3"], "MIN must not exceed MAX"),
    (["--preset", "quickstart", "--concurrency", "0"], ">= 1"),
    (["--preset", "quickstart", "--concurrency", "1", "2", "--num-requests", "1", "2", "3"], "one per"),
    (["--preset", "quickstart", "--baselines", "hf,vllm"], "unknown vllm"),
    (["--hf-model", "/no/such/dir"], "no such folder"),
    (["--run-dir", ".", "--context-length", "9"], "--preset only"),
    pytest.param(["--preset", "quickstart", "--prefill-cpp-wrapper"], "is for a compiled prefill",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the prefill compiles")),
    pytest.param(["--preset", "quickstart", "--prefill-cuda-graphs"], "needs a CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the graphs are captured")),
])
def test_cli_refuses_bad_settings_in_one_line(argv, match):
    with pytest.raises(UserError, match=match):
        bench_cli.check_settings(_cli_args(argv))


def test_requests_per_level_defaults_to_two_rounds():
    assert bench_cli.requests_per_level([1, 8, 64], None) == [8, 16, 128]
    assert bench_cli.requests_per_level([1, 8], [5]) == [5, 5]
    assert bench_cli.requests_per_level([1, 8], [5, 6]) == [5, 6]


def test_cli_runs_a_preset_and_writes_its_outputs(tmp_path):
    args = _cli_args(["--preset", "quickstart", "--context-length", "128", "--concurrency", "2", "--num-requests",
                      "3", "--prompt-len-range", "2", "10", "--output-len-range", "2", "5", "--baselines", "nonpaged",
                      "--out-json", str(tmp_path / "r.json"), "--out-md", str(tmp_path / "r.md"),
                      "--fig", str(tmp_path / "r.png")])
    assert bench_cli.run(args) == 0
    results = json.loads((tmp_path / "r.json").read_text())
    (model,) = results["models"]
    assert {p["system"] for p in model["points"]} == {"server", "nonpaged"}
    assert all(p["status"] == "ok" and p["output_tokens"] == p["requested_output_tokens"] for p in model["points"])
    assert 0 < model["info"]["server_startup_s"] < 600 and "engine_startup_s" not in model["info"]  # no engine row
    assert (tmp_path / "r.md").is_file() and (tmp_path / "r.png").is_file()


# -------------------------------------------------------------------------------------------- end to end
def _ordered(s: dict) -> bool:
    return s["p50"] <= s["p90"] <= s["p99"] <= s["max"]


def test_tiny_benchmark_end_to_end(tmp_path):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "serving.py"
    spec = importlib.util.spec_from_file_location("serving_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    try:
        assert module.main(["--tiny", "--out-dir", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    results = json.loads((tmp_path / "serving_tiny.json").read_text())
    assert (tmp_path / "serving_tiny.png").read_bytes()[:4] == b"\x89PNG"
    md = (tmp_path / "serving_tiny.md").read_text()
    wl = results["workload"]
    assert len(results["models"]) == 2
    for model in results["models"]:
        assert model["name"] in md
        points = model["points"]
        assert {(p["system"], p["concurrency"]) for p in points} == {(s, c) for s in SYSTEMS for c in wl["concurrency"]}
        bpt = model["info"]["kv_bytes_per_token"]
        for p in points:
            assert p["status"] == "ok" and p["errors"] == 0, p.get("status")
            specs = make_workload(p["num_requests"], tuple(wl["prompt_len_range"]), tuple(wl["output_len_range"]),
                                  wl["seed"])
            assert p["num_requests"] == wl["num_requests"][str(p["concurrency"])]
            assert p["output_tokens"] == p["requested_output_tokens"] == sum(r.max_tokens for r in specs)
            assert p["output_tokens_per_s"] > 0 and p["duration_s"] > 0
            assert _ordered(p["ttft_ms"]) and _ordered(p["itl_ms"])
            if p["system"] == "server":  # a lagging client gets merged updates: one gap per chunk
                assert p["itl_ms"]["n"] == sum(r["chunks"] - 1 for r in p["per_request"])
            elif p["system"] == "engine":  # one gap per step that hands a request tokens: 1..decode_steps each
                k = p["decode_steps"]
                assert sum(-(-(r.max_tokens - 1) // k) for r in specs) <= p["itl_ms"]["n"] <= sum(
                    r.max_tokens - 1 for r in specs)
                assert p["ttft_ms"]["n"] == len(specs)
            else:
                assert p["itl_ms"]["n"] == sum(r.max_tokens - 1 for r in specs)
            contiguous = max(bl.contiguous_kv_bytes(b, bpt) for b in bl.static_batches(specs, p["concurrency"]))
            assert p["kv_contiguous_bytes"] == contiguous
            if p["system"] == "engine":  # the pool's peak holds at least the largest sequence
                largest = max(len(s.prompt_token_ids) + s.max_tokens for s in specs)
                assert p["kv_used_bytes"] == p["kv_blocks_high_water"] * p["kv"]["block_bytes"]
                assert p["kv_blocks_high_water"] >= math.ceil((largest - 1) / (p["kv"]["block_bytes"] // bpt))
            if p["system"] != "server":
                continue
            for r, s in zip(p["per_request"], specs, strict=True):
                assert r["output_tokens"] == r["chunk_tokens"] == r["max_tokens"] == s.max_tokens >= r["chunks"] >= 1
                assert r["prompt_tokens"] == len(s.prompt_token_ids) and r["finish_reason"] == "length"
                assert 0 < r["ttft_ms"] <= r["latency_ms"]
            assert 0 <= p["event_loop_lag_max_ms"] < 10_000  # read from our server's /metrics after the level
            # each process's busy cores over the level: the engine and the client worked, none beyond the machine
            cores = p["cpu_cores"]
            assert set(cores) == {"http_process", "engine_process", "load_generator"}
            assert all(0 < busy <= os.cpu_count() + 0.5 for busy in cores.values()), cores
            stalls = p["loop_stalls"]  # read from our server's /debug/loop_stalls for this level
            assert stalls["samples"] == sum(g["count"] for g in stalls["stacks"]) or len(stalls["stacks"]) == 5
            kv = p["kv_blocks"]
            assert kv["method"] == "high_water" and 0 < kv["peak"] <= kv["total"]
            assert kv["block_bytes"] == kv["block_size"] * bpt
            assert p["kv_used_bytes"] == kv["peak"] * kv["block_bytes"]
            # every sequence of the level fits in its blocks: the peak holds at least the largest one
            largest = max(len(s.prompt_token_ids) + s.max_tokens for s in specs)
            assert kv["peak"] >= math.ceil((largest - 1) / kv["block_size"])


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="reads Linux's /proc")
def test_process_cpu_seconds_reads_what_the_process_itself_counts():
    """Another process's CPU time from /proc against that process's own `time.process_time()`: a child spins
    for 0.4 s of CPU, reports its count, then waits (so it is still there to be read)."""
    import subprocess
    import sys

    from cs336_systems.serving.bench_cli import process_cpu_seconds

    child = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\n"
        "while time.process_time() < 0.4: pass\n"
        "print(time.process_time(), flush=True)\n"
        "sys.stdin.read()\n")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        own = float(child.stdout.readline())
        seen = process_cpu_seconds(child.pid)
    finally:
        child.communicate("", timeout=30)
    assert own >= 0.4 and seen is not None
    assert abs(seen - own) <= 0.05  # /proc counts in clock ticks (10 ms), plus the interpreter's exit-free tail
    assert process_cpu_seconds(2**22 + 12345) is None  # no such process


def test_load_split_over_worker_processes_keeps_every_request_in_order(tiny_llama):
    """Two client processes share the concurrency: every request comes back, in workload order, with exactly
    the tokens it asked for, and the union's duration covers each worker's requests."""
    from cs336_systems.serving.bench_cli import local_server
    from cs336_systems.serving.engine import EngineConfig

    wl = make_workload(6, (2, 9), (3, 7), seed=4)
    with local_server(tiny_llama["hf_dir"], EngineConfig(device="cpu", max_num_seqs=4)) as server:
        result = loadgen.run_load_in_subprocess(server.url, wl, 4, workers=2, timeout_s=120)
    assert len(result.requests) == len(wl) and all(r.error is None for r in result.requests)
    assert [(r.prompt_tokens, r.max_tokens) for r in result.requests] == \
           [(len(w.prompt_token_ids), w.max_tokens) for w in wl]
    assert [r.output_tokens for r in result.requests] == [w.max_tokens for w in wl]
    assert result.duration_s >= max(r.latency_s for r in result.requests) > 0
    assert result.client_workers == 2 and result.client_cpu_s > 0  # both workers' own CPU counts, summed


def test_the_load_generator_reads_metrics_only_as_often_as_asked(tiny_llama, monkeypatch):
    """`/metrics` is a request the server serves on the loop that streams: with polling off the generator reads
    it exactly twice (before and after the level), with polling on also during the level."""
    from cs336_systems.serving import api
    from cs336_systems.serving.bench_cli import local_server
    from cs336_systems.serving.engine import EngineConfig

    reads = []
    original = api._Server.metrics_text
    monkeypatch.setattr(api._Server, "metrics_text", lambda self: reads.append(1) or original(self))
    wl = make_workload(6, (2, 9), (8, 12), seed=5)
    with local_server(tiny_llama["hf_dir"], EngineConfig(device="cpu", max_num_seqs=4)) as server:
        quiet = loadgen.run_load(server.url, wl, 4, timeout_s=120, poll_interval_s=None)
        quiet_reads = len(reads)
        polled = loadgen.run_load(server.url, wl, 4, timeout_s=120, poll_interval_s=0.001)
    assert all(r.error is None for r in quiet.requests + polled.requests)
    assert quiet_reads == 2 and quiet.blocks_used_sampled_max is None
    assert len(reads) - quiet_reads > 2 and polled.blocks_used_sampled_max is not None


def test_gpu_profile_script_runs_on_cpu_and_the_compiled_steps_dispatch_fewer_calls(tmp_path):
    """`benchmarks/serving_gpu_profile.py --tiny`: both parts measured and written; the compiled prefill pass
    and decode window dispatch far fewer aten calls from the host than the eager ones (the point of compiling)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "serving_gpu_profile.py"
    spec = importlib.util.spec_from_file_location("serving_gpu_profile", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    results = {}
    try:
        for flags in ([], ["--compile-prefill", "--compile-decode"]):
            out = tmp_path / f"profile{len(flags)}.json"
            assert module.main(["--tiny", *flags, "--out", str(out)]) == 0
            results[bool(flags)] = json.loads(out.read_text())
    finally:
        torch.set_num_threads(threads)
    eager, compiled = results[False], results[True]
    assert not eager["prefill"]["compiled"] and compiled["prefill"]["compiled"]
    assert not eager["decode"]["compiled"] and compiled["decode"]["compiled"]
    assert compiled["decode"]["aten_calls_per_pass"] < eager["decode"]["aten_calls_per_pass"] / 2
    for r in (eager, compiled):
        assert r["prefill"]["wall_ms_per_pass"] > 0 and r["decode"]["wall_ms_per_window"] > 0
        assert r["decode"]["sequences"] == 4 and r["prefill"]["aten_calls_per_pass"] > 0
    assert compiled["prefill"]["aten_calls_per_pass"] < eager["prefill"]["aten_calls_per_pass"] / 2
    with pytest.raises(SystemExit):
        module.main(["--tiny", "--windows", "0", "--out", str(tmp_path / "bad.json")])
