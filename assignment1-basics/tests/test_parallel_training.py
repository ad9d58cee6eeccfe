"""`cs336-basics train --parallel ddp|fsdp` (issue 21) on the CPU with the gloo backend at world size 2.

- DDP and FSDP2 (each with 2 micro-batches per rank) against single-process training with the same global
  batch: every step's loss, the validation loss and the final weights (the consolidated checkpoint.pt).
- A sharded checkpoint written by FSDP at world size 2 resumes at world size 2 (under FSDP and under DDP) and
  at world size 1 (from the sharded folder and from the consolidated checkpoint.pt) with the same next-step
  loss as the uninterrupted single-process run; a half-written checkpoint folder is ignored and cleaned up.
- SIGTERM to one rank stops every rank after the same step, with a checkpoint that resumes.
- A rank that raises ends the whole torchrun job non-zero within 60 s, its error printed once.
- Bad launches are one-line errors (reported by rank 0 only).

The world-size-2 runs are two processes forked from this one (torch already loaded: no import cost), which
initialise the gloo group themselves; the failure test launches the real `torchrun`
(`python -m torch.distributed.run`). Tolerances are for fp32 on the CPU: the reductions run in another order
(two ranks' means averaged, micro-batch gradients summed), so results agree to rounding, not bit for bit.
"""

import json
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cs336_basics.cli import main

VOCAB = 64
TINY = ["--vocab-size", str(VOCAB), "--d-model", "16", "--num-layers", "2", "--num-heads", "2", "--d-ff", "32",
        "--context-length", "8", "--batch-size", "8", "--device", "cpu", "--no-progress", "--log-interval", "1",
        "--eval-interval", "50", "--eval-batches", "2", "--warmup-steps", "2", "--lr-max", "1e-2",
        "--lr-min", "1e-3", "--max-steps", "6"]
LOSS_TOL = 2e-5  # absolute, on losses of about 4.2 nats
WEIGHT_TOL = 2e-5  # absolute, on weights of order 0.1-1 after 6 AdamW steps at lr 1e-2
PROG = "cs336-basics train: error:"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tokens")
    rng = np.random.default_rng(0)
    np.save(root / "train.npy", rng.integers(0, VOCAB, 20_000).astype(np.uint16))
    np.save(root / "val.npy", rng.integers(0, VOCAB, 2_000).astype(np.uint16))
    return root


def _args(data: Path, out_dir: Path, *extra: str) -> list[str]:
    return ["train", "--train-data", str(data / "train.npy"), "--val-data", str(data / "val.npy"),
            "--out-dir", str(out_dir), *TINY, *extra]


def _train(args: list[str]) -> int:
    """`cs336-basics train` in this process with one thread (as each rank runs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main(args)
    finally:
        torch.set_num_threads(threads)


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _losses(run: Path) -> dict[tuple[int, str], float]:
    return {(r["step"], r["split"]): r["loss"] for r in _records(run) if r["split"] in ("train", "val")}


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)["model"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, jobs: list, results) -> None:
    """One rank of the world-size-2 job: `cs336-basics train` invocations and folder copies (rank 0), in
    order, all in one gloo group that `train` reuses."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    codes = []
    try:
        dist.init_process_group("gloo", timeout=__import__("datetime").timedelta(seconds=60))
        for kind, payload in jobs:
            if kind == "train":
                codes.append(main(payload))
            elif kind == "sigterm":  # train, with a SIGTERM to rank 1 alone during step 3
                codes.append(_train_with_sigterm_on_rank_1(payload, rank))
            else:  # a change to the folders (a copy, a half-written checkpoint), on rank 0
                if rank == 0:
                    payload()
                dist.barrier()
        dist.destroy_process_group()
    except BaseException as e:  # reported to the test through the queue
        codes.append(repr(e))
    results.put((rank, codes))


def _train_with_sigterm_on_rank_1(args: list[str], rank: int):
    import signal

    from cs336_basics.training import trainer

    make_step = trainer._make_step

    def signalled_make_step(*a, **k):
        step = make_step(*a, **k)

        def step_with_signal(tokens, lr, index):
            if rank == 1 and index == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            return step(tokens, lr, index)

        return step_with_signal

    trainer._make_step = signalled_make_step
    try:
        return main(args)
    except SystemExit as e:  # TrainingStopped
        return e.code
    finally:
        trainer._make_step = make_step


def _world2(jobs: list) -> None:
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    port = _free_port()
    ranks = [context.Process(target=_rank, args=(r, port, jobs, results)) for r in range(2)]
    for p in ranks:
        p.start()
    try:
        outcome = dict(results.get(timeout=240) for _ in ranks)
    finally:
        for p in ranks:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    expected = [0 if kind == "train" else 143 for kind, _ in jobs if kind in ("train", "sigterm")]
    assert outcome == {0: expected, 1: expected}, outcome


