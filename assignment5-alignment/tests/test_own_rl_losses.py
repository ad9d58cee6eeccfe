"""The new losses as pure functions, each against a float64 recomputation written from its paper's formula:
GAE(λ) as the explicit discounted sum of TD errors, InstructGPT's KL-penalised reward, PPO's clipped policy and
value losses branch by branch, GSPO's sequence ratio as the explicit product of token ratios, ORPO's odds
ratio from probabilities, and the Bradley–Terry preference probability."""

import math

import pytest
import torch

from cs336_alignment.grpo import compute_gspo_loss, grpo_microbatch_train_step, gspo_sequence_ratio
from cs336_alignment.orpo import log_odds, orpo_loss_from_log_probs
from cs336_alignment.ppo import gae_advantages, kl_penalized_rewards, ppo_policy_loss, ppo_value_loss, whiten
from cs336_alignment.reward_model import bradley_terry_loss


def response_masks(batch: int, seq: int, seed: int) -> torch.Tensor:
    """One contiguous response per row after a prompt of random length, then padding."""
    generator = torch.Generator().manual_seed(seed)
    mask = torch.zeros(batch, seq, dtype=torch.bool)
    for row in range(batch):
        start = int(torch.randint(0, seq // 2, (1,), generator=generator))
        length = int(torch.randint(1, seq - start + 1, (1,), generator=generator))
        mask[row, start : start + length] = True
    return mask


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 0.8), (0.99, 0.0), (0.97, 1.0)])
def test_gae_equals_the_discounted_sum_of_td_errors(gamma, lam):
    generator = torch.Generator().manual_seed(0)
    mask = response_masks(6, 12, seed=1)
    rewards = torch.randn(6, 12, generator=generator, dtype=torch.float64)
    values = torch.randn(6, 12, generator=generator, dtype=torch.float64)
    advantages, returns = gae_advantages(rewards, values, mask, gamma, lam)
    for row in range(6):
        positions = mask[row].nonzero().flatten().tolist()
        r = [float(rewards[row, t]) for t in positions]
        v = [float(values[row, t]) for t in positions] + [0.0]  # the state after the last token is terminal
        deltas = [r[i] + gamma * v[i + 1] - v[i] for i in range(len(r))]
        for i, t in enumerate(positions):
            expected = sum((gamma * lam) ** k * deltas[i + k] for k in range(len(r) - i))
            assert float(advantages[row, t]) == pytest.approx(expected, abs=1e-12)
            assert float(returns[row, t]) == pytest.approx(expected + v[i], abs=1e-12)
            if lam == 1.0:  # Monte-Carlo: the discounted return minus the value
                mc = sum(gamma ** k * r[i + k] for k in range(len(r) - i))
                assert float(advantages[row, t]) == pytest.approx(mc - v[i], abs=1e-12)
        outside = ~mask[row]
        assert torch.all(advantages[row, outside] == 0) and torch.all(returns[row, outside] == 0)


def test_kl_penalised_reward_pays_the_score_on_the_last_response_token():
    generator = torch.Generator().manual_seed(2)
    mask = response_masks(4, 9, seed=3)
    logp = torch.randn(4, 9, generator=generator, dtype=torch.float64)
    ref = torch.randn(4, 9, generator=generator, dtype=torch.float64)
    scores = torch.tensor([1.0, -0.5, 0.0, 2.0], dtype=torch.float64)
    rewards, kl = kl_penalized_rewards(scores, logp, ref, mask, kl_coef=0.2)
    torch.testing.assert_close(kl, torch.where(mask, logp - ref, 0.0))
    for row in range(4):
        positions = mask[row].nonzero().flatten().tolist()
        for t in range(9):
            expected = -0.2 * float(logp[row, t] - ref[row, t]) if t in positions else 0.0
            if t == positions[-1]:
                expected += float(scores[row])
            assert float(rewards[row, t]) == pytest.approx(expected, abs=1e-12)
    # Summed over the response: the score minus β times the sequence log-ratio (a KL estimate).
    torch.testing.assert_close(rewards.sum(-1), scores - 0.2 * ((logp - ref) * mask).sum(-1))


def test_ppo_policy_loss_branch_by_branch():
    logp = torch.tensor([[0.0, 0.3, -0.3, 0.05]], dtype=torch.float64)
    old = torch.zeros_like(logp)
    adv = torch.tensor([[1.0, 1.0, -1.0, -2.0]], dtype=torch.float64)
    loss, meta = ppo_policy_loss(logp, old, adv, cliprange=0.2)
    expected, clipped = [], []
    for lp, a in zip(logp[0].tolist(), adv[0].tolist(), strict=True):
        ratio = math.exp(lp)
        surrogate = min(ratio * a, min(max(ratio, 0.8), 1.2) * a)
        expected.append(-surrogate)
        clipped.append(min(max(ratio, 0.8), 1.2) * a < ratio * a)
    torch.testing.assert_close(loss[0], torch.tensor(expected, dtype=torch.float64))
    assert meta["clipped"][0].tolist() == clipped == [False, True, True, False]
    # The gradient vanishes exactly on clipped tokens and is -ρA elsewhere.
    leaf = logp.clone().requires_grad_(True)
    ppo_policy_loss(leaf, old, adv, 0.2)[0].sum().backward()
    torch.testing.assert_close(leaf.grad, torch.where(meta["clipped"], 0.0, -torch.exp(logp) * adv))


