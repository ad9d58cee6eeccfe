"""Asynchronous scheduling (`EngineConfig.async_scheduling`) against the synchronous engine: the next decode window
is planned and launched before the host reads the one in flight, yet every streamed chunk, token id, text,
finish reason and count must be the synchronous path's, for greedy and seeded sampling, n > 1, stop strings,
stop tokens, end-of-text, max_tokens inside a window, requests joining and leaving between windows, aborts and
preemption; no KV block may leak and no sequence may run more than one window past its end."""

import asyncio
import random
from dataclasses import replace

import pytest
import torch

from cs336_basics.cli_support import UserError
from cs336_basics.decoding import generate
from cs336_systems.serving.engine import AsyncLLMEngine, EngineConfig, LLMEngine
from cs336_systems.serving.loader import tiny_served_model
from cs336_systems.serving.params import SamplingParams
from cs336_systems.serving.testing import (
    ENGINE_VARIANTS,
    ScriptedRunner,
    byte_ids,
    check_stream,
    mixed_requests,
    one_thread,  # noqa: F401 (autouse: one torch thread)
    random_ids,
    random_prompts,
)


class Recorder:
    """Wraps the engine's window launches: decode slots launched per sequence, and the sequences of each
    launched window by step number."""

    def __init__(self, engine: LLMEngine):
        self.engine, self.step_no = engine, 0
        self.launched: dict[int, int] = {}
        self.windows: list[tuple[int, list]] = []
        self.finished_at: dict[int, int] = {}
        launch = engine._launch  # both schedules launch every decode window here

        def record(batch, *args, **kwargs):
            self._note(batch)
            return launch(batch, *args, **kwargs)

        engine._launch = record

    def _note(self, batch) -> None:
        for seq, slots in zip(batch.seqs, batch.slots, strict=True):
            assert not seq.finished
            self.launched[seq.seq_id] = self.launched.get(seq.seq_id, 0) + len(slots)
        self.windows.append((self.step_no, list(batch.seqs)))

    def after_step(self) -> None:
        for request in self.engine.requests.values():
            for seq in request.seqs:
                if seq.finished:
                    self.finished_at.setdefault(seq.seq_id, self.step_no)
        self.step_no += 1


def _stream(served, requests, *, async_scheduling: bool, scripts=None, window_text: bool = True, joins=None,
            aborts=None, check_waste: bool = True, **config):
    """Every RequestOutput of every step, per request: [(index, delta_text, delta_ids, finish_reason, text, ids)].
    `joins`: {step number: [requests added before that step]}; `aborts`: {step number: [request ids]}."""
    engine = LLMEngine(served, EngineConfig(device="cpu", async_scheduling=async_scheduling, **config))
    engine.window_text = window_text
    if scripts is not None:
        engine.runner = ScriptedRunner(engine, scripts)
    recorder = Recorder(engine)
    joins, aborts = dict(joins or {}), dict(aborts or {})
    everything = list(requests) + [r for later in joins.values() for r in later]
    streams: dict[str, list] = {rid: [] for rid, _, _ in everything}
    seqs_of = {}
    for rid, prompt, params in requests:
        seqs_of[rid] = engine.add_request(rid, prompt, params)
    step = 0
    while engine.has_unfinished() or joins:
        for rid, prompt, params in joins.pop(step, []):
            seqs_of[rid] = engine.add_request(rid, prompt, params)
        for rid in aborts.pop(step, []):
            engine.abort(rid)
            for seq in seqs_of[rid].seqs:  # ended before this step: no window of this step may carry it
                recorder.finished_at.setdefault(seq.seq_id, recorder.step_no - 1)
        for out in engine.step():
            streams[out.request_id].append(
                [(o.index, o.delta_text, o.delta_token_ids, o.finish_reason, o.text, o.token_ids)
                 for o in out.outputs])
            if out.finished:  # `requests` no longer lists it: note its sequences' end here
                for seq in seqs_of[out.request_id].seqs:
                    recorder.finished_at.setdefault(seq.seq_id, recorder.step_no)
        recorder.after_step()
        step += 1
        assert step < 10_000
    assert engine.blocks.num_used == 0 and engine.blocks.num_free == engine.blocks.allocator.capacity
    assert not engine.scheduler.running and not engine.scheduler.waiting
    steps = engine.config.decode_steps
    for request in seqs_of.values():
        for seq in request.seqs:
            # No window is launched for a sequence after the step in which the host saw it end...
            assert all(seq not in seqs for at, seqs in recorder.windows if at > recorder.finished_at[seq.seq_id])
            if not check_waste or seq.finish_reason == "abort":
                continue
            # ... and at most one window past the one it ended in: its decode slots are its kept tokens
            # (the first one came from the prefill) plus the rest of the window it stopped in, plus one window.
            kept = len(seq.output_ids) - 1
            waste = recorder.launched.get(seq.seq_id, 0) - kept
            assert 0 <= waste <= (2 * steps - 1 if async_scheduling else steps - 1)
            if seq.finish_reason == "length":
                assert waste == 0  # never planned beyond max_tokens
    return streams, engine.generation_tokens_total


