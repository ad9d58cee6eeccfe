"""`--api-workers N`: several HTTP processes on one listening socket in front of one engine process.

The engine's side (`_Hub`) is driven directly over two pipes. The benchmark's in-process server with three HTTP
processes (this one and two spawned workers; tiny random Llama from a Hugging Face folder with a chat template,
so the workers' weight-free copy carries the real HF tokenizer and renderer) is checked against a single-process
server of the same model through the official `openai` client. `cs336-systems serve --api-workers 3` runs as a
subprocess for what only a real process tree shows: a killed worker, signals, no process left behind."""

from __future__ import annotations

import asyncio
import functools
import json
import multiprocessing as mp
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace

import httpx
import openai
import psutil
import pytest

from cs336_systems import cli
from cs336_systems.serving import testing as serving_testing
from cs336_systems.serving.bench_cli import LocalServer, _server_cpu_seconds, local_server, process_cpu_seconds
from cs336_systems.serving.bench_models import write_random_llama
from cs336_systems.serving.engine import EngineConfig, LLMEngine
from cs336_systems.serving.engine_process import _child_main
from cs336_systems.serving.loader import load_hf_model, tiny_served_model
from cs336_systems.serving.params import SamplingParams
from cs336_systems.serving.testing import random_prompts

CONFIG = EngineConfig(device="cpu", block_size=8, max_num_seqs=64, cuda_graphs=False)
CHAT_TEMPLATE = ("{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
                 "{% if add_generation_prompt %}[assistant]{% endif %}")
PID_HEADER = "x-cs336-worker-pid"


# spawned workers take longer to start and stop than the in-process servers of test_serving_api
wait_until = functools.partial(serving_testing.wait_until, timeout=60.0, poll_s=0.02)


# ------------------------------------------------------------------------------------------- the engine hub
def _until_finished(conn, rid: str) -> tuple[list[int], str, tuple, dict[str, str]]:
    """One request's tokens and text from the hub's messages on `conn`, the stats sent with its end and the
    refusals that came meanwhile; another request's output on this connection fails the test."""
    ids, text, refused = [], "", {}
    while True:
        message = conn.recv()
        if message[0] == "refused":
            refused[message[1]] = message[2]
        elif message[0] == "step":
            for got, finished, deltas in message[1]:
                assert got == rid, f"{got} reached the wrong client"
                for _, delta_text, delta_ids, _ in deltas:
                    ids, text = ids + list(delta_ids), text + delta_text
                if finished:
                    return ids, text, message[2], refused


def test_the_engine_hub_keeps_each_clients_requests_apart_and_outlives_a_client():
    """Two clients use the same request id: each gets its own outputs, the same as the engine alone gives; a
    refusal goes to its sender; a client whose pipe closes mid-request has that request aborted while the
    owner's goes on; the owner's "stop" ends the engine."""
    config = EngineConfig(device="cpu", block_size=4, num_blocks=80, max_num_seqs=8)
    owner, owner_end = mp.Pipe()
    other, other_end = mp.Pipe()
    hub = threading.Thread(target=_child_main, args=(functools.partial(tiny_served_model, seed=0), config,
                                                     [owner_end, other_end]), daemon=True)
    hub.start()
    assert owner.recv()[0] == other.recv()[0] == "ready"
    prompts = random_prompts(3, (5, 9, 7))
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    expected = [out.outputs[0] for out in LLMEngine(tiny_served_model(seed=0), config).generate(prompts, params)]

    owner.send(("add", "r", prompts[0], params))
    other.send(("add", "r", prompts[1], params))
    other.send(("add", "too-long", [1] * 200, params))
    ids, text, _, refused = _until_finished(other, "r")
    assert (ids, text) == (expected[1].token_ids, expected[1].text)
    assert list(refused) == ["too-long"] and "maximum context length" in refused["too-long"]
    ids, text, _, refused = _until_finished(owner, "r")
    assert (ids, text, refused) == (expected[0].token_ids, expected[0].text, {})

    other.send(("add", "long", prompts[2], SamplingParams(max_tokens=100, temperature=0, ignore_eos=True)))
    owner.send(("add", "keep", prompts[0], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)))
    while other.recv()[0] != "step":  # "long" is running
        pass
    other.close()  # its process died
    ids, _, stats, _ = _until_finished(owner, "keep")
    assert ids[:12] == expected[0].token_ids and len(ids) == 40
    num_running, num_waiting, blocks_total, blocks_used, blocks_free = stats[:5]
    assert num_running == num_waiting == blocks_used == 0 and blocks_free == blocks_total  # "long" was aborted
    owner.send(("stop",))
    hub.join(timeout=30)
    assert not hub.is_alive()


