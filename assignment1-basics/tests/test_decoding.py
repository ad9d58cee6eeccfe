"""Decoding against brute force: full recomputation without a cache, and explicit top-p sets."""

import pytest
import torch

from cs336_basics.decoding import generate, sample_next_token
from cs336_basics.model import TransformerConfig, TransformerLM


def _model(**overrides) -> TransformerLM:
    torch.manual_seed(0)
    config = TransformerConfig(vocab_size=61, context_length=40, d_model=32, num_layers=2, num_heads=4, d_ff=64)
    return TransformerLM(TransformerConfig(**{**config.to_dict(), **overrides})).eval()


def _greedy_without_cache(model, prompt, steps, stop=None):
    ids = list(prompt)
    out = []
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(torch.tensor([ids]))[0, -1].argmax())
            if token == stop:
                break
            out.append(token)
            ids.append(token)
    return out


@pytest.mark.parametrize("use_torch_sdpa", [False, True])
def test_batched_greedy_decoding_equals_per_prompt_recomputation(use_torch_sdpa):
    model = _model(use_torch_sdpa=use_torch_sdpa)
    prompts = [[5, 9, 3, 22, 7, 1, 8], [4], [10, 11, 12]]  # different lengths: left padding is exercised
    got = generate(model, prompts, max_new_tokens=12, temperature=0.0)
    assert got == [_greedy_without_cache(model, p, 12) for p in prompts]


def test_stop_token_ends_each_row_independently():
    model = _model()
    prompts = [[1, 2, 3], [7, 7]]
    free = generate(model, prompts, max_new_tokens=10, temperature=0.0)
    stop = free[0][3]  # the 4th token row 0 would emit becomes the stop token
    got = generate(model, prompts, max_new_tokens=10, temperature=0.0, stop_token_id=stop)
    assert got == [_greedy_without_cache(model, p, 10, stop=stop) for p in prompts]
    assert got[0] == free[0][: free[0].index(stop)]


def test_generation_is_capped_by_the_context_window():
    model = _model()
    out = generate(model, [[1] * 35], max_new_tokens=100, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert len(out[0]) <= 5
    with pytest.raises(ValueError, match="context_length"):
        generate(model, [[1] * 41], max_new_tokens=1)
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[]], max_new_tokens=1)


def test_top_p_samples_only_from_the_nucleus_with_renormalised_frequencies():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(20_000, 4)
    draws = sample_next_token(logits, temperature=1.0, top_p=0.8, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=4).float() / draws.numel()
    # Nucleus for p = 0.8 is {0, 1} (0.5 + 0.3 reaches 0.8), renormalised to (0.625, 0.375).
    torch.testing.assert_close(counts, torch.tensor([0.625, 0.375, 0.0, 0.0]), atol=0.015, rtol=0)


def test_temperature_sharpens_and_zero_is_greedy():
    logits = torch.tensor([[1.0, 2.0, 0.5]]).expand(20_000, 3)
    gen = torch.Generator().manual_seed(0)
    cold = torch.bincount(sample_next_token(logits, 0.5, generator=gen), minlength=3).float() / 20_000
    expected = torch.softmax(torch.tensor([1.0, 2.0, 0.5]) / 0.5, dim=0)
    torch.testing.assert_close(cold, expected, atol=0.015, rtol=0)
    assert sample_next_token(logits[:2], 0.0).tolist() == [1, 1]
    with pytest.raises(ValueError):
        sample_next_token(logits, 1.0, top_p=0.0)


def test_num_ids_keeps_sampling_inside_a_smaller_tokenizer():
    """A model with more embeddings than its tokenizer has tokens (a padded vocabulary, an untrained model)
    never yields an id the tokenizer cannot decode (generate and quickstart crashed in Tokenizer.decode)."""
    model = _model()
    out = generate(model, [[1, 2, 3], [4]], max_new_tokens=30, temperature=5.0, num_ids=7,
                   generator=torch.Generator().manual_seed(0))
    assert max(max(row) for row in out) < 7 and sum(map(len, out)) > 30
