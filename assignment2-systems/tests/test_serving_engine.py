"""The serving engine against independent references: cs336_basics' own KV-cache decoding (token for token),
a brute-force model of the block pool, and plain string search for stop sequences."""

import random

import pytest
import torch

from cs336_basics.decoding import generate
from cs336_systems.serving.block_manager import SCRATCH_BLOCK, BlockManager, OutOfBlocks
from cs336_systems.serving.detokenizer import IncrementalDetokenizer, find_stop
from cs336_systems.serving.engine import EngineConfig, LLMEngine
from cs336_systems.serving.loader import ByteTokenizer, tiny_served_model
from cs336_systems.serving.params import SamplingParams
from cs336_systems.serving.testing import (
    ENGINE_VARIANTS,
    one_thread,  # noqa: F401 (autouse: one torch thread)
    random_prompts,
)


def _engine(served, **config) -> LLMEngine:
    return LLMEngine(served, EngineConfig(device="cpu", **config))


# -- block manager ------------------------------------------------------------------------------------------


def test_block_manager_matches_a_brute_force_model_of_the_pool():
    """Random allocate/append/fork/free traffic; every table, refcount and the free count are re-derived."""
    rng = random.Random(0)
    blocks = BlockManager(num_blocks=40, block_size=4)
    lengths: dict[int, int] = {}
    next_id = 0
    for _ in range(2000):
        op = rng.random()
        try:
            if op < 0.25 or not lengths:
                n = rng.randint(1, 20)
                blocks.allocate(next_id, n)
                lengths[next_id] = n
                next_id += 1
            elif op < 0.6:
                seq = rng.choice(list(lengths))
                copy_before = [list(t) for t in blocks.tables.values()]
                slot, copy = blocks.append_slot(seq, lengths[seq] + 1)
                lengths[seq] += 1
                assert slot == blocks.slot(seq, lengths[seq] - 1)
                if copy is not None:  # the shared block was replaced in this table only
                    assert any(copy.src in t for t in copy_before)
                    assert copy.dst in blocks.tables[seq] and copy.src not in blocks.tables[seq]
            elif op < 0.75:
                parent = rng.choice(list(lengths))
                blocks.fork(parent, next_id)
                lengths[next_id] = lengths[parent]
                next_id += 1
            else:
                seq = rng.choice(list(lengths))
                blocks.free(seq)
                del lengths[seq]
        except OutOfBlocks:
            pass
        counts = [0] * 40
        for seq, table in blocks.tables.items():
            assert len(table) == -(-lengths[seq] // 4)
            for b in table:
                counts[b] += 1
        assert counts == blocks.allocator.refcount
        assert SCRATCH_BLOCK not in blocks.allocator.free_blocks and counts[SCRATCH_BLOCK] == 0
        assert blocks.num_free == sum(1 for c in counts[1:] if c == 0)
    for seq in list(lengths):
        blocks.free(seq)
    assert blocks.num_free == 39


# -- the engine against cs336_basics' own decoding ------------------------------------------------------------


@pytest.mark.parametrize("variant", sorted(ENGINE_VARIANTS))
def test_greedy_engine_equals_kv_cache_decoding_even_when_preempting(variant):
    """A pool too small for the batch forces preemption and recomputation; every output still equals
    `cs336_basics.decoding.generate` (contiguous KV cache, one prompt at a time) token for token."""
    served = tiny_served_model(**ENGINE_VARIANTS[variant])
    reference = tiny_served_model(**ENGINE_VARIANTS[variant]).model
    prompts = random_prompts(1, (3, 17, 40, 9, 1, 33))
    small_pool = {} if variant == "linear" else {"num_blocks": 20, "block_size": 4}
    engine = _engine(served, max_num_seqs=4, **small_pool)
    outputs = engine.generate(prompts, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    for prompt, out in zip(prompts, outputs, strict=True):
        assert out.outputs[0].token_ids == generate(reference, [prompt], 20, temperature=0)[0]
        assert out.outputs[0].finish_reason == "length"
    if variant not in ("linear", "sliding", "gqa+sliding"):  # windows free their old blocks: no shortage
        assert engine.scheduler.num_preemptions > 0
    assert engine.blocks.num_used == 0 and not engine.scheduler.running and not engine.scheduler.waiting


def test_prefix_sharing_for_n_samples_shares_blocks_and_copies_on_write():
    served = tiny_served_model()
    prompt = random_prompts(2, (30,))[0]  # 30 tokens in blocks of 4: the 8th block is half full and shared
    alone = _engine(served, block_size=4).generate([prompt], SamplingParams(max_tokens=6, temperature=0,
                                                                               ignore_eos=True))[0]
    engine = _engine(served, block_size=4)
    out = engine.generate([prompt], SamplingParams(max_tokens=6, temperature=0, n=4, ignore_eos=True))[0]
    assert [o.index for o in out.outputs] == [0, 1, 2, 3]
    assert all(o.token_ids == alone.outputs[0].token_ids for o in out.outputs)
    # Without sharing, 4 samples of 36 tokens hold 4 × 9 blocks; shared, the 7 full prompt blocks count once.
    assert engine.blocks.high_water == 7 + 4 * 2
    assert engine.blocks.num_used == 0


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch():
    served = tiny_served_model()
    prompt, others = random_prompts(3, (12,))[0], random_prompts(4, (5, 20, 9))
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=7, n=3, ignore_eos=True)
    alone = _engine(served).generate([prompt], params)[0]
    crowded = _engine(served).generate([*others, prompt], [SamplingParams(max_tokens=8, temperature=1.0)] * 3
                                       + [params])[-1]
    assert [o.token_ids for o in alone.outputs] == [o.token_ids for o in crowded.outputs]
    assert len({tuple(o.token_ids) for o in alone.outputs}) > 1  # the samples differ from each other


def test_stop_strings_cut_the_text_and_streamed_deltas_add_up():
    served = tiny_served_model()
    prompt = random_prompts(5, (8,))[0]
    free = _engine(served).generate([prompt], SamplingParams(max_tokens=60, temperature=0, ignore_eos=True))[0]
    text = free.outputs[0].text
    stop = text[20:23]  # a stop string the greedy continuation is known to produce
    cut = text.find(stop)
    engine = _engine(served)
    engine.add_request("r", prompt, SamplingParams(max_tokens=60, temperature=0, ignore_eos=True, stop=[stop]))
    deltas, final = [], None
    while engine.has_unfinished():
        for out in engine.step():
            deltas.append(out.outputs[0].delta_text)
            final = out
    assert final.outputs[0].text == text[:cut]
    assert "".join(deltas) == text[:cut]
    assert final.outputs[0].finish_reason == "stop"
    assert engine.blocks.num_used == 0


def test_end_of_text_stops_unless_ignored():
    served = tiny_served_model()
    prompt = random_prompts(6, (10,))[0]
    greedy = generate(tiny_served_model().model, [prompt], 30, temperature=0)[0]
    eos = greedy[5]  # pretend the 6th greedy token is the end-of-text token
    served.eos_token_ids = [eos]
    out = _engine(served).generate([prompt], SamplingParams(max_tokens=30, temperature=0))[0].outputs[0]
    assert out.token_ids == greedy[: greedy.index(eos) + 1] and out.finish_reason == "stop"
    out = _engine(served).generate([prompt], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))[0]
    assert out.outputs[0].token_ids == greedy


