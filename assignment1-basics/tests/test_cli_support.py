"""The shared CLI-safety mechanisms (`cs336_basics.cli_support`), each against a hand-checked case."""

import dataclasses
import gzip
import os
import signal
import warnings

import pytest

from cs336_basics.cli_support import (
    StopRequest,
    UserError,
    atomic_path,
    atomic_write,
    bounded,
    check_output,
    check_ranges,
    prepare_run_dir,
    read_jsonl_tolerant,
    reading,
    refuse_overwriting_inputs,
    run_command,
    save_figure,
)


def test_atomic_write_leaves_the_destination_byte_identical_when_the_block_fails(tmp_path):
    target = tmp_path / "out.jsonl"
    target.write_bytes(b"precious\n")
    with pytest.raises(RuntimeError), atomic_write(target) as f:
        f.write("half of the new content")
        raise RuntimeError("the command failed midway")
    assert target.read_bytes() == b"precious\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]  # no temporary left behind
    with atomic_write(target) as f:
        f.write("new\n")
    assert target.read_text() == "new\n"
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # what open() gives a new file, not mkstemp's 0600


def test_atomic_path_keeps_the_extension_and_refuses_a_folder(tmp_path):
    with atomic_path(tmp_path / "fig.png") as tmp:
        assert tmp.endswith(".png") and os.path.dirname(tmp) == str(tmp_path)
        with open(tmp, "wb") as f:
            f.write(b"png")
    assert (tmp_path / "fig.png").read_bytes() == b"png"
    with pytest.raises(UserError, match="is a folder"), atomic_path(tmp_path):
        pass


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _agg_figure():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 1.5))
    ax.plot([0, 1], [1, 0])
    return plt, fig, fig.number


def test_save_figure_writes_the_extensions_format_and_closes_the_figure(tmp_path):
    plt, fig, number = _agg_figure()
    png = tmp_path / "new" / "fig.PNG"  # a folder to create; the extension's case does not matter
    assert save_figure(fig, png) == str(png)
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    assert number not in plt.get_fignums()
    plt, fig, number = _agg_figure()
    save_figure(fig, tmp_path / "fig.pdf", dpi=130)
    assert (tmp_path / "fig.pdf").read_bytes()[:4] == b"%PDF"
    assert number not in plt.get_fignums()
    plt, fig, number = _agg_figure()
    save_figure(fig, tmp_path / "plain")  # no extension: matplotlib's default format, nothing written beside it
    assert (tmp_path / "plain").read_bytes()[:8] == PNG_SIGNATURE
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig.pdf", "new", "plain"]
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["fig.PNG"]


def test_save_figure_leaves_the_destination_when_savefig_fails_and_still_closes(tmp_path, monkeypatch):
    plt, fig, number = _agg_figure()
    target = tmp_path / "fig.png"
    target.write_bytes(b"precious")

    def savefig_that_fails_midway(fname, **kwargs):
        with open(fname, "wb") as f:
            f.write(PNG_SIGNATURE + b"half a figure")
        raise RuntimeError("disk full")

    monkeypatch.setattr(fig, "savefig", savefig_that_fails_midway)
    with pytest.raises(RuntimeError, match="disk full"):
        save_figure(fig, target)
    assert target.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig.png"]  # no temporary left behind
    assert number not in plt.get_fignums()


def test_outputs_that_are_inputs_are_refused_by_any_path(tmp_path):
    source = tmp_path / "x.txt"
    source.write_text("data")
    link = tmp_path / "link.txt"
    link.symlink_to(source)
    for output in (source, tmp_path / "." / "x.txt", link):
        with pytest.raises(UserError, match="would overwrite the input"):
            refuse_overwriting_inputs([output], [source])
    refuse_overwriting_inputs([tmp_path / "y.txt"], [source])


