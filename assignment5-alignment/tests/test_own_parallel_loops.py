"""The A5 loops data-parallel (issue 21, item 4) on the CPU with gloo at world size 2, the rollout engine's
weight push, and the one-line errors of bad launches.

- `cs336-align sft|dpo --parallel ddp` (the CLI, in two forked ranks that share a gloo group) and `run_grpo`
  with a `Dist` against the same command / call in one process with the same global batch: every step's
  logged loss and the final weights (the run folder's checkpoint.pt, written by rank 0 alone). GRPO's rollouts
  come from rank 0's engine on its own device (`rollout_device="cpu"`: a second CPU copy of the policy) and
  are the single-process run's (same seed), so its reward means are compared exactly.
- The weight push: at every generate call of a GRPO or EI run with `rollout_device`, the engine's weights equal
  the policy's; with the push disabled (a mutation) the same check fails, so it is not vacuous.

Tolerances are for fp32 on the CPU: DDP sums the two ranks' gradients in another order than one process
accumulates its micro-batches, so results agree to rounding, not bit for bit.
"""

import json
import multiprocessing
import os
import pickle
import socket
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from cs336_alignment.cli import run
from cs336_alignment.lm import BasicsCausalLM
from cs336_alignment.testing import basics_tokenizer, tiny_basics_lm, write_tiny_run
from cs336_alignment.text_tokenizer import BasicsTokenizer
from cs336_alignment.training import EIConfig, GRPOConfig, run_expert_iteration, run_grpo
from cs336_alignment.training.eval_config import QuestionSet
from cs336_alignment.training.parallel import RolloutEngine
from cs336_basics.testing import one_thread  # noqa: F401 (autouse: one torch thread)