def _half_written(run: Path, step: int) -> Path:
    """What a crash while writing the checkpoint of `step` leaves: a temporary folder that LATEST never names."""
    partial = run / "dcp" / f".tmp-step_{step:08d}"
    partial.mkdir()
    (partial / "__0_0.distcp").write_bytes(b"half a shard")
    return partial


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory) -> Path:
    """Single-process reference and world-size-2 runs (DDP, FSDP, a split FSDP run and its resumptions)."""
    root = tmp_path_factory.mktemp("runs")
    assert _train(_args(data, root / "single")) == 0
    start = time.monotonic()
    _world2([
        ("train", _args(data, root / "ddp", "--parallel", "ddp", "--grad-accum", "2")),
        ("train", _args(data, root / "fsdp", "--parallel", "fsdp", "--grad-accum", "2")),
        ("train", _args(data, root / "split", "--parallel", "fsdp", "--stop-after-steps", "3")),
        ("do", lambda: shutil.copytree(root / "split", root / "resume2_fsdp")),
        ("do", lambda: shutil.copytree(root / "split", root / "resume2_ddp")),
        ("do", lambda: _half_written(root / "resume2_fsdp", 5)),
        ("train", _args(data, root / "resume2_fsdp", "--parallel", "fsdp", "--resume", "--stop-after-steps", "1")),
        ("train", _args(data, root / "resume2_ddp", "--parallel", "ddp", "--resume", "--stop-after-steps", "1")),
        ("sigterm", _args(data, root / "stopped", "--parallel", "ddp")),
    ])
    print(f"world-size-2 job: {time.monotonic() - start:.1f} s")
    return root


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_world_size_2_trains_like_one_process_with_the_same_global_batch(runs, mode):
    single, parallel = _losses(runs / "single"), _losses(runs / mode)
    assert sorted(parallel) == sorted(single) == [(s, "train") for s in range(1, 7)] + [(6, "val")]
    for key, loss in single.items():
        assert parallel[key] == pytest.approx(loss, abs=LOSS_TOL), key
    assert single[(6, "train")] < single[(1, "train")] - 0.05  # it learned: the comparison is not of noise
    reference, weights = _weights(runs / "single"), _weights(runs / mode)
    assert weights.keys() == reference.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(weights[name], tensor, atol=WEIGHT_TOL, rtol=0, msg=name)
    # the sharded checkpoint of the last step sits beside the consolidated file, named by LATEST
    assert (runs / mode / "dcp" / "LATEST").read_text().strip() == "step_00000006"
    assert sorted(p.name for p in (runs / mode / "dcp").iterdir()) == ["LATEST", "step_00000006"]


def test_a_world_size_2_checkpoint_resumes_at_world_size_2_and_1_with_the_same_next_step_loss(runs, data):
    expected = _losses(runs / "single")[(4, "train")]
    split = _losses(runs / "split")
    assert max(step for step, _ in split) == 3
    for step in (1, 2, 3):
        assert split[(step, "train")] == pytest.approx(_losses(runs / "single")[(step, "train")], abs=LOSS_TOL)

    shutil.copytree(runs / "split", runs / "resume1_dcp")
    (runs / "resume1_dcp" / "checkpoint.pt").unlink()  # only the sharded checkpoint: read without a group
    _half_written(runs / "resume1_dcp", 5)  # never named by LATEST: the previous checkpoint is read
    shutil.copytree(runs / "split", runs / "resume1_pt")  # the consolidated checkpoint.pt
    for run in ("resume1_dcp", "resume1_pt"):
        assert _train(_args(data, runs / run, "--resume", "--stop-after-steps", "1")) == 0

    for run in ("resume2_fsdp", "resume2_ddp", "resume1_dcp", "resume1_pt"):
        losses = _losses(runs / run)
        assert max(step for step, _ in losses) == 4, run
        assert losses[(4, "train")] == pytest.approx(expected, abs=LOSS_TOL), run
        for step in (1, 2, 3):  # the log of the run it continues is kept
            assert losses[(step, "train")] == split[(step, "train")], run
    # the next sharded checkpoint removes the leftover and the superseded step
    assert sorted(p.name for p in (runs / "resume2_fsdp" / "dcp").iterdir()) == ["LATEST", "step_00000004"]