def test_outputs_below_a_file_or_of_the_wrong_kind_are_refused_before_any_work(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    (tmp_path / "folder").mkdir()
    check_output(tmp_path / "new" / "deeper" / "out.npy", "--output")  # missing parents: created later, fine
    check_output(tmp_path / "new" / "deeper", "--out-dir", folder=True)
    for path, folder, message in [
        (tmp_path / "a.txt" / "x" / "out.npy", False, r"a\.txt is a file, not a folder"),
        (tmp_path / "a.txt" / "x", True, r"a\.txt is a file, not a folder"),
        (tmp_path / "folder", False, "is a folder; expected a file path"),
        (tmp_path / "a.txt", True, "is a file; expected a folder"),
    ]:
        with pytest.raises(UserError, match=message):
            check_output(path, "--out", folder=folder)
    with pytest.raises(UserError, match=r"a\.txt is a file, not a folder"):
        prepare_run_dir(tmp_path / "a.txt" / "run", resume=False, overwrite=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "folder"]


def test_a_run_folder_needs_resume_or_overwrite(tmp_path):
    run = tmp_path / "run"
    prepare_run_dir(run, resume=False, overwrite=False)  # nothing there yet: fine
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(UserError, match="--resume to continue it or --overwrite"):
        prepare_run_dir(run, resume=False, overwrite=False)
    assert (run / "metrics.jsonl").read_text() == '{"step": 1}\n'
    prepare_run_dir(run, resume=True, overwrite=False)
    assert (run / "metrics.jsonl").exists()
    with pytest.raises(UserError, match="exclude each other"):
        prepare_run_dir(run, resume=True, overwrite=True)
    prepare_run_dir(run, resume=False, overwrite=True)
    assert not (run / "metrics.jsonl").exists()


@dataclasses.dataclass
class Knobs:
    grad_clip: float = bounded(1.0, gt=0)
    time_limit_s: float = bounded(0.0, ge=0)
    beta: float = bounded(0.9, ge=0, lt=1)
    workers: int = bounded(0, ge=1, allow=(0,))
    anything: float = 3.0

    def __post_init__(self):
        check_ranges(self)


@pytest.mark.parametrize("field, value, message", [
    ("grad_clip", -1.0, "--grad-clip must be > 0, got -1.0"),
    ("grad_clip", 0.0, "--grad-clip must be > 0"),
    ("time_limit_s", -1.0, "--time-limit-s must be >= 0"),
    ("beta", 1.0, "--beta must be >= 0 and < 1"),
    ("grad_clip", float("inf"), "--grad-clip must be > 0, got inf"),
    ("grad_clip", float("nan"), "--grad-clip must be > 0, got nan"),
    ("workers", -2, r"--workers must be >= 1 \(or 0\)"),
    ("anything", float("nan"), "--anything must be a number, not NaN"),
])
def test_declared_ranges_name_the_flag(field, value, message):
    with pytest.raises(UserError, match=message):
        Knobs(**{field: value})


def test_values_inside_their_ranges_pass():
    assert Knobs(grad_clip=1e-9, time_limit_s=0.0, beta=0.0, workers=0, anything=float("inf")).workers == 0


def test_stop_request_turns_signals_into_a_flag_and_an_exit_code():
    for signum, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        before = signal.getsignal(signum)
        with StopRequest(announce=False) as stop:
            assert not stop.requested and stop.exit_code == 0
            os.kill(os.getpid(), signum)
            assert stop.requested and stop.exit_code == code
        assert signal.getsignal(signum) == before
    with pytest.raises(KeyboardInterrupt), StopRequest(announce=False):  # a second Ctrl-C insists
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)


def test_jsonl_reader_drops_only_a_half_written_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert read_jsonl_tolerant(path) == [{"step": 1}, {"step": 2}]
    assert "metrics.jsonl" in str(caught[0].message)
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(UserError, match="line 2 is not JSON"):
        read_jsonl_tolerant(path)


def test_the_error_boundary_gives_one_line_for_expected_failures_and_keeps_bugs(tmp_path, capsys):
    def missing():
        (tmp_path / "nope.txt").read_text()

    assert run_command("cs336-x", missing) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"cs336-x: error: No such file or directory: {tmp_path / 'nope.txt'}"

    bad = tmp_path / "bad.gz"
    bad.write_bytes(gzip.compress(b"hello world" * 100)[:20])

    def truncated():
        with reading(bad), gzip.open(bad, "rt") as f:
            f.read()

    assert run_command("cs336-x", truncated) == 2
    assert capsys.readouterr().err.startswith(f"cs336-x: error: cannot read {bad}: ")

    def bug():
        return {}["missing key"]

    with pytest.raises(KeyError):
        run_command("cs336-x", bug)


def test_help_text_states_a_declared_range():
    from cs336_basics.cli_support import range_help

    fields = {f.name: f for f in dataclasses.fields(Knobs)}
    assert range_help(fields["beta"]) == "; must be >= 0 and < 1"
    assert range_help(fields["workers"]) == "; must be >= 1 (or 0)"
    assert range_help(fields["anything"]) == ""