def _both(served, requests, **kwargs):
    """The synchronous engine's streams, which the asynchronous one's must equal, also with prefills queued
    behind the window in flight (`overlap_prefill`)."""
    sync = _stream(served, requests, async_scheduling=False, **kwargs)
    overlapped = _stream(served, requests, async_scheduling=True, overlap_prefill=False, **kwargs)
    assert overlapped == sync
    behind = _stream(served, requests, async_scheduling=True, overlap_prefill=True, **kwargs)
    assert behind == sync
    return sync[0]


@pytest.mark.parametrize("window_text", [True, False])
@pytest.mark.parametrize("steps", [1, 3, 4])
def test_async_streams_equal_the_synchronous_engine_tiny_model(steps, window_text):
    """A real tiny model, greedy and seeded sampling: with and without stop strings and stop tokens, max_tokens
    ending inside a window, n > 1 (seeded samples ending in different windows): every step's outputs equal."""
    served = tiny_served_model(seed=3)
    requests, common = mixed_requests(served)
    streams = _both(served, requests, window_text=window_text, decode_steps=steps)
    for stream in streams.values():
        check_stream(stream, served.tokenizer, 256)
    assert streams["r2"][-1][0][3] == "stop" and streams["r2"][-1][0][5][-1] == common
    assert streams["r1"][-1][0][3] == "length" and len(streams["r1"][-1][0][5]) == 7
    assert streams["r3"][-1][0][3] == "stop"  # its stop string was met
    final = {o[0]: o for o in streams["r7"][-1]}
    assert len({len(o[5]) for o in final.values()}) > 1  # the samples ended at different points


def test_async_final_outputs_equal_generate_and_seeded_samples_repeat():
    served = tiny_served_model(seed=3)
    requests, _ = mixed_requests(served)
    prompts, params = [p for _, p, _ in requests], [sp for _, _, sp in requests]
    sync = LLMEngine(served, EngineConfig(device="cpu")).generate(prompts, params)
    engine = LLMEngine(served, EngineConfig(device="cpu", async_scheduling=True))
    for _ in range(2):  # twice on one engine: a leftover discarded window must not disturb the next run
        overlapped = engine.generate(prompts, params)
        for a, b in zip(sync, overlapped, strict=True):
            assert [(o.text, o.token_ids, o.finish_reason) for o in a.outputs] == \
                [(o.text, o.token_ids, o.finish_reason) for o in b.outputs]
        assert engine.blocks.num_used == 0


@pytest.mark.parametrize("steps", [2, 3, 4, 5])
def test_async_scripted_multibyte_text_eos_and_max_tokens_inside_windows(steps):
    """Scripted bytes (characters split over tokens and windows, invalid bytes, end-of-text inside a window,
    max_tokens inside a character), both text paths: every step's outputs equal the synchronous engine's."""
    served = tiny_served_model(seed=0)
    eos = 256
    scripts = {
        "cjk": byte_ids("日本語のテキスト、中文也可以。"),
        "emoji": [*byte_ids("ok 😀🎉👍🏽 fine"), eos, 65, 66],
        "cut": byte_ids("ab😀cd"),
        "invalid": [0xE4, 65, 0xB8, 0xAD, 0xFF, 66, *byte_ids("中"), 0xF0, 0x9F],
        "eos-first": [eos, 65],
        "eos-second": [70, eos, 65, 66, 67, 68, 69],
        "stop-token": [*byte_ids("hello"), 7, *byte_ids("world")],
        "stop-string": byte_ids("one, two; three. four"),
    }
    rng = random.Random(steps)
    for i in range(4):
        scripts[f"random{i}"] = random_ids(rng, 40)
    limits = {"cut": 4, "invalid": 10}
    extra = {"stop-token": {"stop_token_ids": [7]}, "stop-string": {"stop": ["; t"]}}
    requests = [(rid, [65 + i], SamplingParams(max_tokens=limits.get(rid, len(ids)), temperature=0,
                                               ignore_eos=rid.startswith("random"), **extra.get(rid, {})))
                for i, (rid, ids) in enumerate(scripts.items())]
    for window_text in (True, False):
        streams = _both(served, requests, scripts=scripts, window_text=window_text, decode_steps=steps)
        for stream in streams.values():
            check_stream(stream, served.tokenizer, eos)
        final = {rid: stream[-1][0] for rid, stream in streams.items()}
        assert final["emoji"][4] == "ok 😀🎉👍🏽 fine" and final["emoji"][3] == "stop"
        assert final["eos-second"][5] == [70, eos]
        assert final["stop-token"][4] == "hello" and final["stop-token"][5][-1] == 7
        assert final["stop-string"][4] == "one, two" and final["stop-string"][3] == "stop"
        assert final["cut"][4] == "ab\ufffd" and final["cut"][3] == "length"


