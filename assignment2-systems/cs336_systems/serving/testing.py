"""Helpers for tests of the serving engine, ours and a user's: tiny request mixes that exercise every way a
sequence ends, a scripted stand-in for the model runner that lets a test choose the output bytes, and the
checks a token stream must pass. Nothing here is used when serving."""

import random
import time
from collections.abc import Callable

import torch

from cs336_basics.testing import one_thread  # noqa: F401 (re-exported: the serving tests import it from here)
from cs336_systems.serving.engine import EngineConfig, LLMEngine
from cs336_systems.serving.loader import ByteTokenizer
from cs336_systems.serving.model_runner import LaunchedWindow
from cs336_systems.serving.params import SamplingParams

TEXTS = ["plain ascii text, nothing special. ", "héllo wörld ", "日本語のテキスト", "emoji 😀🎉 and 👍🏽 ok",
         "mixé 中文 😀 end"]

ENGINE_VARIANTS = {
    "mha": {},
    "gqa": {"num_kv_heads": 2},
    "mqa": {"num_kv_heads": 1},
    "alibi": {"position": "alibi"},
    "sliding": {"sliding_window": 5},
    "gqa+sliding": {"num_kv_heads": 2, "sliding_window": 7},
    "mla": {"attention": "mla"},
    "mla+q_lora": {"attention": "mla", "q_lora_rank": 24},
    "moe": {"ffn": "moe"},
    "linear": {"attention": "linear", "position": "none"},
}


def random_prompts(seed: int, lengths) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]

def byte_ids(text: str) -> list[int]:
    return list(text.encode())


def random_ids(rng: random.Random, n: int) -> list[int]:
    """Bytes of real multi-byte text mixed with random (often invalid) bytes."""
    ids: list[int] = []
    while len(ids) < n:
        ids += byte_ids(rng.choice(TEXTS)) if rng.random() < 0.6 else [rng.randrange(256) for _ in range(3)]
    return ids[:n]

class ScriptedRunner:
    """Stands in for the model: each request's output tokens come from a script (prefill gives the first
    one as a one-hot logits row, decode windows the next ones, also windows launched ahead by asynchronous
    scheduling), so tests choose the bytes."""

    def __init__(self, engine: LLMEngine, scripts: dict[str, list[int]]):
        self.engine, self.scripts = engine, scripts
        self.real = engine.runner
        self.batch_seqs: list = []
        # every way a batch gets planned: the next launch (window or prefill) is of its sequences
        for name, forget_on_none in (("schedule", True), ("schedule_ahead", False),
                                     ("schedule_prefill_behind", False)):
            setattr(engine.scheduler, name, self._remembering(getattr(engine.scheduler, name), forget_on_none))

    def _remembering(self, plan, forget_on_none: bool):
        def remember():
            batch = plan()
            if batch is not None or forget_on_none:
                self.batch_seqs = [] if batch is None else list(batch.seqs)
            return batch

        return remember

    def __getattr__(self, name):
        return getattr(self.real, name)

    def _next(self, seq, k: int) -> int:
        """The script's token k places after what the host has read and what windows in flight will give."""
        script = self.scripts[seq.request.request_id]
        done = len(seq.token_ids) - seq.prompt_len + seq.num_inflight + k
        return script[done] if done < len(script) else 0

    def prefill(self, prompts, slots):
        logits = torch.full((len(prompts), self.engine.model.config.vocab_size), -1e9)
        for row, seq in enumerate(self.batch_seqs):
            logits[row, self._next(seq, 0)] = 0.0
        return logits

    def launch_prefill(self, prompts, slots, sample, overlap=False):
        return LaunchedWindow(sample(self.prefill(prompts, slots)).unsqueeze(0))

    def launch(self, last_tokens, lengths, slots, tables, sample, steps=1, feed=None, overlap=False):
        return LaunchedWindow(torch.tensor([[self._next(seq, k) for seq in self.batch_seqs] for k in range(steps)]))

    def collect(self, window):
        return window.tokens.tolist()


def check_stream(stream, tokenizer, eos: int, whole_prompt: bool = True):
    """The deltas add up to the final text and ids, and the streamed text never shows a replacement character
    that the full decode of the output does not have."""
    final = {o[0]: o for o in stream[-1]}
    for index, (_, _, _, reason, text, ids) in final.items():
        deltas = [o for chunk in stream for o in chunk if o[0] == index]
        assert "".join(o[1] for o in deltas) == text
        assert [t for o in deltas for t in o[2]] == ids
        assert reason in ("stop", "length")
        full = tokenizer.decode(ids[:-1] if reason == "stop" and ids[-1] == eos else ids)  # eos: not text
        if not whole_prompt:  # the prompt ends inside a character that the output completes
            continue
        assert text.count("\ufffd") <= full.count("\ufffd")
        if reason == "length" or ids[-1] == eos:
            assert text == full


def mixed_requests(served):
    """Greedy and seeded sampled requests with stop strings, stop tokens, eos, max_tokens inside a window and
    n > 1 whose samples end in different windows; returns them and the stop token `common`."""
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (5, 12, 3, 20, 8, 9, 14, 6)]
    greedy = [out.outputs[0].token_ids for out in LLMEngine(served, EngineConfig(device="cpu")).generate(
        prompts, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))]
    common = max(greedy[2][5:], key=greedy[2].count)  # a token request r2's greedy continuation emits late
    stop_text = ByteTokenizer().decode(greedy[3][10:12])
    params = [
        SamplingParams(max_tokens=40, temperature=0, ignore_eos=True),
        SamplingParams(max_tokens=7, temperature=0),  # ends mid-window
        SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, stop_token_ids=[common]),
        SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, stop=[stop_text]),  # per-token path
        SamplingParams(max_tokens=33, temperature=1.0, seed=11, n=3, ignore_eos=True),
        SamplingParams(max_tokens=1, temperature=0),
        SamplingParams(max_tokens=21, temperature=0.8, seed=2, stop_token_ids=[common, 101]),
        SamplingParams(max_tokens=30, temperature=1.0, top_p=0.9, seed=4, n=4, stop=["e", "a"],
                       stop_token_ids=[common]),  # samples end at different windows, siblings go on
    ]
    return [(f"r{i}", p, sp) for i, (p, sp) in enumerate(zip(prompts, params, strict=True))], common


def wait_until(condition: Callable[[], bool], timeout: float = 20.0, what: str = "condition",
               poll_s: float = 0.002) -> None:
    """Polls `condition` until it holds; an AssertionError naming `what` after `timeout` seconds (a server or a
    process that never gets there fails the test instead of hanging it)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(poll_s)
