"""benchmarks/step_clocks_figure.py: nvidia-smi's clock log read and lined up with a traced step report, checked on
hand-made files (times worked out by hand), and the figure drawn from them."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from tests.test_throughput_flags import ROOT

SCRIPT = ROOT / "benchmarks" / "step_clocks_figure.py"
HEADER = ("timestamp, clocks.current.sm [MHz], clocks.current.memory [MHz], power.draw [W], power.limit [W], "
          "temperature.gpu, clocks_event_reasons.active")
# 2026-12-07 17:23:35.097 UTC is 1 796 664 215.097 s after the epoch: 20 794 days × 86 400 + 62 615.097 s
T0 = 20794 * 86400 + 17 * 3600 + 23 * 60 + 35.097


def _module():
    spec = importlib.util.spec_from_file_location("step_clocks_figure", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_log(path, lines):
    path.write_text("\n".join([HEADER, *lines]) + "\n")


def test_clock_log_rows_in_unix_time_and_a_cut_line_skipped(tmp_path):
    log = tmp_path / "clocks.csv"
    _write_log(log, ["2026/12/07 17:23:35.097, 1980, 2619, 122.68, 700.00, 36, 0x0000000000000000",
                     "2026/12/07 17:23:36.147, 1485, 2619, 683.10, 700.00, 48, 0x0000000000000004",
                     "2026/12/07 17:23:36.19"])  # the logger killed mid-line
    samples = _module().read_clock_log(log)
    assert len(samples) == 2
    assert samples[0]["unix"] == pytest.approx(T0, abs=1e-3)
    assert samples[1]["unix"] - samples[0]["unix"] == pytest.approx(1.05, abs=1e-6)
    assert (samples[1]["sm_mhz"], samples[1]["power_w"], samples[1]["reasons"]) == (1485.0, 683.1,
                                                                                     "0x0000000000000004")


def test_a_log_without_the_needed_columns_is_refused(tmp_path):
    log = tmp_path / "other.csv"
    log.write_text("timestamp, temperature.gpu\n2026/12/07 17:23:35.097, 36\n")
    with pytest.raises(ValueError, match=r"clocks\.sm"):
        _module().read_clock_log(log)


def test_steps_at_their_issue_time_without_each_window_first_step():
    # two windows of 3 steps: durations between consecutive ends, the 3rd spanning the sync between windows
    trace = {"issued_s": [0.0, 0.1, 0.2, 0.5, 0.6, 0.7], "step_ms": [50.0, 51.0, 150.0, 52.0, 53.0]}
    assert _module().step_times(trace, steps_per_window=3) == [(0.1, 50.0), (0.2, 51.0), (0.6, 52.0), (0.7, 53.0)]


def test_clock_samples_put_on_the_trace_axis():
    samples = [{"unix": 100.0}, {"unix": 100.5}, {"unix": 101.5}]
    assert [s["t"] for s in _module().clocks_during(samples, origin_unix=100.2, start_s=0.0, end_s=1.0)] == \
        [pytest.approx(0.3)]


def test_the_figure_is_drawn_from_a_report_and_a_log(tmp_path):
    log = tmp_path / "clocks.csv"
    _write_log(log, [f"2026/12/07 17:23:{35 + i * 0.1:06.3f}, {1800 - 50 * (i % 3)}, 2619, 690.0, 700.00, 50, "
                     "0x0000000000000004" for i in range(12)])
    trace = {"issued_s": [0.1 * i for i in range(10)], "step_ms": [53.0 + i % 3 for i in range(9)],
             "collections": [], "origin_unix": T0 - 0.097}
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"device": "test", "steps_per_window": 5,
                                  "rows": [{"variant": "preset", "ms_per_step": 53.5, "trace": trace}]}))
    figure = tmp_path / "fig.png"
    done = subprocess.run([sys.executable, str(SCRIPT), "--report", str(report), "--clocks", str(log), "--figure",
                           str(figure)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "8 steps" in done.stdout  # 9 durations less the one across the windows' sync
    # without a wall-clock origin the trace cannot be lined up: a clear refusal, no figure
    del trace["origin_unix"]
    report.write_text(json.dumps({"steps_per_window": 5, "rows": [{"variant": "p", "ms_per_step": 1, "trace": trace}]}))
    refused = subprocess.run([sys.executable, str(SCRIPT), "--report", str(report), "--clocks", str(log), "--figure",
                              str(tmp_path / "none.png")], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "origin" in refused.stderr and not (tmp_path / "none.png").exists()
    # a missing log: refused by name
    missing = subprocess.run([sys.executable, str(SCRIPT), "--report", str(report), "--clocks",
                              str(tmp_path / "absent.csv"), "--figure", str(tmp_path / "none.png")],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "absent.csv" in missing.stderr