# --------------------------------------------------------------------------------------------------- servers
@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> str:
    """A tiny random Llama whose tokenizer has a chat template (the workers render chats with it)."""
    path = tmp_path_factory.mktemp("llama") / "hf"
    write_random_llama(path, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, vocab_size=300,
                       max_position=512)
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHAT_TEMPLATE}))
    return str(path)


@pytest.fixture(scope="module")
def workers(hf_dir) -> Iterator[LocalServer]:
    """Three HTTP processes: this one (worker 0, on a thread) and two spawned ones."""
    with local_server(hf_dir, CONFIG, api_workers=3) as server:
        yield server


@pytest.fixture(scope="module")
def single(hf_dir) -> Iterator[LocalServer]:
    with local_server(hf_dir, CONFIG) as server:
        yield server


def client(server: LocalServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def metrics_of(text: str) -> dict[str, float]:
    """The cs336_serving_ samples of a /metrics body."""
    return {name.removeprefix("cs336_serving_"): float(value) for name, value in
            (line.split(" ") for line in text.splitlines() if not line.startswith("#"))}


def metrics(url: str) -> dict[str, float]:
    """/metrics over a fresh connection (so any HTTP process may answer)."""
    return metrics_of(httpx.get(url + "/metrics", timeout=30).text)


def engine_idle(url: str) -> bool:
    m = metrics(url)
    return m["num_requests_running"] == m["kv_blocks_used"] == 0 and m["kv_blocks_free"] == m["kv_blocks_total"]


def test_the_weight_free_model_the_workers_get_pickles_with_its_hf_tokenizer_and_template(hf_dir):
    served = load_hf_model(hf_dir)
    copy = pickle.loads(pickle.dumps(served.without_weights()))  # what spawn sends a worker
    messages = [{"role": "user", "content": "Hi there"}]
    assert copy.model is None and (copy.context_length, copy.vocab_size) == (512, 300)
    assert copy.apply_chat_template(messages) == served.apply_chat_template(messages) == "[user]Hi there[assistant]"
    assert copy.tokenizer.encode("héllo") == served.tokenizer.encode("héllo")
    assert (copy.name, copy.eos_token_ids) == (served.name, served.eos_token_ids)


def _everything(server: LocalServer) -> list:
    """A completion, a chat, and both streamed (greedy), through the openai client."""
    c = client(server)
    args = {"model": "hf", "max_tokens": 12, "temperature": 0, "extra_body": {"ignore_eos": True}}
    messages = [{"role": "user", "content": "Say something"}]
    done = c.completions.create(prompt="Once upon", **args)
    chat = c.chat.completions.create(messages=messages, **args)
    streamed = "".join(chunk.choices[0].text for chunk in c.completions.create(prompt="Once upon", stream=True,
                                                                              **args) if chunk.choices)
    chat_streamed = "".join(chunk.choices[0].delta.content or "" for chunk in c.chat.completions.create(
        messages=messages, stream=True, **args) if chunk.choices)
    return [done.choices[0].text, done.usage.completion_tokens, chat.choices[0].message.content,
            chat.usage.prompt_tokens, streamed, chat_streamed]


def test_completions_chat_and_streams_through_the_openai_client(workers, single):
    results = [_everything(workers) for _ in range(3)]  # fresh connections: more than one worker answers
    want = _everything(single)
    assert all(r == want for r in results) and want[1] == 12 and want[0] == want[4] and want[2] == want[5]
    assert client(workers).models.list().data[0].id == "hf"


async def _stream(c: openai.AsyncOpenAI, prompt: str) -> tuple[str, str | None, int, int]:
    """(text, finish_reason, completion tokens, the serving process's id) of one greedy stream."""
    raw = await c.completions.with_raw_response.create(
        model="hf", prompt=prompt, max_tokens=16, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    text, finish, tokens = "", None, -1
    async for chunk in raw.parse():
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        for choice in chunk.choices:
            text, finish = text + choice.text, choice.finish_reason or finish
    return text, finish, tokens, int(raw.headers[PID_HEADER])


def test_32_concurrent_streams_over_several_workers_each_equal_the_request_served_alone(workers, single):
    prompts = [f"request {i}: " + "ab" * (i % 5) for i in range(32)]

    async def together() -> list:
        clients = [openai.AsyncOpenAI(base_url=workers.url + "/v1", api_key="unused", max_retries=0, timeout=120)
                   for _ in range(4)]
        try:
            return await asyncio.gather(*(_stream(clients[i % 4], p) for i, p in enumerate(prompts)))
        finally:
            await asyncio.gather(*(c.close() for c in clients))

    async def alone() -> list:
        async with openai.AsyncOpenAI(base_url=single.url + "/v1", api_key="unused", max_retries=0,
                                      timeout=120) as c:
            return [await _stream(c, p) for p in prompts]

    got, want = asyncio.run(together()), asyncio.run(alone())
    assert [r[:3] for r in got] == [r[:3] for r in want]
    assert all(finish == "length" and tokens == 16 for _, finish, tokens, _ in got)
    pids = {pid for *_, pid in got}
    assert len(pids) >= 2 and pids <= {os.getpid(), *workers.worker_pids}, pids
    wait_until(lambda: engine_idle(workers.url), what="the engine to go idle")


def test_a_client_leaving_a_workers_stream_frees_its_blocks(workers):
    """The stream is one a spawned worker serves: its abort crosses that worker's own pipe to the engine."""
    body = {"model": "hf", "prompt": "Tell me everything", "max_tokens": 480, "temperature": 0,
            "ignore_eos": True, "stream": True}
    for _ in range(50):
        with httpx.Client(base_url=workers.url, timeout=60) as http, http.stream("POST", "/v1/completions",
                                                                                 json=body) as response:
            if int(response.headers[PID_HEADER]) == os.getpid():  # worker 0, this process: try again
                continue
            lines = response.iter_lines()
            for _ in range(3):
                next(line for line in lines if line.startswith("data: "))
            assert metrics(workers.url)["kv_blocks_used"] > 0
            break
    else:
        pytest.fail("no spawned worker took any of 50 connections")
    # leaving the block with the body unread closes the connection
    wait_until(lambda: engine_idle(workers.url), what="the aborted request's blocks to be freed")
    m = metrics(workers.url)
    assert m["generation_tokens_total"] > 0 and m["kv_blocks_total"] == workers.engine.stats().blocks_total


def test_metrics_from_every_worker_report_the_engines_stats(workers):
    """Each HTTP process's /metrics shows the engine's gauges and counters (stats reach every client); only the
    event loop's lag is the answering process's own."""
    c = client(workers)
    c.completions.create(model="hf", prompt="count me", max_tokens=5, temperature=0)
    wait_until(lambda: engine_idle(workers.url), what="the engine to go idle")
    time.sleep(0.6)  # an idle engine refreshes every client's stats this often
    seen: dict[int, dict[str, float]] = {}
    for _ in range(50):
        response = httpx.get(workers.url + "/metrics", timeout=30)  # a fresh connection each time
        seen[int(response.headers[PID_HEADER])] = metrics_of(response.text)
        if len(seen) == 3:
            break
    assert len(seen) >= 2, seen.keys()
    engine_side = [{k: v for k, v in m.items() if k not in ("event_loop_lag_seconds",
                                                            "generation_tokens_per_second")} for m in seen.values()]
    assert all(m == engine_side[0] for m in engine_side) and engine_side[0]["generation_tokens_total"] >= 5


def test_the_benchmarks_cpu_count_sums_every_http_process():
    own = SimpleNamespace(pid=os.getpid())
    alone = _server_cpu_seconds(LocalServer("", own, []))
    twice = _server_cpu_seconds(LocalServer("", own, [os.getpid()]))  # this process counted as a worker too
    assert twice["http_process"] == pytest.approx(2 * alone["http_process"], abs=0.05)
    assert alone["engine_process"] == pytest.approx(process_cpu_seconds(os.getpid()), abs=0.05)


# ------------------------------------------------------------------------------------------ `serve` processes
def _serve(hf_dir: str, workers: int, log) -> tuple[subprocess.Popen, str]:
    """`cs336-systems serve --api-workers N` as a process of its own, once it answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "cs336_systems", "serve", "--hf-model", hf_dir, "--device", "cpu",
                             "--port", str(port), "--api-workers", str(workers), "--log-level", "warning"],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert proc.poll() is None, "serve exited"
        try:
            return httpx.get(url + "/health", timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    wait_until(up, timeout=180, what="serve to answer")
    return proc, url


def _gone(processes: list[psutil.Process]) -> bool:
    return not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in processes)


def test_serve_outlives_a_killed_worker_and_sigterm_leaves_no_process(hf_dir, tmp_path):
    """A worker killed mid-stream: the engine aborts its request (blocks back to free) and the other two go on
    serving. SIGTERM then stops the workers and the engine, and the command exits 143 with none left."""
    with open(tmp_path / "serve.log", "w") as log:
        proc, url = _serve(hf_dir, 3, log)
        try:
            children = psutil.Process(proc.pid).children(recursive=True)  # the engine, two workers, mp's tracker
            body = {"model": "hf", "prompt": "Go on", "max_tokens": 480, "temperature": 0, "ignore_eos": True,
                    "stream": True}
            for _ in range(50):
                with httpx.Client(base_url=url, timeout=60) as http, http.stream("POST", "/v1/completions",
                                                                                 json=body) as response:
                    victim = int(response.headers[PID_HEADER])
                    if victim == proc.pid:  # worker 0 (the parent): try again
                        continue
                    lines = response.iter_lines()
                    next(line for line in lines if line.startswith("data: "))
                    os.kill(victim, signal.SIGKILL)
                    with pytest.raises(httpx.TransportError):  # the stream breaks off
                        for _ in lines:
                            pass
                    break
            else:
                pytest.fail("no spawned worker took any of 50 connections")
            wait_until(lambda: engine_idle(url), what="the dead worker's request to be aborted")
            served_by = set()
            for i in range(12):
                r = httpx.post(url + "/v1/completions", json={"model": "hf", "prompt": f"still {i}", "max_tokens": 4},
                               timeout=60)
                assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
                served_by.add(int(r.headers[PID_HEADER]))
            assert victim not in served_by
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 128 + signal.SIGTERM
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    wait_until(lambda: _gone(children), timeout=30, what="every child process to end")
    assert "Traceback" not in (tmp_path / "serve.log").read_text()


def test_serve_stops_its_workers_on_sigint_too(hf_dir, tmp_path):
    with open(tmp_path / "serve.log", "w") as log:
        proc, _ = _serve(hf_dir, 2, log)
        children = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130  # the CLI's code for an interrupt
    wait_until(lambda: _gone(children), timeout=30, what="every child process to end")


@pytest.mark.parametrize("command", ["serve", "bench-serve"])
@pytest.mark.parametrize("value", ["0", "65"])
def test_api_workers_outside_1_to_64_is_one_line(command, value, tmp_path, capsys):
    assert cli.main([command, "--run-dir", str(tmp_path), "--api-workers", value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"cs336-systems: error: --api-workers must be >= 1 and <= 64, got {value}"]


def test_serve_with_workers_still_refuses_a_port_in_use(tmp_path, capsys):
    """The owner's socket takes SO_REUSEPORT for its workers; a port another socket holds is still refused."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert cli.main(["serve", "--run-dir", str(tmp_path), "--port", str(port), "--api-workers", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"cs336-systems: error: cannot listen on 127.0.0.1:{port}")
