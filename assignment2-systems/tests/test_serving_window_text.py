"""The engine's window-level text path (a decode window's tokens and text per sequence at once) against its
token-by-token path: the same streamed chunks, token ids, finish reasons and counts, step for step, also when a
multi-byte character is split over tokens and over windows."""

import random

import pytest

from cs336_systems.serving.block_manager import BlockManager
from cs336_systems.serving.detokenizer import IncrementalDetokenizer
from cs336_systems.serving.engine import EngineConfig, LLMEngine
from cs336_systems.serving.loader import ByteTokenizer, tiny_served_model
from cs336_systems.serving.params import SamplingParams
from cs336_systems.serving.testing import (
    TEXTS,
    ScriptedRunner,
    byte_ids,
    check_stream,
    mixed_requests,
    one_thread,  # noqa: F401 (autouse: one torch thread)
    random_ids,
)


def _window_push(detok: IncrementalDetokenizer, decode, new: list[int]) -> str:
    """What `LLMEngine._take_windows` does for one sequence."""
    detok.ids.extend(new)
    before, now = (decode(w) for w in detok.windows())
    if len(new) > 1 and before.endswith("\ufffd"):
        del detok.ids[-len(new) :]
        return "".join(map(detok.push, new))
    added = detok.advance(before, now)
    if not added and len(new) > 1:
        shorter = [decode(w) for w in detok.step_windows(len(new))]
        added = detok.advance_steps(before, [*shorter, now])
    return added


def _check_detokenizer(decode, encode_texts, rng, trials=300):
    for _ in range(trials):
        prompt = random_ids(rng, rng.randint(1, 6))
        out = encode_texts(rng)
        one, window = IncrementalDetokenizer(decode, prompt), IncrementalDetokenizer(decode, prompt)
        at = 0
        while at < len(out):
            n = rng.randint(1, 5)
            new = out[at : at + n]
            by_token = "".join(one.push(t) for t in new)
            assert _window_push(window, decode, new) == by_token
            assert window.ids == one.ids  # (prefix, read) may differ: both read from where a character starts
            at += n
        assert window.flush() == one.flush()


def test_window_text_equals_token_by_token_text_byte_tokenizer():
    tok = ByteTokenizer()
    _check_detokenizer(tok.decode, lambda rng: random_ids(rng, rng.randint(1, 40)), random.Random(0))


def test_window_text_equals_token_by_token_text_hf_byte_level_bpe(tmp_path):
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    from cs336_systems.serving.bench_models import write_tokenizer
    from cs336_systems.serving.loader import HFTokenizer

    write_tokenizer(tmp_path, 2048, 512)
    tok = HFTokenizer(AutoTokenizer.from_pretrained(tmp_path, local_files_only=True))
    rng = random.Random(1)
    # Real text through the BPE (multi-byte characters split over tokens), and random ids (two-byte tokens
    # whose second byte is any byte: most windows end inside a character).
    encode = lambda rng: (tok.encode("".join(rng.choice(TEXTS) for _ in range(3))) if rng.random() < 0.5
                          else [rng.randrange(2047) for _ in range(rng.randint(1, 30))])
    _check_detokenizer(tok.decode, encode, rng)


def test_slots_in_place_equals_append_slot():
    rng = random.Random(2)
    for _ in range(300):
        blocks = BlockManager(num_blocks=64, block_size=rng.choice([1, 2, 4, 16]))
        length = rng.randint(1, 60)
        blocks.allocate(1, length)
        if rng.random() < 0.3:
            blocks.fork(1, 2)  # shared blocks: never in place
        if rng.random() < 0.5:
            blocks.append_slot(1, length + 1)  # sometimes a block allocated ahead
            length += 1
        count = rng.randint(1, 8)
        fast = blocks.slots_in_place(1, length + 1, count)
        before = ([list(t) for t in blocks.tables.values()], list(blocks.allocator.refcount))
        if fast is not None:
            assert ([list(t) for t in blocks.tables.values()], list(blocks.allocator.refcount)) == before
            slow = []
            for step in range(count):
                slot, copy = blocks.append_slot(1, length + 1 + step)
                assert copy is None
                slow.append(slot)
            assert fast == slow and blocks.allocator.refcount == before[1]
            assert [list(t) for t in blocks.tables.values()] == before[0]


# -- the engine -------------------------------------------------------------------------------------------


