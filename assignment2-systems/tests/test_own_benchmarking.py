"""Benchmark harness on CPU: bench-model, mixed-precision, bench-allreduce (gloo) and bench-ddp (gloo) produce
complete, sane results; the pure helpers agree with independent computations; bad arguments give one-line errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from cs336_systems.benchmarking.allreduce import summarize_run
from cs336_systems.benchmarking.ddp_bench import bucket_partition
from cs336_systems.benchmarking.model_sizes import HANDOUT_SIZES, model_config, parameter_count, theoretical_bytes
from cs336_systems.cli import main

TINY_MODEL = ["--sizes", "tiny", "--vocab-size", "256", "--warmup", "1", "--steps", "2", "--no-progress"]


def test_bench_model_tiny_cpu(tmp_path) -> None:
    assert main(["bench-model", *TINY_MODEL, "--contexts", "16", "--precisions", "fp32", "bf16",
                 "--device", "cpu", "--out-dir", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "model_bench.json").read_text())
    assert (tmp_path / "model_bench.md").is_file() and (tmp_path / "model_bench.png").is_file()
    assert res["config"]["sizes"] == ["tiny"] and res["env"]["device"] == "cpu"
    assert len(res["rows"]) == 2
    from cs336_basics.model import TransformerLM

    for row in res["rows"]:
        assert row["params"] == TransformerLM(model_config("tiny", row["context"], 256)).num_parameters()
        assert set(row["modes"]) == {"forward", "forward_backward", "train_step"}
        for r in row["modes"].values():
            assert r["status"] == "ok" and r["n"] == 2 and len(r["warmup_ms"]) == 1
            assert 0 < r["min_ms"] <= r["mean_ms"] <= r["max_ms"] and r["std_ms"] >= 0
        assert math.isclose(row["backward_ms"], row["modes"]["forward_backward"]["mean_ms"]
                            - row["modes"]["forward"]["mean_ms"])
    md = (tmp_path / "model_bench.md").read_text()
    assert md.count("| tiny |") == 2


def test_bench_model_records_oom(tmp_path, monkeypatch) -> None:
    import cs336_basics.model

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80 GiB")

    monkeypatch.setattr(cs336_basics.model, "TransformerLM", out_of_memory)
    assert main(["bench-model", *TINY_MODEL, "--device", "cpu", "--out-dir", str(tmp_path)]) == 0
    row = json.loads((tmp_path / "model_bench.json").read_text())["rows"][0]
    assert {r["status"] for r in row["modes"].values()} == {"OOM"}
    assert "| OOM |" in (tmp_path / "model_bench.md").read_text()


def test_mixed_precision_matches_numpy(tmp_path) -> None:
    assert main(["mixed-precision", "--device", "cpu", "--out-dir", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "mixed_precision.json").read_text())["accumulation"]
    by = {(r["accumulator"], r["addend"], r["cast"]): r["result"] for r in rows}
    s16 = np.float16(0)
    for _ in range(1000):
        s16 = np.float16(s16 + np.float16(0.01))  # round to half after every addition, as torch does
    s32 = np.float32(0)
    for _ in range(1000):
        s32 = np.float32(s32 + np.float32(np.float16(0.01)))
    assert by[("float16", "float16", False)] == float(s16)
    assert by[("float32", "float16", True)] == pytest.approx(float(s32), abs=1e-6)
    assert abs(by[("float16", "float16", False)] - 10) > 10 * abs(by[("float32", "float32", False)] - 10)


def test_bench_allreduce_gloo(tmp_path) -> None:
    assert main(["bench-allreduce", "--backends", "gloo", "--world-sizes", "2", "--sizes-mb", "0.01", "0.1",
                 "--warmup", "1", "--iters", "2", "--start-method", "fork", "--out-dir", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "allreduce_bench.json").read_text())
    (run,) = res["runs"]
    assert run["status"] == "ok" and [r["size_mb"] for r in run["rows"]] == [0.01, 0.1]
    for r in run["rows"]:
        assert r["mean_ms"] > 0 and r["bytes"] == int(r["size_mb"] * 2**20) // 4 * 4
        assert r["busbw_gbps"] == pytest.approx(r["algbw_gbps"])  # 2(n-1)/n = 1 for two ranks
    assert (tmp_path / "allreduce_bench.png").is_file()


def test_summarize_run_takes_slowest_rank() -> None:
    ranks = [[(1.0, 2**20, [0.001, 0.003])], [(1.0, 2**20, [0.002, 0.001])], [(1.0, 2**20, [0.0, 0.0])],
             [(1.0, 2**20, [0.0, 0.0])]]
    (row,) = summarize_run(ranks, world=4)
    assert row["mean_ms"] == pytest.approx(2.5)  # max per iteration: 2 ms, 3 ms
    assert row["algbw_gbps"] == pytest.approx(2**20 / 0.0025 / 1e9)
    assert row["busbw_gbps"] == pytest.approx(row["algbw_gbps"] * 1.5)


def test_bench_ddp_gloo_tiny(tmp_path) -> None:
    assert main(["bench-ddp", "--backend", "gloo", "--size", "tiny", "--vocab-size", "256", "--context", "16",
                 "--batch-size", "2", "--warmup", "1", "--steps", "2", "--comm-iters", "1",
                 "--bucket-sizes-mb", "0.25", "--start-method", "fork", "--out-dir", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "ddp_bench.json").read_text())
    labels = [v["label"] for v in res["variants"]]
    assert labels == ["none", "naive", "flat", "individual", "bucketed 0.25 MiB"]
    for v in res["variants"]:
        assert v["status"] == "ok", v
        assert v["total"]["mean_ms"] > 0 and v["comm_alone_ms"] >= 0
        assert v["hidden_share"] is None if v["variant"] == "none" else 0 <= v["hidden_share"] <= 1
    mem = {(m["setup"], m["rank"]): m for m in res["memory"]}
    full = mem[("adamw", 0)]
    n = full["n_params"]
    assert full["params_mib"] * 2**20 == n * 4 and full["optimizer_state_mib"] == 2 * full["params_mib"]
    # ZeRO-1: the two ranks' optimizer states partition the full state
    assert mem[("zero1", 0)]["optimizer_state_mib"] + mem[("zero1", 1)]["optimizer_state_mib"] == pytest.approx(
        full["optimizer_state_mib"])
    assert mem[("zero1", 0)]["theory_mib"]["optimizer_state"] == pytest.approx(full["optimizer_state_mib"] / 2)
    if mem[("fsdp", 0)]["status"] == "ok":  # FSDP shards the weights: far less than a full copy per rank
        assert mem[("fsdp", 0)]["params_mib"] < 0.6 * full["params_mib"]
    assert (tmp_path / "ddp_bench.png").is_file()


def test_bucket_partition_reverse_order_and_limits() -> None:
    sizes = [10, 300, 5, 5, 200, 1000, 7]  # float32 elements
    params = [torch.nn.Parameter(torch.zeros(s)) for s in sizes]
    limit_mb = 1024 * 4 / 2**20  # 1024 elements
    buckets = bucket_partition(params, limit_mb)
    assert [p for b in buckets for p in b] == params[::-1]
    for b in buckets:
        assert len(b) == 1 or sum(p.numel() for p in b) <= 1024
    assert [[p.numel() for p in b] for b in buckets] == [[7, 1000], [200, 5, 5, 300, 10]]


@pytest.mark.parametrize("size", HANDOUT_SIZES)
def test_parameter_count_closed_form(size: str) -> None:
    from cs336_basics.model import TransformerLM

    cfg = model_config(size, 128)
    assert parameter_count(cfg) == TransformerLM(cfg, device="meta").num_parameters()


def test_theoretical_bytes() -> None:
    t = theoretical_bytes(1000, 4, "zero1")
    assert (t["params"], t["grads"], t["optimizer_state"]) == (4000, 4000, 2000)
    f = theoretical_bytes(1000, 4, "fsdp")
    assert f["total"] == pytest.approx(theoretical_bytes(1000, 1, "none")["total"] / 4)


@pytest.mark.parametrize(("argv", "message"), [
    (["bench-model", "--sizes", "huge", "--device", "cpu"], "bench-model: unknown model size 'huge'"),
    (["bench-model", "--steps", "0", "--device", "cpu"], "--steps must be >= 1"),
    (["bench-model", "--modes", "inference", "--device", "cpu"], "bench-model: modes: 'inference'"),
    (["bench-model", "--device", "tpu"], "bench-model: device must be cpu or cuda"),
    (["bench-allreduce", "--world-sizes", "1"], "bench-allreduce: world sizes must be at least 2"),
    (["bench-allreduce", "--backends", "mpi"], "bench-allreduce: backend 'mpi'"),
    (["bench-allreduce", "--backends", "nccl", "--start-method", "fork"], "bench-allreduce: nccl workers must not"),
    (["bench-ddp", "--variants", "zero3", "--backend", "gloo"], "bench-ddp: variant 'zero3'"),
    (["bench-ddp", "--backend", "gloo", "--bucket-sizes-mb", "0"], "--bucket-sizes-mb must be > 0"),
    (["mixed-precision", "--n", "0"], "--n must be >= 1"),
])
def test_argument_errors_are_one_line(argv: list[str], message: str, capsys) -> None:
    # The shared boundary (cs336_basics.cli_support.run_command): exit 2 and one `cs336-systems: error:` line
    # (these used to be SystemExit("<message>"), exit 1).
    assert main(argv) == 2
    text = capsys.readouterr().err
    assert text.startswith(f"cs336-systems: error: {message}") and text.count("\n") == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_requested_without_gpu(capsys) -> None:
    assert main(["bench-model", "--device", "cuda"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err
    assert main(["bench-ddp", "--backend", "nccl"]) == 2
    assert "needs that many GPUs" in capsys.readouterr().err


def test_render_from_json(tmp_path) -> None:
    assert main(["bench-model", *TINY_MODEL, "--modes", "forward", "--device", "cpu", "--out-dir",
                 str(tmp_path / "a")]) == 0
    assert main(["bench-model", "--render", str(tmp_path / "a" / "model_bench.json"), "--out-dir",
                 str(tmp_path / "b")]) == 0
    assert (tmp_path / "b" / "model_bench.md").read_text() == (tmp_path / "a" / "model_bench.md").read_text()