def test_a_signal_to_one_rank_stops_every_rank_after_the_same_step_with_a_checkpoint_that_resumes(runs, data):
    """SIGTERM reached rank 1 alone during step 3: the ranks agree, checkpoint step 3 together (sharded and
    consolidated) and exit 143; the run then resumes in one process and ends as the uninterrupted run."""
    run = runs / "stopped"
    records = _records(run)
    assert records[-1]["split"] == "event" and records[-1]["signal"] == "SIGTERM" and records[-1]["step"] == 3
    assert (run / "dcp" / "LATEST").read_text().strip() == "step_00000003"
    assert torch.load(run / "checkpoint.pt", weights_only=True, map_location="cpu")["iteration"] == 3
    assert _train(_args(data, run, "--resume")) == 0
    single, resumed = _losses(runs / "single"), _losses(run)
    assert sorted(resumed) == sorted(single)
    for key, loss in single.items():
        assert resumed[key] == pytest.approx(loss, abs=LOSS_TOL), key


def test_consolidate_writes_the_plain_checkpoint_that_generate_reads(runs, capsys):
    from cs336_basics.hf.interop import load_run

    out = runs / "consolidated.pt"
    assert main(["consolidate", "--run-dir", str(runs / "fsdp"), "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["step"] == 6 and report["world_size"] == 2 and report["parallel"] == "fsdp"
    state = torch.load(out, map_location="cpu", weights_only=True)
    model, _ = load_run(str(runs / "fsdp"))
    assert state["iteration"] == 6 and len(state["optimizer"]["state"]) == len(list(model.parameters()))
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state["model"][name]), name


FAILING = """
    import os, sys, time
    from cs336_basics.training import trainer

    make_step = trainer._make_step

    def failing_make_step(*args, **kwargs):
        step = make_step(*args, **kwargs)

        def step_or_fail(tokens, lr, index):
            if os.environ["RANK"] == "1" and index == 2:
                with open(os.environ["FAILED_AT"], "w") as f:
                    f.write(repr(time.time()))
                raise ZeroDivisionError("deliberate failure on rank 1 at step 3")
            return step(tokens, lr, index)

        return step_or_fail

    trainer._make_step = failing_make_step
    from cs336_basics.cli import main

    sys.exit(main(sys.argv[1:]))
"""


def test_a_failing_rank_ends_the_torchrun_job_non_zero_within_60_s_with_its_error_once(data, tmp_path):
    script = tmp_path / "failing_rank.py"
    script.write_text(textwrap.dedent(FAILING))
    failed_at = tmp_path / "failed_at"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--max-restarts", "0",
               "--master-port", str(_free_port()), str(script),
               *_args(data, tmp_path / "run", "--parallel", "ddp", "--max-steps", "200")]
    start = time.monotonic()
    result = subprocess.run(command, cwd=tmp_path, env={**ENV, "FAILED_AT": str(failed_at)}, capture_output=True,
                            text=True, timeout=300)
    ended = time.time()
    assert result.returncode != 0, result.stderr
    assert failed_at.exists(), result.stderr
    assert ended - float(failed_at.read_text()) < 60, (ended - float(failed_at.read_text()), result.stderr)
    assert result.stderr.count("ZeroDivisionError: deliberate failure on rank 1 at step 3") == 1, result.stderr
    # rank 0 either ends on its own with one line or is stopped by torchrun's agent; never a second traceback
    assert result.stderr.count("Traceback (most recent call last)") <= 2, result.stderr  # rank 1's + torchrun's
    assert "rank 0: a collective failed" in result.stderr or "SIGTERM" in result.stderr, result.stderr
    print(f"failing-rank job: {time.monotonic() - start:.1f} s in all, "
          f"{ended - float(failed_at.read_text()):.1f} s from the failure to the end")


def _one_line(capsys, code: int) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith(PROG), err
    return err


LAUNCH = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1", "LOCAL_RANK": "0"}


@pytest.mark.parametrize(("env", "flags", "needle"), [
    ({}, ["--parallel", "ddp"], "--parallel ddp needs a torchrun launch"),
    ({}, ["--parallel", "fsdp"], "--parallel fsdp needs a torchrun launch"),
    ({"RANK": "0", "WORLD_SIZE": "3"}, ["--parallel", "fsdp"],
     "--batch-size 8 (the global batch) is not divisible by world size 3 x --grad-accum 1 = 3"),
    ({"RANK": "0", "WORLD_SIZE": "2"}, ["--parallel", "ddp", "--grad-accum", "8"],
     "not divisible by world size 2 x --grad-accum 8 = 16"),
    ({"RANK": "0", "WORLD_SIZE": "2"}, [], "--parallel none in a launch of 2 processes"),
    ({"RANK": "0", "WORLD_SIZE": "2"}, ["--parallel", "fsdp", "--optimizer", "muon"], "use --parallel ddp"),
    ({}, ["--grad-accum", "3"], "--batch-size (8) must be divisible by --grad-accum (3)"),
    ({}, ["--fsdp-reshard", "never"], "--fsdp-reshard never needs --parallel fsdp"),
    ({}, ["--fsdp-units", "model"], "--fsdp-units model needs --parallel fsdp"),
    ({"RANK": "0", "WORLD_SIZE": "2"}, ["--parallel", "fsdp", "--fsdp-units", "model", "--fsdp-reshard", "always"],
     "--fsdp-reshard always frees each block after its forward: it needs --fsdp-units block"),
])
def test_bad_launches_are_one_line_errors_before_any_process_group(data, tmp_path, monkeypatch, capsys, env, flags,
                                                                    needle):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in ({**LAUNCH, **env} if env else {}).items():
        monkeypatch.setenv(name, value)
    assert needle in _one_line(capsys, main(_args(data, tmp_path / "run", *flags)))
    assert not (tmp_path / "run").exists()
    if env:  # the other ranks meet the same error and stay silent: one line for the whole launch
        monkeypatch.setenv("RANK", "1")
        assert main(_args(data, tmp_path / "run", *flags)) == 2
        assert capsys.readouterr().err == ""