def _stream(served, requests, window_text: bool, scripts=None, **config):
    """Every RequestOutput of every step, per request: [(delta_text, delta_ids, finish_reason, text, ids)]."""
    engine = LLMEngine(served, EngineConfig(device="cpu", **config))
    engine.window_text = window_text
    if scripts is not None:
        engine.runner = ScriptedRunner(engine, scripts)
    for rid, prompt, params in requests:
        engine.add_request(rid, prompt, params)
    streams: dict[str, list] = {rid: [] for rid, _, _ in requests}
    while engine.has_unfinished():
        for out in engine.step():
            streams[out.request_id].append(
                [(o.index, o.delta_text, o.delta_token_ids, o.finish_reason, o.text, o.token_ids)
                 for o in out.outputs])
    assert engine.blocks.num_used == 0
    return streams, engine.generation_tokens_total


def test_engine_window_path_streams_exactly_the_token_by_token_path_tiny_model():
    """A real (random, tiny) model, greedy and sampled: with and without stop strings and stop tokens,
    max_tokens ending inside a window, n > 1; every step's output is the same on both paths."""
    served = tiny_served_model(seed=3)
    requests, common = mixed_requests(served)
    for steps in (1, 3, 4):
        window, kept_w = _stream(served, requests, True, decode_steps=steps)
        token, kept_t = _stream(served, requests, False, decode_steps=steps)
        assert window == token and kept_w == kept_t
        for stream in window.values():
            check_stream(stream, served.tokenizer, 256)
        assert window["r2"][-1][0][3] == "stop" and window["r2"][-1][0][5][-1] == common
        assert window["r1"][-1][0][3] == "length" and len(window["r1"][-1][0][5]) == 7
    final = LLMEngine(served, EngineConfig(device="cpu")).generate([p for _, p, _ in requests],
                                                                 [sp for _, _, sp in requests])
    for (rid, _, _), out in zip(requests, final, strict=True):
        streamed = {o[0]: o for o in window[rid][-1]}
        for o in out.outputs:
            assert (o.text, o.token_ids, o.finish_reason) == (*streamed[o.index][4:6], streamed[o.index][3])


@pytest.mark.parametrize("steps", [2, 3, 4, 5])
def test_engine_window_path_multibyte_characters_split_over_tokens_and_windows(steps):
    """Scripted bytes of CJK, accented letters and emoji (2-4 bytes each, split over tokens and windows),
    invalid bytes, an end-of-text inside a window, max_tokens inside a character: every step's output is
    the same on both paths and no chunk shows a replacement character that the full text does not have."""
    served = tiny_served_model(seed=0)
    eos = 256
    scripts = {
        "cjk": byte_ids("日本語のテキスト、中文也可以。"),
        "emoji": [*byte_ids("ok 😀🎉👍🏽 fine"), eos, 65, 66],
        "mixed": byte_ids("héllo wörld ñ ü"),
        "cut": byte_ids("ab😀cd"),  # max_tokens 4 ends inside the emoji: its bytes become U+FFFD
        "invalid": [0xE4, 65, 0xB8, 0xAD, 0xFF, 66, *byte_ids("中"), 0xF0, 0x9F],
        "eos-first": [eos, 65],
        "split-prompt": [0xAD, 0xE4, 0xB8, 0xAD, 0x80, *byte_ids("ab中cd")],  # the prompt ends inside "中"
        "split-prompt-2": [*byte_ids("é中"), 0xE4],
    }
    prompts = {"split-prompt": [120, 0xE4, 0xB8], "split-prompt-2": [0xF0, 0x9F, 0x98]}
    rng = random.Random(steps)
    for i in range(6):
        scripts[f"random{i}"] = random_ids(rng, 40)
    limits = {"cut": 4, "invalid": 10}
    requests = [(rid, prompts.get(rid, [65 + i]), SamplingParams(max_tokens=limits.get(rid, len(ids)), temperature=0,
                                                ignore_eos=rid.startswith("random")))
                for i, (rid, ids) in enumerate(scripts.items())]
    window, kept_w = _stream(served, requests, True, scripts, decode_steps=steps)
    token, kept_t = _stream(served, requests, False, scripts, decode_steps=steps)
    assert window == token and kept_w == kept_t
    for rid, stream in window.items():
        check_stream(stream, served.tokenizer, eos, rid not in prompts)
    final = {rid: stream[-1][0] for rid, stream in window.items()}
    assert final["cjk"][4] == "日本語のテキスト、中文也可以。" and final["cjk"][3] == "length"
    assert final["emoji"][4] == "ok 😀🎉👍🏽 fine" and final["emoji"][3] == "stop"
    assert final["emoji"][5][-1] == eos
    assert final["cut"][4] == "ab\ufffd" and final["cut"][3] == "length"
    assert final["eos-first"][4] == "" and final["eos-first"][5] == [eos]
    # Chunks hold whole characters: no delta of a valid text ever contains U+FFFD.
    for rid in ("cjk", "emoji", "mixed"):
        assert all("\ufffd" not in o[1] for chunk in window[rid] for o in chunk)
