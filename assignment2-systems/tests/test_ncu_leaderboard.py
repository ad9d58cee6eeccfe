"""`benchmarks/ncu_leaderboard.py`: the metric list it hands ncu and its reading of ncu's raw CSV (no GPU, no ncu)."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "ncu_leaderboard.py"


@pytest.fixture(scope="module")
def ncu_script():
    spec = importlib.util.spec_from_file_location("ncu_leaderboard", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


QUERY = """\
Device NVIDIA H100 80GB HBM3 (GH100)
-----------------------------------------------------------------------
Metric Name                                      Metric Type  Metric Unit  Metric Description
gpu__time_duration                               Counter      nsecond      total duration in nanoseconds
smsp__issue_active                               Counter                   # of cycles where an SMSP issued
sm__inst_executed_pipe_xu                        Counter      inst         # of warp instructions executed by xu pipe
smsp__average_warps_issue_stalled_barrier_per_issue_active   Ratio       ratio of warps stalled on a barrier
smsp__average_warps_issue_stalled_wait_per_issue_active      Ratio       ratio of warps stalled on a fixed wait
smsp__warps_issue_stalled_barrier                Counter      warp         not a per-issue ratio
"""


def test_metric_list_keeps_only_names_this_ncu_lists_and_every_stall_ratio(ncu_script):
    names = ncu_script.metric_list(QUERY)
    assert names == [
        "gpu__time_duration.sum",
        "smsp__issue_active.avg.pct_of_peak_sustained_active",
        "sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active",
        "smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio",
        "smsp__average_warps_issue_stalled_wait_per_issue_active.ratio",
    ]
    # a name ncu does not list would make it refuse the whole run: none of WANTED's absent ones slip in
    assert not any(n.startswith("sm__pipe_tensor_op_gmma") for n in names)


HEADER = ",".join(f'"{name}"' for name in [
    "ID", "Kernel Name", "gpu__time_duration.sum", "smsp__issue_active.avg.pct_of_peak_sustained_active",
    "smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio",
    "smsp__average_warps_issue_stalled_wait_per_issue_active.ratio"])
RAW = "==PROF== Connected to process 123\n" + HEADER + """
"","","msecond","%","",""
"0","flash_fwd_kernel","1.25","41.5","0.20","1.10"
"1","cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_3","3,180.5","","0.05","0.50"
"""


def test_raw_csv_becomes_one_record_per_kernel_in_microseconds(ncu_script, tmp_path):
    raw = tmp_path / "raw.csv"
    raw.write_text(RAW)
    records = ncu_script.summarize(*ncu_script.parse_raw(raw))
    assert [r["class"] for r in records] == ["triton forward", "cudnn backward"]
    assert records[0]["metrics"]["gpu__time_duration.sum"] == pytest.approx(1250.0)  # 1.25 ms
    assert records[1]["metrics"]["gpu__time_duration.sum"] == pytest.approx(3180500.0)  # thousands separator
    assert records[1]["metrics"]["smsp__issue_active.avg.pct_of_peak_sustained_active"] is None  # empty cell
    text = ncu_script.table(records)
    assert "| triton forward | 1250 |" in text
    assert text.splitlines()[2].endswith("| wait 1.10, barrier 0.20 |")  # largest stall first


def test_a_csv_without_kernel_rows_is_a_clear_error(ncu_script, tmp_path):
    raw = tmp_path / "raw.csv"
    raw.write_text("==PROF== Disconnected\n==WARNING== No kernels were profiled.\n")
    with pytest.raises(SystemExit, match="no kernel rows"):
        ncu_script.parse_raw(raw)