def test_consolidate_without_a_sharded_checkpoint_is_one_line(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    assert main(["consolidate", "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cs336-basics consolidate: error: no sharded checkpoint in") and err.count("\n") == 1, err


RESHARD_PROBE = """
import json, os, sys
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from cs336_basics.model import TransformerConfig, TransformerLM
from cs336_basics.training.distributed import wrap_model

setting, port = sys.argv[1], sys.argv[2]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
dist.init_process_group("gloo")
model = TransformerLM(TransformerConfig(vocab_size=64, context_length=16, d_model=32, num_layers=2, num_heads=2,
                                        d_ff=64))
wrapped = wrap_model(model, "fsdp", torch.device("cpu"), "fp32", False, fsdp_reshard=setting)
loss = wrapped.forward(torch.randint(0, 64, (2, 16))).float().mean()
sharded = [isinstance(p, DTensor) for p in model.layers[0].parameters()]
loss.backward()  # gathered again (or not) for backward: either way it must complete
dist.destroy_process_group()
print(json.dumps(sharded))
"""


@pytest.mark.parametrize(("setting", "resharded"), [("auto", False), ("never", False), ("always", True)])
def test_fsdp_reshard_decides_whether_one_rank_frees_the_gathered_blocks_after_forward(setting, resharded):
    """In a one-process gloo group (its own interpreter): are a block's weights back to their sharded DTensors
    after forward?"""
    result = subprocess.run([sys.executable, "-c", RESHARD_PROBE, setting, str(_free_port())], capture_output=True,
                            text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    sharded = json.loads(result.stdout.strip().splitlines()[-1])
    assert sharded and set(sharded) == {resharded}


UNITS_PROBE = """
import json, os, sys
import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from cs336_basics.model import TransformerConfig, TransformerLM
from cs336_basics.training.distributed import wrap_model

units, compile, port = sys.argv[1], sys.argv[2] == "1", sys.argv[3]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
dist.init_process_group("gloo")
config = TransformerConfig(vocab_size=64, context_length=16, d_model=32, num_layers=2, num_heads=2, d_ff=64)
torch.manual_seed(0)
plain = TransformerLM(config)
model = TransformerLM(config)
model.load_state_dict(plain.state_dict())
wrapped = wrap_model(model, "fsdp", torch.device("cpu"), "fp32", compile, fsdp_units=units)
errors = []
for step in range(2):  # twice: the second step runs the gathered/compiled path again
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(step))
    loss = wrapped.forward(tokens).float().pow(2).mean()
    loss.backward()
    reference = plain(tokens).float().pow(2).mean()
    reference.backward()
    errors.append(abs(loss.item() - reference.item()))
    for (name, p), q in zip(model.named_parameters(), plain.parameters(), strict=True):
        grad = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        errors.append((grad - q.grad).abs().max().item())
        p.grad, q.grad = None, None
units_seen = {"root": isinstance(model, FSDPModule), "blocks": [isinstance(b, FSDPModule) for b in model.layers]}
dist.destroy_process_group()
print(json.dumps({"max_error": max(errors), **units_seen}))
"""


@pytest.mark.parametrize(("units", "compile", "per_block"), [("auto", False, False), ("model", True, False),
                                                              ("block", False, True)])
def test_fsdp_units_at_world_size_1_shard_the_model_or_its_blocks_and_compute_the_plain_gradients(units, compile,
                                                                                                  per_block):
    """In a one-process gloo group: `--fsdp-units auto` makes the whole model one FSDP unit on one rank, `block`
    one unit per block; either way (and compiled whole) two steps' losses and every gradient equal the plain
    model's."""
    result = subprocess.run([sys.executable, "-c", UNITS_PROBE, units, "1" if compile else "0", str(_free_port())],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["root"] and out["blocks"] == [per_block, per_block]
    assert out["max_error"] < 1e-5