def test_async_requests_joining_and_leaving_between_windows():
    """Requests arrive at different steps (some while a window is in flight, some due for a prefill at once)
    and others are aborted mid-flight. Each request's stream equals the synchronous engine's, chunk for chunk;
    an aborted one's is a prefix of what it would have streamed (where the abort falls in its stream depends
    on the step cadence: with asynchronous scheduling a due prefill first waits for the window in flight).
    Every block comes back."""
    served = tiny_served_model(seed=3)
    requests, _ = mixed_requests(served)
    first, later = requests[:4], requests[4:]
    more = [(f"late{i}", p, SamplingParams(max_tokens=25, temperature=0, ignore_eos=True))
            for i, p in enumerate(random_prompts(9, (4, 30, 11, 2, 17, 6, 9, 13, 5)))]
    joins = {3: later[:2], 4: more[:3], 9: later[2:], 10: more[3:4], 15: more[4:8], 27: more[8:]}
    aborts = {5: ["late0"], 8: ["r0"], 12: ["r4", "late3"], 16: ["late5"]}
    aborted = {rid for rids in aborts.values() for rid in rids}
    for steps in (1, 4):
        for delay in (0, 4):
            config = dict(decode_steps=steps, prefill_delay_steps=delay)
            whole = _both(served, first, joins=joins, **config)
            for async_scheduling, overlap in ((False, False), (True, False), (True, True)):
                streams, _ = _stream(served, first, joins=joins, aborts=aborts, async_scheduling=async_scheduling,
                                     overlap_prefill=overlap, **config)
                for rid, stream in streams.items():
                    if rid not in aborted:
                        assert stream == whole[rid]
                    elif stream:  # aborted after its prefill: what it got is what it would have got so far
                        # (or all of it: with prefills behind the window a request can end before its abort)
                        assert stream == whole[rid][: len(stream)]
                        assert stream[-1][0][3] is None or (overlap and stream == whole[rid])


def _count_prefill_launches(monkeypatch) -> list[bool]:
    """Each prefill launch's `overlap` (True: queued behind a window in flight), appended as they happen."""
    launches = []
    original = LLMEngine._launch_prefill

    def counting(engine, batch, overlap=False):
        launches.append(overlap)
        return original(engine, batch, overlap)

    monkeypatch.setattr(LLMEngine, "_launch_prefill", counting)
    return launches

def test_prefills_queued_behind_the_window_in_flight_happen_and_change_no_stream(monkeypatch):
    """Requests arriving while others decode: with `overlap_prefill` their prefills are launched behind the
    window in flight (counted here, so that the equality below is not vacuous), the step's outputs merge the
    window's and the prefill's, and every request's stream equals the synchronous engine's."""
    served = tiny_served_model(seed=3)
    requests, _ = mixed_requests(served)
    joins = {2: requests[4:6], 5: requests[6:], 6: [("x", random_prompts(4, (9,))[0],
                                                    SamplingParams(max_tokens=12, temperature=0))]}
    sync, _ = _stream(served, requests[:4], joins=joins, async_scheduling=False, decode_steps=2)
    behind = _count_prefill_launches(monkeypatch)
    overlapped, _ = _stream(served, requests[:4], joins=joins, async_scheduling=True, overlap_prefill=True,
                            decode_steps=2)
    assert overlapped == sync
    assert behind.count(True) >= 2  # the joins at steps 2, 5 and 6 arrive while windows are in flight


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned uploads and events need a GPU")
def test_prefills_behind_the_window_on_cuda_give_the_synchronous_outputs(monkeypatch):
    """On the GPU the prefill queued behind the window uploads from pinned memory and its tokens come back behind
    an event: greedy outputs of requests joining mid-stream equal the synchronous engine's."""
    prompts = random_prompts(5, (7, 30, 2, 19, 11, 4, 25, 9))
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    behind = _count_prefill_launches(monkeypatch)

    def run(**config):
        engine = LLMEngine(tiny_served_model(seed=3), EngineConfig(device="cuda", dtype="float32", **config))
        for i, prompt in enumerate(prompts[:3]):
            engine.add_request(f"r{i}", prompt, params)
        finals, step = {}, 0
        while engine.has_unfinished() or step < 6:
            if 2 <= step < 2 + len(prompts) - 3:  # one arrival per step while the first ones decode
                engine.add_request(f"r{step + 1}", prompts[step + 1], params)
            for out in engine.step():
                if out.finished:
                    finals[out.request_id] = out.outputs[0].token_ids
            step += 1
        assert engine.blocks.num_used == 0
        return finals

    overlapped = run(async_scheduling=True, overlap_prefill=True)
    assert True in behind  # some prefill did go behind a window in flight
    assert overlapped == run(async_scheduling=False)

