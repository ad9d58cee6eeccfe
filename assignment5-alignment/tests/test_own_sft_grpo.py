import statistics

import pytest
import torch

from cs336_alignment.grpo import (
    compute_group_normalized_rewards,
    compute_grpo_clip_loss,
    compute_naive_policy_gradient_loss,
    compute_policy_gradient_loss,
    grpo_microbatch_train_step,
)
from cs336_alignment.sft import sft_microbatch_train_step


def _inputs(seed=0, batch=3, seq=6):
    g = torch.Generator().manual_seed(seed)
    log_probs = (-torch.rand(batch, seq, generator=g, dtype=torch.float64) * 3).requires_grad_()
    mask = torch.rand(batch, seq, generator=g) > 0.3
    mask[:, 0] = True
    return log_probs, mask


@pytest.mark.parametrize("constant", [1.0, 42.0])
def test_sft_step_loss_and_gradient_match_explicit_formula(constant):
    log_probs, mask = _inputs()
    loss, meta = sft_microbatch_train_step(log_probs, mask, gradient_accumulation_steps=4, normalize_constant=constant)
    batch = log_probs.shape[0]
    expected = -sum(log_probs[b, t].item() for b in range(batch) for t in range(6) if mask[b, t]) / constant / batch / 4
    assert abs(loss.item() - expected) < 1e-12
    # d loss / d log p[b, t] = -mask[b, t] / (constant * batch * accumulation), written out.
    torch.testing.assert_close(log_probs.grad, -mask.double() / (constant * batch * 4))
    assert meta["response_tokens"] == mask.sum()


def test_sft_gradient_accumulation_equals_full_batch():
    log_probs, mask = _inputs(batch=4)
    sft_microbatch_train_step(log_probs[:2], mask[:2], 2)
    sft_microbatch_train_step(log_probs[2:], mask[2:], 2)
    accumulated = log_probs.grad.clone()
    log_probs.grad = None
    sft_microbatch_train_step(log_probs, mask, 1)
    torch.testing.assert_close(accumulated, log_probs.grad)


def test_group_normalized_rewards_match_statistics_module():
    responses = [f"r{i}" for i in range(6)]
    table = {"r0": 1.0, "r1": 0.0, "r2": 0.5, "r3": 0.0, "r4": 0.0, "r5": 0.0}

    def reward_fn(response, truth):
        return {"reward": table[response], "format_reward": 1.0, "answer_reward": table[response]}

    adv, raw, meta = compute_group_normalized_rewards(reward_fn, responses, ["t"] * 6, 3, 1e-6, True)
    assert raw.tolist() == [table[r] for r in responses]
    first = [1.0, 0.0, 0.5]
    mean, std = statistics.mean(first), statistics.stdev(first)  # sample std (n - 1)
    torch.testing.assert_close(adv[:3].double(), torch.tensor([(r - mean) / (std + 1e-6) for r in first]).double())
    assert adv[3:].tolist() == [0.0, 0.0, 0.0]  # all-equal group: zero advantage, not NaN
    adv_no_std, _, _ = compute_group_normalized_rewards(reward_fn, responses, ["t"] * 6, 3, 1e-6, False)
    torch.testing.assert_close(adv_no_std[:3].double(), torch.tensor([r - mean for r in first]).double())
    assert meta["fraction_groups_all_equal"] == 0.5 and meta["format_reward_mean"] == 1.0
    with pytest.raises(ValueError, match="groups of 4"):
        compute_group_normalized_rewards(reward_fn, responses, ["t"] * 6, 4, 1e-6, True)