def test_abort_frees_every_block_at_once():
    engine = _engine(tiny_served_model(), block_size=4)
    for i, prompt in enumerate(random_prompts(7, (30, 12, 50))):
        engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=40, temperature=0, n=2, ignore_eos=True))
    for _ in range(6):
        engine.step()
    assert engine.blocks.num_used > 0
    for i in range(3):
        engine.abort(f"r{i}")
    assert engine.blocks.num_used == 0 and not engine.has_unfinished()


@pytest.mark.parametrize(
    ("prompt_len", "max_tokens", "message"),
    [(0, 4, "empty"), (128, 1, "maximum context length"), (100, 40, "plus max_tokens")],
)
def test_requests_that_cannot_fit_are_refused(prompt_len, max_tokens, message):
    engine = _engine(tiny_served_model())
    with pytest.raises(ValueError, match=message):
        engine.add_request("r", [1] * prompt_len, SamplingParams(max_tokens=max_tokens))
    small = _engine(tiny_served_model(), num_blocks=5, block_size=4)  # 4 usable blocks: 16 tokens at most
    with pytest.raises(ValueError, match="KV blocks"):
        small.add_request("r", [1] * 10, SamplingParams(max_tokens=7))


@pytest.mark.parametrize("bad", [{"max_tokens": 0}, {"temperature": -0.1}, {"top_p": 0}, {"top_p": 1.5}, {"n": 0}])
def test_sampling_params_reject_nonsense(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_incremental_detokenizer_handles_split_utf8_and_equals_full_decode():
    tokenizer = ByteTokenizer()
    text = "naïve café — 東京 🚀 done"
    ids = tokenizer.encode(text)
    detok = IncrementalDetokenizer(tokenizer.decode, [])
    pieces = [detok.push(t) for t in ids]
    assert "".join(pieces) + detok.flush() == text
    assert all("\ufffd" not in p for p in pieces)


def test_find_stop_only_looks_where_new_text_can_match():
    assert find_stop("hello world", ["o w"], 5) == 4
    assert find_stop("hello world", ["hello"], 6) is None  # entirely inside old text: already checked
    assert find_stop("abcabc", ["c", "b"], 0) == 1


def test_pool_holds_each_samples_own_keys_after_copy_on_write():
    """n = 3 sampled continuations of one prompt share its blocks, then diverge. Every sequence's keys and
    values, read back through its own block table, equal those of cs336_basics' contiguous KV cache filled
    with that sequence alone (a missing or misdirected copy-on-write would mix the samples' tokens)."""
    served = tiny_served_model(num_kv_heads=2)
    reference = tiny_served_model(num_kv_heads=2).model
    engine = _engine(served, block_size=4, decode_steps=1)
    engine.add_request("r", random_prompts(8, (10,))[0], SamplingParams(max_tokens=9, temperature=1.5, n=3, seed=3,
                                                                   ignore_eos=True))
    for _ in range(6):
        engine.step()
    seqs = engine.requests["r"].seqs
    assert len({tuple(s.token_ids) for s in seqs}) == 3
    for seq in seqs:
        cached = seq.token_ids[: seq.num_cached]
        caches = reference.new_kv_caches(1)
        reference(torch.tensor([cached]), kv_caches=caches)
        table = torch.tensor(engine.blocks.tables[seq.seq_id])
        for layer, cache in enumerate(caches):
            pools = (engine.runner.k_pools[layer], engine.runner.v_pools[layer])
            for pool, want in zip(pools, (cache.keys, cache.values), strict=True):
                got = pool[table].flatten(0, 1)[: len(cached)]  # (tokens, kv_heads, d)
                want = want[0, :, : len(cached)].transpose(0, 1)
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton paged kernel and CUDA graphs need a GPU")
@pytest.mark.parametrize("variant", ["mha", "gqa", "alibi", "sliding", "mla", "moe", "linear"])
def test_cuda_engine_with_triton_and_cuda_graphs_equals_kv_cache_decoding(variant):
    served = tiny_served_model(**ENGINE_VARIANTS[variant])
    reference = tiny_served_model(**ENGINE_VARIANTS[variant]).model.cuda()
    prompts = random_prompts(9, (3, 17, 40, 9, 1, 33, 70, 5))
    engine = LLMEngine(served, EngineConfig(device="cuda", dtype="float32", num_blocks=40, block_size=4,
                                            max_num_seqs=6))
    if variant not in ("moe",):
        assert engine.runner.graphs, "decode should run from captured CUDA graphs"
    outputs = engine.generate(prompts, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
    for prompt, out in zip(prompts, outputs, strict=True):
        assert out.outputs[0].token_ids == generate(reference, [prompt], 24, temperature=0)[0]
    assert engine.blocks.num_used == 0


def test_ids_the_tokenizer_does_not_know_become_replacement_characters():
    """A model vocabulary padded past the tokenizer's must not crash the step loop when it samples such an id."""
    tokenizer = ByteTokenizer()
    detok = IncrementalDetokenizer(tokenizer.decode, [])
    pieces = [detok.push(t) for t in (ord("a"), 5000, ord("b"))]
    assert "".join(pieces) + detok.flush() == "a\ufffdb"


def test_merged_updates_equal_the_sequence_of_updates():
    """A consumer that falls behind gets merged updates; their deltas must add up to the same text and ids."""
    from cs336_systems.serving.engine import merge_outputs

    engine = _engine(tiny_served_model())
    engine.add_request("r", random_prompts(10, (6,))[0], SamplingParams(max_tokens=12, temperature=0, n=2,
                                                                  ignore_eos=True))
    updates = []
    while engine.has_unfinished():
        updates += engine.step()
    merged = updates[0]
    for update in updates[1:]:
        merged = merge_outputs(merged, update)
    assert merged.finished
    for out in merged.outputs:
        assert out.delta_token_ids == out.token_ids and out.delta_text == out.text


def _record_launches(monkeypatch) -> list[str]:
    """The order in which the engine queues work on the device: "W" a decode window, "P" a prefill pass (with
    asynchronous scheduling and overlapped prefills, the host's steps no longer show it)."""
    launches: list[str] = []
    launch_window, launch_prefill = LLMEngine._launch, LLMEngine._launch_prefill

    def window(engine, batch, after, overlap=True):
        launches.append("W")
        return launch_window(engine, batch, after, overlap)

    def prefill(engine, batch, overlap=False):
        launches.append("P")
        return launch_prefill(engine, batch, overlap)

    monkeypatch.setattr(LLMEngine, "_launch", window)
    monkeypatch.setattr(LLMEngine, "_launch_prefill", prefill)
    return launches


SCHEDULES = [dict(async_scheduling=False), dict(async_scheduling=True, overlap_prefill=False),
             dict(async_scheduling=True, overlap_prefill=True)]


@pytest.mark.parametrize("schedule", SCHEDULES, ids=["sync", "async", "async+overlap"])
def test_prefill_waits_a_few_decode_steps_while_others_decode(schedule, monkeypatch):
    """With prefill_delay_steps=3, a prompt arriving while another sequence decodes is prefilled after three
    decode steps on the device (not dropped, not starved), and both outputs are what each prompt gives alone."""
    served = tiny_served_model()
    first, second = random_prompts(11, (5, 7))
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    engine = _engine(served, prefill_delay_steps=3, decode_steps=1, **schedule)
    engine.add_request("a", first, params)
    assert engine.scheduler.schedule().kind == "prefill"  # nothing is decoding: the first prompt goes in at once
    engine = _engine(served, prefill_delay_steps=3, decode_steps=1, **schedule)
    engine.add_request("a", first, params)
    engine.step()
    engine.add_request("b", second, params)
    launches = _record_launches(monkeypatch)
    finals = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out.outputs[0].token_ids
    assert "".join(launches).startswith("WWWP")  # three decode steps, then the prefill
    assert launches.count("P") == 1
    assert finals["a"] == generate(served.model, [first], 10, temperature=0)[0]
    assert finals["b"] == generate(served.model, [second], 10, temperature=0)[0]


@pytest.mark.parametrize("schedule", SCHEDULES, ids=["sync", "async", "async+overlap"])
def test_a_burst_of_prompts_alternates_with_decode_steps(schedule, monkeypatch):
    """Twenty prompts arriving while one sequence decodes are admitted in prefills that never follow each other
    directly on the device (each stall of the decoding stream is one prefill long), and nothing is dropped."""
    served = tiny_served_model()
    engine = _engine(served, max_num_batched_tokens=64, decode_steps=2, **schedule)
    engine.add_request("first", random_prompts(14, (5,))[0],
                       SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
    engine.step()
    for i, prompt in enumerate(random_prompts(15, [20] * 20)):
        engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    launches = _record_launches(monkeypatch)
    finished = set()
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                finished.add(out.request_id)
    assert launches.count("P") >= 7  # 64 padded tokens per prefill: at most 3 prompts of 20 at a time
    assert "PP" not in "".join(launches)
    assert finished == {"first"} | {f"r{i}" for i in range(20)}


def test_engine_process_serves_the_same_tokens_and_frees_blocks_on_abort():
    import asyncio
    import functools

    from cs336_systems.serving.engine_process import ProcessEngine

    config = EngineConfig(device="cpu", num_blocks=30, block_size=4, max_num_seqs=4)
    prompts = random_prompts(12, (3, 17, 40, 9))
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    expected = _engine(tiny_served_model(), num_blocks=30, block_size=4, max_num_seqs=4).generate(prompts, params)
    engine = ProcessEngine(functools.partial(tiny_served_model, seed=0), config)
    engine.start()
    try:
        async def one(i, prompt):
            final, text = None, ""
            async for out in engine.generate(f"r{i}", prompt, params):
                final, text = out, text + out.outputs[0].delta_text
            return final, text

        async def abandon():
            stream = engine.generate("long", prompts[2], SamplingParams(max_tokens=60, temperature=0,
                                                                        ignore_eos=True))
            await stream.__anext__()
            await stream.aclose()  # the client went away

        async def main():
            results = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
            await abandon()
            for _ in range(100):
                await asyncio.sleep(0.05)
                if engine.stats().blocks_used == 0 and engine.stats().num_running == 0:
                    break
            return results

        results = asyncio.run(main())
        for (final, text), want in zip(results, expected, strict=True):
            assert final.outputs[0].token_ids == want.outputs[0].token_ids and text == want.outputs[0].text
        assert engine.stats().blocks_used == 0
        with pytest.raises(ValueError, match="maximum context length"):
            engine.check_request([1] * 200, params)
    finally:
        engine.shutdown()


@pytest.mark.parametrize("decode_steps", [1, 3, 7])
def test_multi_step_decoding_keeps_every_output_and_stop(decode_steps):
    """Several decode steps per host round trip change nothing a client sees: greedy and seeded outputs, stop
    strings, end-of-text and max_tokens cut exactly where single-step decoding cuts them, even mid-window,
    and every block comes back."""
    served = tiny_served_model(num_kv_heads=2)
    prompts = random_prompts(13, (4, 19, 33, 8, 2))
    greedy = [generate(tiny_served_model(num_kv_heads=2).model, [p], 23, temperature=0)[0] for p in prompts]
    served.eos_token_ids = [greedy[1][9]]  # the second prompt meets end-of-text mid-window
    stop_text = ByteTokenizer().decode(greedy[2][11:13])
    params = [SamplingParams(max_tokens=23, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=23, temperature=0),
              SamplingParams(max_tokens=23, temperature=0, ignore_eos=True, stop=[stop_text]),
              SamplingParams(max_tokens=5, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=23, temperature=0.8, top_p=0.9, seed=5, n=2, ignore_eos=True)]
    single = _engine(served, decode_steps=1).generate(prompts, params)
    engine = _engine(served, decode_steps=decode_steps, num_blocks=24, block_size=4)  # tight: preempts too
    multi = engine.generate(prompts, params)
    for a, b in zip(single, multi, strict=True):
        assert [(o.token_ids, o.text, o.finish_reason) for o in a.outputs] == \
               [(o.token_ids, o.text, o.finish_reason) for o in b.outputs]
    assert single[0].outputs[0].token_ids == greedy[0]
    assert single[1].outputs[0].token_ids == greedy[1][:10] and single[1].outputs[0].finish_reason == "stop"
    assert single[3].outputs[0].token_ids == greedy[3][:5]
    assert engine.blocks.num_used == 0


def test_sliding_window_frees_blocks_the_window_has_left():
    """With a window of 6 and blocks of 4, a sequence holds a bounded number of blocks however long it grows,
    and its tokens still equal cs336_basics' ring-buffer decoding."""
    served = tiny_served_model(sliding_window=6)
    prompt = random_prompts(16, (30,))[0]
    engine = _engine(served, block_size=4, decode_steps=3)
    engine.add_request("r", prompt, SamplingParams(max_tokens=60, temperature=0, ignore_eos=True))
    held, final = [], None
    while engine.has_unfinished():
        for out in engine.step():
            final = out
        if engine.scheduler.running:
            held.append(engine.blocks.num_used)
    assert max(held) <= -(-(6 + 3) // 4) + 1 < -(-(30 + 60) // 4)  # window + one window of steps, not 23 blocks
    assert final.outputs[0].token_ids == generate(tiny_served_model(sliding_window=6).model, [prompt], 60,
                                                  temperature=0)[0]
    assert engine.blocks.num_used == 0
    # Preempted and recomputed while windows slide: six short prompts whose windows (20 tokens, 6 blocks each)
    # outgrow a pool of 19 blocks.
    served = tiny_served_model(sliding_window=20)
    prompts = random_prompts(17, (4, 6, 3, 8, 5, 7))
    engine = _engine(served, block_size=4, num_blocks=20, decode_steps=2)
    outputs = engine.generate(prompts, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
    assert engine.scheduler.num_preemptions > 0
    for prompt, out in zip(prompts, outputs, strict=True):
        assert out.outputs[0].token_ids == generate(served.model, [prompt], 40, temperature=0)[0]
