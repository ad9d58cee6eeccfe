import math

import torch

from cs336_alignment.lm import BasicsCausalLM, as_causal_lm
from cs336_alignment.logprobs import compute_entropy, get_response_log_probs, label_log_probs
from cs336_alignment.testing import tiny_basics_lm, tiny_llama


def _entropy_brute(row):
    values = [float(v) for v in row.detach()]
    top = max(values)
    weights = [math.exp(v - top) for v in values]
    z = sum(weights)
    return -sum(w / z * math.log(w / z) for w in weights if w > 0)


def test_entropy_matches_float64_brute_force_including_huge_logits():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 11, generator=g) * 5
    logits[0, 0] += 1e4  # would overflow a naive exp
    logits[1, 2, 3] = 3e4  # one token takes all the mass: entropy ~ 0
    expected = torch.tensor([[_entropy_brute(r) for r in seq] for seq in logits.double()], dtype=torch.float64)
    torch.testing.assert_close(compute_entropy(logits).double(), expected, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(compute_entropy(logits)).all()


def test_entropy_with_masked_vocab_and_uniform_and_bf16():
    logits = torch.tensor([[0.0, 0.0, float("-inf"), 0.0]])
    torch.testing.assert_close(compute_entropy(logits), torch.tensor([math.log(3)]))
    uniform = torch.zeros(5, 7, dtype=torch.bfloat16)
    torch.testing.assert_close(compute_entropy(uniform), torch.full((5,), math.log(7)))


def test_label_log_probs_match_float64_log_softmax():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 6, 13, generator=g) * 10
    labels = torch.randint(0, 13, (3, 6), generator=g)
    expected = torch.log_softmax(logits.double(), dim=-1).gather(-1, labels[..., None]).squeeze(-1)
    torch.testing.assert_close(label_log_probs(logits, labels).double(), expected, rtol=1e-5, atol=1e-5)


def test_response_log_probs_of_hf_llama_match_per_token_recomputation():
    model = tiny_llama(50).double()
    g = torch.Generator().manual_seed(3)
    input_ids = torch.randint(0, 50, (2, 7), generator=g)
    labels = torch.randint(0, 50, (2, 7), generator=g)
    out = get_response_log_probs(model, input_ids, labels, return_token_entropy=True)
    for b in range(2):
        for t in range(7):
            # Each position on its own prefix: causal masking means later tokens cannot matter.
            logits = model(input_ids[b : b + 1, : t + 1]).logits[0, -1]
            logp = torch.log_softmax(logits, -1)
            assert abs(out["log_probs"][b, t].item() - logp[labels[b, t]].item()) < 1e-9
            assert abs(out["token_entropy"][b, t].item() - _entropy_brute(logits)) < 1e-9
    assert "token_entropy" not in get_response_log_probs(model, input_ids, labels)


def test_basics_lm_adapter_exposes_logits_and_handles_padding():
    lm = tiny_basics_lm(40)
    wrapped = as_causal_lm(lm)
    assert isinstance(wrapped, BasicsCausalLM) and as_causal_lm(wrapped) is wrapped
    ids = torch.randint(0, 40, (1, 6))
    torch.testing.assert_close(wrapped(ids).logits, lm(ids))
    # Left padding hidden by the attention mask gives the same logits at the real positions.
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    mask = torch.tensor([[0, 0, 0] + [1] * 6])
    torch.testing.assert_close(wrapped(padded, attention_mask=mask).logits[:, 3:], lm(ids), rtol=1e-5, atol=1e-5)
    log_probs = get_response_log_probs(wrapped, ids[:, :-1], ids[:, 1:])["log_probs"]
    assert log_probs.shape == (1, 5) and (log_probs <= 0).all()