def test_naive_and_clip_losses_elementwise():
    log_probs, _ = _inputs()
    old = log_probs.detach() + 0.3 * torch.randn(log_probs.shape, dtype=torch.float64)
    adv = torch.tensor([[1.5], [-2.0], [0.0]], dtype=torch.float64)
    naive = compute_naive_policy_gradient_loss(adv, log_probs)
    clip, meta = compute_grpo_clip_loss(adv, log_probs, old, 0.2)
    for b in range(3):
        for t in range(6):
            a, lp, o = adv[b, 0].item(), log_probs[b, t].item(), old[b, t].item()
            assert abs(naive[b, t].item() + a * lp) < 1e-12
            ratio = torch.exp(torch.tensor(lp - o, dtype=torch.float64)).item()
            clipped_ratio = min(max(ratio, 0.8), 1.2)
            assert abs(clip[b, t].item() + min(ratio * a, clipped_ratio * a)) < 1e-12
            assert bool(meta["clipped"][b, t]) == (clipped_ratio * a < ratio * a)


def test_policy_gradient_wrapper_dispatch_and_errors():
    log_probs, _ = _inputs()
    rewards = torch.tensor([[1.0], [0.0], [1.0]], dtype=torch.float64)
    loss, _ = compute_policy_gradient_loss(log_probs, "no_baseline", raw_rewards=rewards)
    torch.testing.assert_close(loss, -rewards * log_probs)
    loss, _ = compute_policy_gradient_loss(log_probs, "grpo_no_clip", advantages=rewards, old_log_probs=log_probs)
    torch.testing.assert_close(loss, -rewards * torch.ones_like(log_probs))  # ratio 1 at the old policy
    with pytest.raises(ValueError, match="needs old_log_probs"):
        compute_policy_gradient_loss(log_probs, "grpo_clip", advantages=rewards, cliprange=0.2)
    with pytest.raises(ValueError, match="needs raw_rewards"):
        compute_policy_gradient_loss(log_probs, "no_baseline", advantages=rewards)
    with pytest.raises(ValueError, match="unknown loss_type"):
        compute_policy_gradient_loss(log_probs, "ppo", advantages=rewards)
    with pytest.raises(ValueError, match=r"shape \(batch, 1\)"):
        compute_naive_policy_gradient_loss(torch.ones(2, 2), log_probs)


def test_grpo_step_gradient_matches_explicit_computation():
    log_probs, mask = _inputs(seed=5)
    old = log_probs.detach() + 0.2 * torch.randn(log_probs.shape, dtype=torch.float64)
    adv = torch.tensor([[1.0], [-0.5], [2.0]], dtype=torch.float64)
    eps, gas, batch = 0.1, 3, 3
    loss, meta = grpo_microbatch_train_step(log_probs, mask, gas, "grpo_clip", advantages=adv, old_log_probs=old,
                                            cliprange=eps)
    # Per token: loss = -min(rA, clip(r)A); d/d logp = -rA where the unclipped branch is active, else 0.
    expected_grad = torch.zeros_like(old)
    expected_loss = 0.0
    for b in range(batch):
        n = int(mask[b].sum())
        for t in range(6):
            if not mask[b, t]:
                continue
            r = float(torch.exp(log_probs.detach()[b, t] - old[b, t]))
            a = adv[b, 0].item()
            unclipped, clipped = r * a, min(max(r, 1 - eps), 1 + eps) * a
            expected_loss -= min(unclipped, clipped) / n / batch / gas
            if unclipped <= clipped:
                expected_grad[b, t] = -r * a / n / batch / gas
    assert abs(loss.item() - expected_loss) < 1e-12
    torch.testing.assert_close(log_probs.grad, expected_grad)
    assert 0 <= meta["clip_fraction"] <= 1


def test_grpo_step_with_constant_normalisation_and_reinforce():
    log_probs, mask = _inputs(seed=6)
    adv = torch.tensor([[1.0], [-1.0], [0.5]], dtype=torch.float64)
    grpo_microbatch_train_step(log_probs, mask, 2, "reinforce_with_baseline", advantages=adv, normalize_constant=10)
    torch.testing.assert_close(log_probs.grad, -adv * mask.double() / (10 * 3 * 2))
