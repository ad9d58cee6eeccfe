import pytest

from cs336_alignment.generation import Completion, SamplingParams
from cs336_alignment.log_generations import log_generations, response_entropies
from cs336_alignment.reward import r1_zero_reward
from cs336_alignment.testing import hf_tokenizer, tiny_llama


class FixedBackend:
    def __init__(self, texts, tokenizer):
        self.texts, self.tokenizer = texts, tokenizer

    def generate(self, prompts, params):
        return [Completion(i, t, self.tokenizer.encode(t), "stop") for i, t in enumerate(self.texts)]


def test_log_generations_records_and_length_statistics():
    tokenizer = hf_tokenizer()
    policy = tiny_llama(len(tokenizer))
    texts = [" a </think> <answer>4</answer>", " b </think> <answer>5</answer>", " no tags"]
    prompts = ["Question 1: what is 2 plus 2?", "Question 2: what is 2 plus 3?", "Question 3"]
    records, summary = log_generations(FixedBackend(texts, tokenizer), prompts, ["4", "6", "1"], r1_zero_reward,
                                       SamplingParams(), policy, tokenizer)
    lengths = [len(tokenizer.encode(t)) for t in texts]
    assert [r["reward"] for r in records] == [1.0, 0.0, 0.0]
    assert summary["reward"] == pytest.approx(1 / 3) and summary["format_reward"] == pytest.approx(2 / 3)
    assert summary["response_length_correct"] == lengths[0]
    assert summary["response_length_incorrect"] == pytest.approx((lengths[1] + lengths[2]) / 2)
    entropies = response_entropies(policy, tokenizer, prompts, texts)
    assert [r["mean_token_entropy"] for r in records] == pytest.approx(entropies)
    assert summary["mean_token_entropy"] == pytest.approx(sum(entropies) / 3)
    with pytest.raises(ValueError, match="n=1"):
        log_generations(FixedBackend(texts, tokenizer), prompts, ["4"] * 3, r1_zero_reward, SamplingParams(n=2))
