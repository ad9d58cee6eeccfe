"""GRPO pinned down so that a defect cannot hide behind tuning (tiny cs336_basics models, CPU, seconds).

* Gradients: every parameter's accumulated gradient after `grpo_microbatch_train_step` (and after the loop's
  own train step) equals the gradient of a surrogate written out here by hand, response by response on its own
  unpadded ids: -(1/B) Σ_i (1/n_i) Σ_t w_it log π(y_it), with the per-token weight w (reward, advantage, or the
  importance-weighted advantage with the clip rule applied explicitly) and n_i the length or the constant.
* Bandit: with rollouts sampled from the live policy restricted to a few fixed strings, `run_grpo` must move
  the policy onto the rewarded string, on- and off-policy.
* Optimizer: a fresh AdamW's first step moves every weight by the full lr whatever the gradient's scale (why
  a large lr can wreck a pretrained policy in a couple of steps), and `warmup_steps` scales that first step.
"""

import pytest
import torch

from cs336_alignment.generation import Completion, SamplingParams
from cs336_alignment.grpo import grpo_microbatch_train_step
from cs336_alignment.lm import BasicsCausalLM
from cs336_alignment.logprobs import get_response_log_probs
from cs336_alignment.testing import basics_tokenizer, tiny_basics_lm
from cs336_alignment.text_tokenizer import BasicsTokenizer
from cs336_alignment.tokenization import tokenize_prompt_and_output
from cs336_alignment.training import GRPOConfig, run_grpo
from cs336_alignment.training.common import clip_and_step, make_adamw
from cs336_alignment.training.eval_config import QuestionSet
from cs336_alignment.training.grpo_loop import grpo_train_on_rollouts


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run faster on one thread, and the 2-core CI machine is not oversubscribed."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok() -> BasicsTokenizer:
    return BasicsTokenizer(basics_tokenizer())


def make_policy(tok: BasicsTokenizer, seed: int = 0, dtype: torch.dtype = torch.float32) -> BasicsCausalLM:
    return BasicsCausalLM(tiny_basics_lm(len(tok), seed=seed, context_length=64)).to(dtype).train()


def token_log_probs(policy: BasicsCausalLM, prompt_ids: list[int], response_ids: list[int]) -> torch.Tensor:
    """log π(y_t | prompt, y_<t) for each response token: one plain forward of the raw LM on this pair alone."""
    ids = torch.tensor([prompt_ids + response_ids])
    logp = torch.log_softmax(policy.model(ids), dim=-1)[0]
    positions = torch.arange(len(prompt_ids) - 1, len(prompt_ids) + len(response_ids) - 1)
    return logp[positions, torch.tensor(response_ids)]


# ---- gradients against a hand-written surrogate ---------------------------------------------------------

PROMPTS = ["Question 1: what is 1 plus 4?", "Question 12: what?", "what is 3 plus 6?", "Question 7"]
RESPONSES = [" <answer> 5 </answer>", " The quick brown fox jumps", " 9",
             " <think> reasoning </think> <answer> 9 </answer>"]
RAW_REWARDS = torch.tensor([1.0, 0.0, 0.5, 1.0], dtype=torch.float64)
ADVANTAGES = torch.tensor([0.8, -1.2, 0.3, -0.4], dtype=torch.float64)
CLIPRANGE = 0.2
# log π_old - log π per token, cycling along the tokens so that ratios r = π/π_old fall above 1+ε (1.65),
# inside the range (1.105, 0.95) and below 1-ε (0.67): min() picks the clipped term at r = 1.65 when A > 0 and
# at r = 0.67 when A < 0; at the other out-of-range ratio the unclipped term is the smaller and still has a
# gradient.
OLD_OFFSETS = (-0.5, -0.1, 0.05, 0.4)
LOSS_TYPES = ["no_baseline", "reinforce_with_baseline", "grpo_clip", "grpo_no_clip"]


def old_offsets(rows: int, width: int) -> torch.Tensor:
    return torch.tensor([[OLD_OFFSETS[(i + j) % 4] for j in range(width)] for i in range(rows)],
                        dtype=torch.float64)


def assert_grad_close(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    """Float64 weights, but cs336_basics does its norms and softmax in float32: agreement to ~1e-6 relative
    (a wrong weight, normaliser or mask is off by percents)."""
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()),
                               msg=lambda m: f"{name}: {m}")