def test_ppo_value_loss_takes_the_worse_of_clipped_and_unclipped():
    values = torch.tensor([[0.5, 2.0, -1.0, 0.1]], dtype=torch.float64)
    old = torch.tensor([[0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    returns = torch.tensor([[1.0, 1.0, -2.0, 0.0]], dtype=torch.float64)
    loss, meta = ppo_value_loss(values, old, returns, cliprange_value=0.2)
    for t in range(4):
        v, vo, r = float(values[0, t]), float(old[0, t]), float(returns[0, t])
        vc = vo + min(max(v - vo, -0.2), 0.2)
        assert float(loss[0, t]) == pytest.approx(0.5 * max((v - r) ** 2, (vc - r) ** 2), abs=1e-12)
    assert meta["clipped"][0].tolist() == [True, False, True, False]


def test_whitening_over_the_mask():
    x = torch.tensor([[1.0, 2.0, 9.0], [3.0, 100.0, 4.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, False], [True, False, True]])
    kept = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    expected = (kept - kept.mean()) / kept.std(unbiased=False)
    torch.testing.assert_close(whiten(x, mask)[mask], expected, rtol=1e-6, atol=1e-6)
    assert torch.all(whiten(x, mask)[~mask] == 0)


def test_gspo_ratio_is_the_length_normalised_product_of_token_ratios():
    generator = torch.Generator().manual_seed(4)
    mask = response_masks(5, 10, seed=5)
    logp = -torch.rand(5, 10, generator=generator, dtype=torch.float64)
    old = logp + 0.1 * torch.randn(5, 10, generator=generator, dtype=torch.float64)
    logp[~mask] = float("nan")  # padding must never reach the ratio
    ratio = gspo_sequence_ratio(logp, old, mask)
    for row in range(5):
        positions = mask[row].nonzero().flatten().tolist()
        product = math.prod(math.exp(float(logp[row, t])) / math.exp(float(old[row, t])) for t in positions)
        assert float(ratio[row]) == pytest.approx(product ** (1 / len(positions)), rel=1e-12)


def test_gspo_loss_and_gradient_follow_the_sequence_objective():
    mask = response_masks(4, 8, seed=6)
    lengths = mask.sum(-1).double()
    old = -torch.rand(4, 8, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    # Shift each row's log-likelihood so that s_i = exp(shift): rows 1 and 2 leave the clip range.
    shifts = torch.tensor([0.05, 0.5, -0.5, -0.02], dtype=torch.float64)
    logp = (old + shifts[:, None]).requires_grad_(True)
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0], dtype=torch.float64)
    loss, meta = compute_gspo_loss(adv.unsqueeze(-1), logp, old, mask, cliprange=0.2)
    s = torch.exp(shifts)
    expected = -torch.minimum(s * adv, s.clamp(0.8, 1.2) * adv)
    for row in range(4):
        assert torch.all(loss[row, mask[row]] == expected[row].item())
    assert meta["clipped"][:, 0].tolist() == [False, True, True, False]
    # Through the GRPO step (per-sequence mean, batch mean): d/d log π_t = -A s / (|y| B) where unclipped.
    logp.grad = None
    grpo_microbatch_train_step(logp, mask, 1, "gspo", advantages=adv.unsqueeze(-1), old_log_probs=old,
                               cliprange=0.2)
    unclipped = ~meta["clipped"][:, 0]
    expected_grad = torch.where(mask & unclipped[:, None], (-adv * s / lengths / 4)[:, None], 0.0)
    torch.testing.assert_close(logp.grad, expected_grad, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="sequence-level"):
        grpo_microbatch_train_step(logp, mask, 1, "gspo", advantages=adv, old_log_probs=old, cliprange=0.2,
                                   normalize_constant=8.0)


def test_orpo_odds_ratio_from_probabilities():
    chosen = torch.tensor([-0.2, -1.5, -3e-4, -7.0], dtype=torch.float64)
    rejected = torch.tensor([-0.9, -1.0, -2.0, -30.0], dtype=torch.float64)
    loss, parts = orpo_loss_from_log_probs(chosen, rejected, lam=0.25)
    for i in range(4):
        p_w, p_l = math.exp(float(chosen[i])), math.exp(float(rejected[i]))
        odds_w, odds_l = p_w / (1 - p_w), p_l / (1 - p_l)
        l_or = math.log(1 + odds_l / odds_w)  # -log σ(log(odds_w / odds_l))
        assert float(parts["log_odds_ratio"][i]) == pytest.approx(math.log(odds_w / odds_l), rel=1e-9)
        assert float(parts["odds_ratio_loss"][i]) == pytest.approx(l_or, rel=1e-9)
        assert float(loss[i]) == pytest.approx(-float(chosen[i]) + 0.25 * l_or, rel=1e-9)
    assert torch.isfinite(log_odds(torch.tensor([0.0, -1e-12, -800.0], dtype=torch.float64))).all()
    assert float(log_odds(torch.tensor(math.log(0.5)))) == pytest.approx(0.0, abs=1e-7)


def test_bradley_terry_is_minus_log_preference_probability():
    chosen = torch.tensor([0.3, -2.0, 5.0, 40.0], dtype=torch.float64)
    rejected = torch.tensor([0.1, 1.0, 5.0, -40.0], dtype=torch.float64)
    loss = bradley_terry_loss(chosen, rejected)
    for i in range(4):
        a, b = float(chosen[i]), float(rejected[i])
        probability = math.exp(a) / (math.exp(a) + math.exp(b))
        assert float(loss[i]) == pytest.approx(-math.log(probability), rel=1e-9, abs=1e-30)