@pytest.mark.parametrize("variant", sorted(ENGINE_VARIANTS))
def test_async_greedy_equals_kv_cache_decoding_under_a_tiny_pool(variant):
    """Every attention variant (paged KV, sliding windows that free blocks, MLA, MoE, linear attention's paged
    states) with a pool too small for the batch, so that windows planned ahead run short of blocks and the
    engine falls back to the host's schedule, which preempts: outputs equal `cs336_basics` decoding and the
    synchronous engine's, stops and all, and every block comes back."""
    served = tiny_served_model(**ENGINE_VARIANTS[variant])
    reference = tiny_served_model(**ENGINE_VARIANTS[variant]).model
    prompts = random_prompts(1, (3, 17, 40, 9, 1, 33))
    small_pool = {} if variant == "linear" else {"num_blocks": 20, "block_size": 4}
    config = dict(max_num_seqs=4, **small_pool)
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    engine = LLMEngine(served, EngineConfig(device="cpu", async_scheduling=True, **config))
    outputs = engine.generate(prompts, params)
    for prompt, out in zip(prompts, outputs, strict=True):
        assert out.outputs[0].token_ids == generate(reference, [prompt], 20, temperature=0)[0]
    if variant not in ("linear", "sliding", "gqa+sliding"):
        assert engine.scheduler.num_preemptions > 0
    assert engine.blocks.num_used == 0
    # Stops in the middle of windows (eos and a stop token), under the same pool: the same text as synchronous.
    stops = [SamplingParams(max_tokens=20, temperature=0, stop_token_ids=[o.outputs[0].token_ids[j]])
             for j, o in zip((5, 2, 9, 13, 7, 3), outputs, strict=True)]
    requests = [(f"s{i}", p, sp) for i, (p, sp) in enumerate(zip(prompts, stops, strict=True))]
    sync, _ = _stream(served, requests, async_scheduling=False, check_waste=False, **config)
    final = lambda streams: {rid: [(o[3], o[4], o[5]) for o in s[-1]] for rid, s in streams.items()}
    for overlap in (False, True):
        overlapped, _ = _stream(served, requests, async_scheduling=True, overlap_prefill=overlap,
                                check_waste=False, **config)
        assert final(overlapped) == final(sync)
        assert all(s[-1][0][3] == "stop" for s in overlapped.values())


def test_async_preemption_streams_under_a_tiny_pool_equal_the_synchronous_engine():
    """Preemption (the fallback to the host's schedule) keeps the streams step for step, with n > 1 samples
    sharing prompt blocks and seeded sampling."""
    served = tiny_served_model(seed=1)
    prompts = random_prompts(7, (3, 17, 30, 9, 1, 25, 12))
    params = [SamplingParams(max_tokens=24, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=18, temperature=0.9, seed=3, n=2, ignore_eos=True),
              SamplingParams(max_tokens=24, temperature=0),
              SamplingParams(max_tokens=20, temperature=1.0, seed=5, stop=["e"]),
              SamplingParams(max_tokens=13, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=22, temperature=0.7, seed=8, n=3, ignore_eos=True),
              SamplingParams(max_tokens=9, temperature=0, ignore_eos=True)]
    requests = [(f"p{i}", p, sp) for i, (p, sp) in enumerate(zip(prompts, params, strict=True))]
    for steps in (2, 4):
        engine = LLMEngine(served, EngineConfig(device="cpu", num_blocks=24, block_size=4, max_num_seqs=6,
                                                decode_steps=steps, async_scheduling=True))
        engine.generate(prompts, params)
        assert engine.scheduler.num_preemptions > 0 and engine.blocks.num_used == 0
        _both(served, requests, check_waste=False, num_blocks=24, block_size=4, max_num_seqs=6, decode_steps=steps)