def hand_surrogate(
    policy: BasicsCausalLM, tok: BasicsTokenizer, loss_type: str, constant: float | None, offsets: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """-(1/B) Σ_i (1/n_i) Σ_t w_it log π(y_it) with w detached; returns it and each response's active-token mask.

    w is the raw reward (no_baseline), the advantage (reinforce_with_baseline), A r (grpo_no_clip) or, for
    grpo_clip, A r where the unclipped term r A is the smaller one (A > 0 and r <= 1+ε, or A < 0 and r >= 1-ε)
    and 0 where min() picks the constant clipped term. n_i is response i's token count or the constant.
    """
    total = torch.zeros((), dtype=torch.float64)
    active_masks = []
    for i, (prompt, response) in enumerate(zip(PROMPTS, RESPONSES, strict=True)):
        p, r = tok.encode(prompt), tok.encode(response)
        logp = token_log_probs(policy, p, r)
        # Response token t is predicted at column len(p) - 1 + t of the shifted, right-padded batch.
        old = logp.detach() + offsets[i, len(p) - 1 : len(p) - 1 + len(r)]
        ratio = torch.exp(logp.detach() - old)
        a = ADVANTAGES[i]
        active = (ratio <= 1 + CLIPRANGE) if a > 0 else (ratio >= 1 - CLIPRANGE)
        weight = {
            "no_baseline": RAW_REWARDS[i].expand(len(r)),
            "reinforce_with_baseline": a.expand(len(r)),
            "grpo_no_clip": a * ratio,
            "grpo_clip": torch.where(active, a * ratio, torch.zeros_like(ratio)),
        }[loss_type]
        active_masks.append(active)
        n = len(r) if constant is None else constant
        total = total - (weight * logp).sum() / n
    return total / len(PROMPTS), active_masks


@pytest.mark.parametrize("constant", [None, 7.0], ids=["masked_mean", "masked_normalize"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_microbatch_gradients_match_the_hand_written_surrogate(tok, loss_type, constant):
    policy = make_policy(tok, seed=11, dtype=torch.float64)
    batch = tokenize_prompt_and_output(PROMPTS, RESPONSES, tok)
    lengths = [len(tok.encode(r)) for r in RESPONSES]
    assert len(set(lengths)) == len(lengths)  # unequal lengths: a wrong per-sequence normaliser shows
    offsets = old_offsets(*batch["labels"].shape)
    for rows in (slice(0, 2), slice(2, 4)):  # two micro-batches accumulated into one step
        logp = get_response_log_probs(policy, batch["input_ids"][rows], batch["labels"][rows])["log_probs"]
        grpo_microbatch_train_step(
            logp, batch["response_mask"][rows], gradient_accumulation_steps=2, loss_type=loss_type,
            raw_rewards=RAW_REWARDS[rows, None], advantages=ADVANTAGES[rows, None],
            old_log_probs=logp.detach() + offsets[rows], cliprange=CLIPRANGE, normalize_constant=constant,
        )
    surrogate, active = hand_surrogate(policy, tok, loss_type, constant, offsets)
    if loss_type == "grpo_clip":  # both branches of the min occur, so the clip rule is exercised
        flat = torch.cat(active)
        assert flat.any() and not flat.all()
    params = list(policy.parameters())
    expected = torch.autograd.grad(surrogate, params)
    for (name, param), grad in zip(policy.named_parameters(), expected, strict=True):
        assert_grad_close(param.grad, grad, name)


class GradientRecorder:
    """Stands in for the optimizer: keeps the gradients of each step and leaves the weights alone."""

    def __init__(self, params: list[torch.nn.Parameter]):
        self.params = params
        self.param_groups: list[dict] = [{"params": params, "lr": 0.0}]
        self.seen: list[list[torch.Tensor]] = []

    def step(self) -> None:
        self.seen.append([p.grad.clone() for p in self.params])

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None


@pytest.mark.parametrize("normalization", ["masked_mean", "masked_normalize"])
def test_the_loops_train_step_takes_the_hand_written_gradient(tok, normalization):
    """The loop's wiring (labels, masks, advantage rows, the length constant, accumulation) on one step."""
    policy = make_policy(tok, seed=12, dtype=torch.float64)
    batch = tokenize_prompt_and_output(PROMPTS, RESPONSES, tok)
    config = GRPOConfig(rollout_batch_size=4, group_size=2, train_batch_size=4, gradient_accumulation_steps=2,
                        loss_type="reinforce_with_baseline", length_normalization=normalization,
                        sampling_max_tokens=7, max_grad_norm=0.0)
    recorder = GradientRecorder(list(policy.parameters()))
    grpo_train_on_rollouts(policy, recorder, batch, ADVANTAGES, RAW_REWARDS, config, seed=0)
    constant = 7.0 if normalization == "masked_normalize" else None
    surrogate, _ = hand_surrogate(policy, tok, "reinforce_with_baseline", constant,
                                  old_offsets(*batch["labels"].shape))
    expected = torch.autograd.grad(surrogate, recorder.params)
    assert len(recorder.seen) == 1
    for (name, _), got, want in zip(policy.named_parameters(), recorder.seen[0], expected, strict=True):
        assert_grad_close(got, want, name)


# ---- a bandit: the loop must find the rewarded string -------------------------------------------------

ARMS = (" lazy dog", " jumps over", " brown fox", " Below is")  # two tokens each: a random policy is ~uniform
REWARDED = " brown fox"
BANDIT_TRAIN = [f"Question {i}: what is {i} plus {i + 3}?" for i in range(4)]
BANDIT_HELD_OUT = [f"Question {i}: what is {i} plus {i + 3}?" for i in range(10, 14)]


@torch.no_grad()
def arm_probabilities(policy: BasicsCausalLM, tok: BasicsTokenizer, prompt: str) -> torch.Tensor:
    """π(arm | prompt) renormalised over the arms, each arm's log-likelihood from a plain forward."""
    p = tok.encode(prompt)
    scores = torch.stack([token_log_probs(policy, p, tok.encode(arm)).sum() for arm in ARMS])
    return torch.softmax(scores.double(), dim=0)


def rewarded_probability(policy: BasicsCausalLM, tok: BasicsTokenizer, prompts: list[str]) -> float:
    return sum(float(arm_probabilities(policy, tok, p)[ARMS.index(REWARDED)]) for p in prompts) / len(prompts)


class BanditBackend:
    """Samples every completion from the live policy restricted to ARMS, seeded by `params.seed`."""

    def __init__(self, policy: BasicsCausalLM, tok: BasicsTokenizer):
        self.policy, self.tok = policy, tok

    def generate(self, prompts: list[str], params: SamplingParams) -> list[Completion]:
        generator = torch.Generator().manual_seed(params.seed)
        out = []
        for index, prompt in enumerate(prompts):
            picks = torch.multinomial(arm_probabilities(self.policy, self.tok, prompt), params.n, replacement=True,
                                      generator=generator)
            out += [Completion(index, ARMS[k], self.tok.encode(ARMS[k]), "stop") for k in picks.tolist()]
        return out


def bandit_reward(response: str, truth: str) -> dict[str, float]:
    return {"reward": float(response == REWARDED)}


BANDIT_CASES = {
    "reinforce_on_policy": dict(loss_type="reinforce_with_baseline"),
    "grpo_clip_on_policy": dict(loss_type="grpo_clip"),
    "grpo_clip_off_policy": dict(loss_type="grpo_clip", epochs_per_rollout_batch=2, train_batch_size=8,
                                 gradient_accumulation_steps=1),
}


@pytest.mark.parametrize("case", list(BANDIT_CASES))
def test_grpo_learns_the_rewarded_arm_of_a_bandit(tok, case):
    policy = make_policy(tok, seed=21)
    start = rewarded_probability(policy, tok, BANDIT_HELD_OUT)
    assert 0.15 < start < 0.35  # about 1/4
    settings = dict(n_grpo_steps=30, learning_rate=1e-3, rollout_batch_size=16, group_size=8, train_batch_size=16,
                    gradient_accumulation_steps=2, sampling_max_tokens=8, seed=0)
    config = GRPOConfig(**{**settings, **BANDIT_CASES[case]})
    history = run_grpo(policy, tok, QuestionSet(BANDIT_TRAIN, [""] * 4), config, backend=BanditBackend(policy, tok),
                       reward_fn=bandit_reward)
    assert rewarded_probability(policy, tok, BANDIT_HELD_OUT) > 0.9
    assert rewarded_probability(policy, tok, BANDIT_TRAIN) > 0.9
    assert history[-1]["reward_mean"] > 0.8
    if case == "grpo_clip_off_policy":  # four updates per rollout batch, the later ones really off-policy
        assert all(h["optimizer_steps"] == 4 for h in history)
        assert max(abs(h["ratio_mean"] - 1) for h in history) > 1e-3


# ---- the first optimizer steps: why a large lr wrecks a policy at once, and what warm-up changes -------

ADAM_EPS = 1e-8  # torch.optim.AdamW's default, which make_adamw keeps


def surrogate_gradient_step(policy: BasicsCausalLM, tok: BasicsTokenizer, scale: float) -> None:
    surrogate, _ = hand_surrogate(policy, tok, "reinforce_with_baseline", None, old_offsets(4, 64))
    (scale * surrogate).backward()


def first_adam_update(policy: BasicsCausalLM, tok: BasicsTokenizer, lr: float, scale: float,
                      max_grad_norm: float | None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(gradients the optimizer saw, weight change) of one step of the loop's fresh AdamW on a GRPO loss."""
    before = [p.detach().clone() for p in policy.parameters()]
    optimizer = make_adamw(policy, lr, weight_decay=0.0, beta1=0.9, beta2=0.95)
    surrogate_gradient_step(policy, tok, scale)
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(list(policy.parameters()), max_grad_norm)
    grads = [p.grad.clone() for p in policy.parameters()]
    clip_and_step(policy, optimizer, None)
    return grads, [p.detach() - b for p, b in zip(policy.parameters(), before, strict=True)]


def test_a_fresh_adams_first_step_moves_every_weight_by_lr_whatever_the_gradient(tok):
    lr = 1e-4
    steps = {}
    for scale, clip in ((1.0, None), (1000.0, None), (1.0, 0.1)):  # as is, a 1000x loss, clipped to norm 0.1
        grads, delta = first_adam_update(make_policy(tok, seed=31, dtype=torch.float64), tok, lr, scale, clip)
        # Step 1 of Adam by hand: m̂ = g, v̂ = g², so the update is -lr g / (|g| + eps): a sign step.
        for g, d in zip(grads, delta, strict=True):
            torch.testing.assert_close(d, -lr * g / (g.abs() + ADAM_EPS), rtol=1e-6, atol=1e-12)
        seen, moved = torch.cat([g.flatten() for g in grads]), torch.cat([d.flatten() for d in delta])
        nonzero = seen != 0
        assert nonzero.float().mean() > 0.5
        # Gradients span orders of magnitude, yet nearly every weight with one moves by the full lr.
        assert seen[nonzero].abs().max() / seen[nonzero].abs().min() > 1e4
        assert (moved[nonzero].abs() > 0.99 * lr).float().mean() > 0.98
        steps[scale, clip] = seen, moved
    seen, moved = steps[1.0, None]
    assert float(torch.linalg.vector_norm(seen)) > 1.0  # so clipping to 0.1 shrinks the gradient >10x
    for other_seen, other_moved in (steps[1000.0, None], steps[1.0, 0.1]):
        same = other_seen.abs().minimum(seen.abs()) > 1e-5  # away from Adam's eps the steps are identical
        assert same.float().mean() > 0.6
        torch.testing.assert_close(other_moved[same], moved[same], rtol=1e-3, atol=0.0)


class SnapshotBackend(BanditBackend):
    """The bandit sampler, also keeping the policy's weights as each rollout batch is drawn."""

    def __init__(self, policy: BasicsCausalLM, tok: BasicsTokenizer):
        super().__init__(policy, tok)
        self.snapshots: list[list[torch.Tensor]] = []

    def generate(self, prompts: list[str], params: SamplingParams) -> list[Completion]:
        self.snapshots.append([p.detach().clone() for p in self.policy.parameters()])
        return super().generate(prompts, params)


def test_warmup_scales_the_loops_first_steps(tok):
    lr, warmup = 1e-4, 4
    policy = make_policy(tok, seed=32, dtype=torch.float64)
    backend = SnapshotBackend(policy, tok)
    config = GRPOConfig(n_grpo_steps=3, learning_rate=lr, warmup_steps=warmup, rollout_batch_size=16, group_size=8,
                        train_batch_size=16, gradient_accumulation_steps=2, sampling_max_tokens=8)
    history = run_grpo(policy, tok, QuestionSet(BANDIT_TRAIN, [""] * 4), config, backend=backend,
                       reward_fn=bandit_reward)
    assert [h["lr"] for h in history] == pytest.approx([lr / 4, lr / 2, 3 * lr / 4], rel=1e-12)
    first = torch.cat([(b - a).flatten() for a, b in zip(*backend.snapshots[:2], strict=True)])
    moved = first[first != 0].abs()
    assert moved.numel() > first.numel() // 2
    assert moved.max() <= lr / warmup * (1 + 1e-6)
    assert (moved > 0.99 * lr / warmup).float().mean() > 0.99