LOSS_TOL = 1e-5  # absolute, on SFT losses of ~20 nats summed per example and GRPO/DPO losses below 1
WEIGHT_TOL = 2e-5  # absolute, on weights of order 0.1 after 3 AdamW steps at lr 1e-2
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Path:
    """The tiny run; 11 SFT examples, so that a rank's half of a batch of 8 is never a whole epoch (with
    write_tiny_run's 4 examples both halves would hold the same examples, and any split would pass)."""
    root = write_tiny_run(tmp_path_factory.mktemp("parallel"))
    rows = [{"prompt": f"Question {i}: what is {i} plus 3?", "response": f" Answer: {i + 3}." + " ok" * (i % 3)}
            for i in range(11)]
    (root / "sft11.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture(scope="module")
def tok():
    return BasicsTokenizer(basics_tokenizer())


def _common(setup: Path, out: Path) -> list[str]:
    return ["--basics-run", str(setup / "run"), "--basics-tokenizer", str(setup / "tok"), "--out-dir", str(out),
            "--device", "cpu"]


def _sft(setup: Path, out: Path, *extra: str) -> list[str]:  # 8 examples a step in 4 micro-batches of 2
    return ["sft", *_common(setup, out), "--data", str(setup / "sft11.jsonl"), "--num-steps", "3",
            "--train-batch-size", "8", "--gradient-accumulation-steps", "4", "--learning-rate", "1e-2", *extra]


def _dpo(setup: Path, out: Path, *extra: str) -> list[str]:
    return ["dpo", *_common(setup, out), "--data", str(setup / "pairs.jsonl"), "--num-steps", "3",
            "--train-batch-size", "4", "--gradient-accumulation-steps", "2", "--learning-rate", "1e-2",
            "--optimizer", "adamw", *extra]


QUESTIONS = QuestionSet([f"Question {i}: what is {i} plus {i + 3}?" for i in range(4)], ["7"] * 4)
GRPO = GRPOConfig(n_grpo_steps=2, learning_rate=1e-2, rollout_batch_size=8, group_size=4, train_batch_size=8,
                  gradient_accumulation_steps=4, loss_type="grpo_clip", sampling_max_tokens=6, eval_max_tokens=6)


def length_parity(response: str, truth: str) -> dict[str, float]:
    return {"reward": float(len(response) % 2 == 0)}


def _policy(tok, seed: int = 5) -> BasicsCausalLM:
    return BasicsCausalLM(tiny_basics_lm(len(tok), seed=seed, context_length=96)).train()


def _grpo(tok, dist=None, **changes):
    from dataclasses import replace

    policy = _policy(tok)
    history = run_grpo(policy, tok, QUESTIONS, replace(GRPO, **changes), reward_fn=length_parity, dist=dist)
    return [h for h in history if h["kind"] == "train"], {k: v.clone() for k, v in policy.state_dict().items()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, jobs: list, results) -> None:
    """One rank of the world-size-2 job: each job called in order, in one gloo group the loops reuse."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    outputs: list = []
    try:
        dist.init_process_group("gloo", timeout=timedelta(seconds=60))
        for job in jobs:
            outputs.append(job())
        dist.destroy_process_group()
    except BaseException as e:  # reported to the test through the queue
        outputs.append(repr(e))
    results.put((rank, pickle.dumps(outputs)))  # tensors by value (not torch's shared-memory handles)


def _world2(jobs: list) -> dict[int, list]:
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    port = _free_port()
    ranks = [context.Process(target=_rank, args=(r, port, jobs, results)) for r in range(2)]
    for p in ranks:
        p.start()
    try:
        outcome = {rank: pickle.loads(outputs) for rank, outputs in (results.get(timeout=120) for _ in ranks)}
    finally:
        for p in ranks:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert all(len(out) == len(jobs) for out in outcome.values()), outcome
    return outcome


def _ddp_grpo(tok):
    from cs336_basics.training.distributed import Dist, read_launch

    return _grpo(tok, Dist(read_launch(), "ddp", torch.device("cpu"), 60.0), rollout_device="cpu")


@pytest.fixture(scope="module")
def runs(setup, tok, tmp_path_factory):
    """The single-process references, then the same runs at world size 2 (one forked job)."""
    root = tmp_path_factory.mktemp("runs")
    single = {"sft": run(_sft(setup, root / "sft1")), "dpo": run(_dpo(setup, root / "dpo1")), "grpo": _grpo(tok)}
    outcome = _world2([
        lambda: run(_sft(setup, root / "sft2", "--parallel", "ddp")),
        lambda: run(_dpo(setup, root / "dpo2", "--parallel", "ddp")),
        lambda: _ddp_grpo(tok),
    ])
    return root, single, outcome


def _checkpoint(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)["model"]


def _assert_weights_close(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, atol=WEIGHT_TOL, rtol=0, msg=name)


@pytest.mark.parametrize("loop", ["sft", "dpo"])
def test_cli_loop_at_world_size_2_trains_like_one_process_with_the_same_global_batch(runs, loop):
    root, single, outcome = runs
    index = {"sft": 0, "dpo": 1}[loop]
    rank0, rank1 = outcome[0][index], outcome[1][index]
    assert isinstance(rank0, list) and rank0 == rank1  # the metrics every rank returns are the whole batch's
    train = [h for h in single[loop] if h["kind"] == "train"]
    parallel = [h for h in rank0 if h["kind"] == "train"]
    assert [h["step"] for h in parallel] == [h["step"] for h in train] == [1, 2, 3]
    for got, want in zip(parallel, train, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], abs=LOSS_TOL)
    assert train[-1]["loss"] < train[0]["loss"] - 0.05  # it learned: the comparison is not of noise
    if loop == "sft":
        assert [h["response_tokens"] for h in parallel] == [h["response_tokens"] for h in train]
    else:
        assert [h["train_accuracy"] for h in parallel] == [h["train_accuracy"] for h in train]
    # rank 0 alone wrote the folder: each step logged once, and the checkpoint holds the trained weights
    logged = [json.loads(line) for line in (root / f"{loop}2" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if r["kind"] == "train"] == [1, 2, 3]
    _assert_weights_close(_checkpoint(root / f"{loop}2"), _checkpoint(root / f"{loop}1"))


def test_grpo_at_world_size_2_with_rollouts_on_rank_0s_engine_trains_like_one_process(runs, tok):
    _, single, outcome = runs
    (train, weights), (rank0, weights0), (rank1, weights1) = single["grpo"], outcome[0][2], outcome[1][2]
    assert rank0 == rank1
    assert [h["reward_mean"] for h in rank0] == [h["reward_mean"] for h in train]  # the same rollouts
    assert 0 < train[0]["reward_mean"] < 1  # advantages are not all zero: the steps had a gradient
    for got, want in zip(rank0, train, strict=True):
        for key in ("loss", "ratio_mean", "clip_fraction"):
            assert got[key] == pytest.approx(want[key], abs=LOSS_TOL), key
    _assert_weights_close(weights0, weights)
    _assert_weights_close(weights1, weights)
    moved = max(float((weights[k] - v).abs().max()) for k, v in _policy(tok).state_dict().items())
    assert moved > 1e-3  # the steps changed the weights well beyond the tolerance


@pytest.mark.parametrize("push", [True, False], ids=["pushed", "mutation-no-push"])
@pytest.mark.parametrize("loop", ["grpo", "ei"])
def test_the_rollout_engine_holds_the_policys_weights_at_every_rollout(tok, monkeypatch, loop, push):
    """`rollout_device`: a copy of the policy on its own device samples; after every step the policy's weights
    are pushed to it. Checked at every generate call (rollouts and evaluations) and at the end; with the push
    disabled the same check fails, which shows it can."""
    policy = _policy(tok, seed=3)
    engines, checks = [], []
    generate = RolloutEngine.generate

    def checked_generate(self, prompts, params):
        engines.append(self)
        theirs, ours = self.model.state_dict(), policy.state_dict()
        checks.append(theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in ours))
        assert all(t.device.type == "cpu" and t is not ours[k] for k, t in theirs.items())  # a copy, not shared
        return generate(self, prompts, params)

    monkeypatch.setattr(RolloutEngine, "generate", checked_generate)
    if not push:
        monkeypatch.setattr(RolloutEngine, "load_policy_weights", lambda self, policy: None)
    if loop == "grpo":
        run_grpo(policy, tok, QUESTIONS, GRPOConfig(**{**GRPO.__dict__, "n_grpo_steps": 2, "rollout_device": "cpu"}),
                 eval_questions=QUESTIONS.head(1), reward_fn=length_parity)
        expected_calls = 1 + 2 + 1  # evaluation at step 0, two rollout batches, evaluation at the end
    else:
        config = EIConfig(n_ei_steps=2, ei_batch_size=2, rollouts_per_question=2, sampling_max_tokens=6,
                          train_batch_size=2, gradient_accumulation_steps=1, learning_rate=1e-2,
                          rollout_device="cpu")
        run_expert_iteration(policy, tok, QUESTIONS, config, reward_fn=lambda response, truth: {"reward": 1.0})
        expected_calls = 2  # one rollout round each
    assert len(checks) == expected_calls and len(set(map(id, engines))) == 1
    final = engines[0].model.state_dict()
    final_equal = all(torch.equal(final[k], v) for k, v in policy.state_dict().items())
    if push:
        assert all(checks) and final_equal
        assert engines[0].pushes == 1 + 2  # once at the start (a resumed policy), then after every step
    else:  # the mutation: the first rollouts match (the copy is made from the initial policy), later ones not
        assert checks[0] and not all(checks) and not final_equal


@pytest.fixture
def clean_env(monkeypatch):
    for name in TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


LAUNCH = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1", "LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "2"}


@pytest.mark.parametrize(("env", "argv", "needle"), [
    ({}, ["sft", "--parallel", "ddp"], "--parallel ddp needs a torchrun launch"),
    (LAUNCH, ["sft"], "--parallel none in a launch of 2 processes"),
    (LAUNCH, ["sft", "--parallel", "ddp", "--train-batch-size", "3", "--gradient-accumulation-steps", "3"],
     "--gradient-accumulation-steps 3 (micro-batches of the global --train-batch-size 3) is not divisible by "
     "world size 2"),
    (LAUNCH, ["grpo", "--parallel", "ddp", "--rollout-device", "cuda:1"], "--rollout-device cuda:1 is rank 1's "
     "training GPU; with 2 ranks give the engine its own, e.g. cuda:2"),
    (LAUNCH, ["sft", "--parallel", "ddp", "--packed"], "--packed instruction tuning does not run with --parallel"),
    (LAUNCH, ["dpo", "--parallel", "ddp", "--reference-device", "cpu"], "--reference-device with --parallel ddp"),
])
def test_bad_launches_are_one_line_errors_reported_by_rank_0(setup, tmp_path, clean_env, capsys, env, argv,
                                                              needle):
    data = {"sft": "sft.jsonl", "grpo": "math.jsonl", "dpo": "pairs.jsonl"}[argv[0]]
    full = [argv[0], *_common(setup, tmp_path / "run"), "--data", str(setup / data), *argv[1:]]
    for name, value in env.items():
        clean_env.setenv(name, value)
    with pytest.raises(SystemExit) as exit_info:
        run(full)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("cs336-align: error:") and needle in err, err
    assert not (tmp_path / "run").exists()
    if env:  # the other rank meets the same error and stays silent: one line for the whole launch
        clean_env.setenv("RANK", "1")
        with pytest.raises(SystemExit):
            run(full)
        assert capsys.readouterr().err == ""


def test_rollout_device_reaches_the_vllm_engine_as_its_device(monkeypatch):
    """With the vLLM backend, `--rollout-device` is the engine's `device=` (a stand-in vllm module records it)."""
    import sys
    import types

    from cs336_alignment.training.grpo_loop import _vllm_backend

    built = {}

    def fake_llm(**kwargs):
        built.update(kwargs)
        return types.SimpleNamespace()

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=fake_llm))
    _vllm_backend(GRPOConfig(rollout_device="cuda:1", seed=7), "model/dir")
    assert built["device"] == "cuda:1" and built["model"] == "model/dir" and built["seed"] == 7
    built.clear()
    _vllm_backend(GRPOConfig(), "model/dir")
    assert built["model"] == "model/dir" and "device" not in built  # the engine's own default device
