import sys
import types

import pytest
import torch

from cs336_alignment.generation import NativeBackend, SamplingParams, make_backend
from cs336_alignment.generation.vllm_backend import VLLMBackend
from cs336_alignment.lm import BasicsCausalLM
from cs336_alignment.testing import hf_tokenizer, tiny_basics_lm, tiny_gpt2, tiny_llama

PROMPTS = ["Question 7: what is", "The quick brown fox jumps over the lazy", "a", "<think> reasoning"]


def _greedy_by_full_recomputation(model, ids, steps, eos):
    """No cache, no batching, no padding: the whole sequence through the model for every new token."""
    ids = list(ids)
    new = []
    for _ in range(steps):
        logits = model(torch.tensor([ids])).logits[0, -1]
        token = int(logits.argmax())
        if token == eos:
            break
        new.append(token)
        ids.append(token)
    return new


@pytest.mark.parametrize("family", ["hf_llama", "hf_gpt2", "cs336_basics"])
def test_cached_batched_greedy_equals_full_recomputation(family):
    tokenizer = hf_tokenizer()
    if family == "hf_llama":
        model = tiny_llama(len(tokenizer), seed=3)  # float32: transformers' float64 padding masks give NaN
    elif family == "hf_gpt2":
        model = tiny_gpt2(len(tokenizer), seed=3)
    else:
        model = BasicsCausalLM(tiny_basics_lm(len(tokenizer), seed=3)).double()
    backend = NativeBackend(model, tokenizer, batch_size=3)  # 4 prompts: a full batch and a batch of one
    completions = backend.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=12))
    assert [c.prompt_index for c in completions] == [0, 1, 2, 3]
    for c in completions:
        with torch.no_grad():
            expected = _greedy_by_full_recomputation(model, tokenizer.encode(PROMPTS[c.prompt_index]), 12,
                                                     tokenizer.eos_token_id)
        assert c.token_ids == expected
        assert c.finish_reason == ("length" if len(expected) == 12 else "stop")
        assert c.text == tokenizer.decode(expected)


def test_bare_basics_lm_is_accepted_and_context_limits_the_budget():
    tokenizer = hf_tokenizer()
    lm = tiny_basics_lm(len(tokenizer), context_length=16)
    prompt = "Question 7: what is"
    out = NativeBackend(lm, tokenizer).generate([prompt], SamplingParams(temperature=0, max_tokens=100))[0]
    assert len(tokenizer.encode(prompt)) + len(out.token_ids) <= 16
    assert out.finish_reason in ("length", "stop")


class _Scripted(torch.nn.Module):
    """A fake LM that always prefers the token after the last one (mod vocab), except EOS is top at step 0."""

    def __init__(self, vocab, eos):
        super().__init__()
        self.vocab, self.eos = vocab, eos
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.config = types.SimpleNamespace(max_position_embeddings=1000)

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=True):
        logits = torch.full((*input_ids.shape, self.vocab), -10.0)
        nxt = (input_ids + 1) % self.vocab
        logits.scatter_(-1, nxt[..., None], 5.0)
        logits[..., self.eos] = 10.0 if past_key_values is None else -10.0
        return types.SimpleNamespace(logits=logits, past_key_values="cache")


def test_min_tokens_blocks_eos_and_stop_strings_cut_text():
    tokenizer = hf_tokenizer()
    model = _Scripted(len(tokenizer), tokenizer.eos_token_id)
    backend = NativeBackend(model, tokenizer)
    first = backend.generate(["a"], SamplingParams(temperature=0, max_tokens=5))[0]
    assert first.token_ids == [] and first.finish_reason == "stop"  # EOS straight away
    forced = backend.generate(["a"], SamplingParams(temperature=0, max_tokens=5, min_tokens=3))[0]
    start = tokenizer.encode("a")[-1]
    assert forced.token_ids == [start + k for k in range(1, 6)] and forced.finish_reason == "length"
    full_text = tokenizer.decode(forced.token_ids)
    stop = full_text[2:4]
    cut = backend.generate(["a"], SamplingParams(temperature=0, max_tokens=5, min_tokens=1, stop=(stop,)))[0]
    assert cut.finish_reason == "stop" and cut.text == full_text[: full_text.find(stop)]
    kept = backend.generate(["a"], SamplingParams(temperature=0, max_tokens=5, min_tokens=1, stop=(stop,),
                                                  include_stop_str_in_output=True))[0]
    assert kept.text == full_text[: full_text.find(stop) + len(stop)]


def test_sampling_is_seeded_and_n_is_prompt_major():
    tokenizer = hf_tokenizer()
    backend = NativeBackend(tiny_llama(len(tokenizer), seed=4), tokenizer, batch_size=4)
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=6, n=3, seed=11)
    a, b = backend.generate(PROMPTS[:2], params), backend.generate(PROMPTS[:2], params)
    assert [c.prompt_index for c in a] == [0, 0, 0, 1, 1, 1]
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    assert len({tuple(c.token_ids) for c in a}) > 1


def test_sampling_params_validation():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=5, max_tokens=2)
    assert SamplingParams(stop="</answer>").stop == ("</answer>",)
    with pytest.raises(ValueError, match="native backend needs"):
        make_backend("native", "some/path")
    with pytest.raises(ValueError, match="unknown backend"):
        make_backend("tgi", "x")


def test_vllm_backend_maps_params_and_flattens_outputs(monkeypatch):
    seen = {}

    class FakeSamplingParams:
        def __init__(self, **kwargs):
            seen.update(kwargs)

    class FakeLLM:
        def generate(self, prompts, sampling_params):
            sample = lambda text, reason: types.SimpleNamespace(text=text, token_ids=(1, 2), finish_reason=reason)
            pairs = [[sample(p + "!", "stop"), sample(p + "?", "length")] for p in prompts]
            return [types.SimpleNamespace(outputs=pair) for pair in pairs]

    fake_vllm = types.SimpleNamespace(SamplingParams=FakeSamplingParams, LLM=None)
    monkeypatch.setitem(sys.modules, "vllm", fake_vllm)
    backend = VLLMBackend("unused", llm=FakeLLM())
    params = SamplingParams(temperature=0.7, max_tokens=9, min_tokens=2, stop=("</answer>",), n=2, seed=3,
                            include_stop_str_in_output=True)
    out = backend.generate(["p", "q"], params)
    assert seen == {"temperature": 0.7, "top_p": 1.0, "max_tokens": 9, "min_tokens": 2, "stop": ["</answer>"],
                    "include_stop_str_in_output": True, "n": 2, "seed": 3}
    assert [(c.prompt_index, c.text, c.finish_reason) for c in out] == [
        (0, "p!", "stop"), (0, "p?", "length"), (1, "q!", "stop"), (1, "q?", "length")]


def test_missing_vllm_gives_an_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` raise ImportError
    with pytest.raises(RuntimeError, match="uv pip install vllm"):
        make_backend("vllm", "model/dir")