def test_abort_with_windows_in_flight_frees_every_block_and_the_engine_goes_on():
    served = tiny_served_model(seed=2)
    prompts = random_prompts(3, (5, 9, 14, 3))
    params = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)
    engine = LLMEngine(served, EngineConfig(device="cpu", block_size=4, async_scheduling=True))
    for i, prompt in enumerate(prompts):
        engine.add_request(f"a{i}", prompt, params)
    for _ in range(4):
        engine.step()
    assert engine._in_flight is not None and engine.blocks.num_used > 0
    for i in range(len(prompts)):
        engine.abort(f"a{i}")
    assert engine.blocks.num_free == engine.blocks.allocator.capacity and not engine.has_unfinished()
    assert engine.step() == [] and engine._in_flight is None  # the abandoned window is dropped unread
    alone = LLMEngine(served, EngineConfig(device="cpu", block_size=4)).generate(prompts[:2], params)
    again = engine.generate(prompts[:2], params)
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in alone]
    assert engine.blocks.num_used == 0


def test_async_llm_engine_streams_and_client_aborts_with_async_scheduling():
    """The server's engine thread with async scheduling: concurrent streams equal the synchronous engine's
    outputs and a client that leaves mid-stream gets its blocks freed."""
    served = tiny_served_model(seed=0)
    prompts = random_prompts(11, (4, 19, 7, 2, 12))
    params = SamplingParams(max_tokens=17, temperature=0.8, seed=9, n=2, stop_token_ids=[3, 4, 5])
    expected = LLMEngine(served, EngineConfig(device="cpu")).generate(prompts, params)
    engine = AsyncLLMEngine.from_served(tiny_served_model(seed=0), EngineConfig(device="cpu",
                                                                                async_scheduling=True))
    engine.start()
    try:
        async def one(i, prompt):
            final, texts = None, ["", ""]
            async for out in engine.generate(f"r{i}", prompt, params):
                final = out
                for o in out.outputs:
                    texts[o.index] += o.delta_text
            return final, texts

        async def abandon():
            stream = engine.generate("long", prompts[1], SamplingParams(max_tokens=100, temperature=0,
                                                                        ignore_eos=True))
            await stream.__anext__()
            await stream.aclose()

        async def main():
            results = await asyncio.gather(abandon(), *(one(i, p) for i, p in enumerate(prompts)))
            for _ in range(200):
                await asyncio.sleep(0.01)
                stats = engine.stats()
                if stats.blocks_used == 0 and stats.num_running == 0:
                    break
            return results[1:]

        results = asyncio.run(main())
        for (final, texts), want in zip(results, expected, strict=True):
            assert [(o.text, o.token_ids, o.finish_reason) for o in final.outputs] == \
                [(o.text, o.token_ids, o.finish_reason) for o in want.outputs]
            assert texts == [o.text for o in want.outputs]
        assert engine.stats().blocks_used == 0
    finally:
        engine.shutdown()


def test_serve_and_bench_serve_take_the_flag():
    import argparse

    from cs336_systems.serving import bench_cli, serve_cli

    for module in (serve_cli, bench_cli):
        parser = argparse.ArgumentParser()
        module.add_arguments(parser)
        assert parser.parse_args(["--async-scheduling"]).async_scheduling is True
        assert parser.parse_args([]).async_scheduling is True  # the default since the H100 measurement
        assert parser.parse_args(["--no-async-scheduling"]).async_scheduling is False
    parser = argparse.ArgumentParser()
    bench_cli.add_arguments(parser)
    for flags, want in ((["--async-scheduling"], True), (["--no-async-scheduling"], False), ([], True)):
        args = parser.parse_args([*flags, "--concurrency", "2"])
        assert bench_cli.engine_config_from(args).async_scheduling is want
    args = parser.parse_args(["--overlap-prefill", "--concurrency", "2"])
    assert bench_cli.engine_config_from(args).overlap_prefill is True
    # by default it follows asynchronous scheduling (measured: +28% for the 17M model's engine, same outputs)
    served = tiny_served_model()
    for flags, want in (([], True), (["--no-async-scheduling"], False), (["--no-overlap-prefill"], False)):
        config = bench_cli.engine_config_from(parser.parse_args([*flags, "--concurrency", "2"]))
        assert LLMEngine(served, replace(config, device="cpu")).overlap_prefill is want
    with pytest.raises(UserError, match="needs async_scheduling"):  # it would do nothing: refused, not ignored
        bench_cli.engine_config_from(parser.parse_args(["--overlap-prefill", "--no-async-scheduling"]))
