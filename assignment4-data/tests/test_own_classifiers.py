"""fastText-backed steps: real models when downloaded (else a skip naming the download command), and the
training, loading and filtering code on small models trained here from generated text."""

import random

import pytest

from cs336_data import assets
from cs336_data.assets import Asset, MissingModelError, asset_path, download_asset, require_asset
from cs336_data.document import Document, run_steps
from cs336_data.fasttext_model import FastTextClassifier
from cs336_data.harmful import HarmfulFilter, classify_nsfw, classify_toxic_speech
from cs336_data.langid import LanguageFilter, identify_language
from cs336_data.quality import (
    QualityFilter,
    classify_quality,
    evaluate,
    fasttext_line,
    train_quality_classifier,
    write_training_data,
)

SMALL = {"dim": 16, "bucket": 20_000}  # fastText's 2M hash buckets x 100 dims would be an 800 MB model


def _real_model(name):
    try:
        return require_asset(name)
    except MissingModelError as exc:
        pytest.skip(str(exc))


# ---------------------------------------------------------------- missing models


def test_missing_model_message_names_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("CS336_DATA_CACHE", str(tmp_path))
    monkeypatch.delenv("CS336_NSFW_MODEL", raising=False)
    with pytest.raises(MissingModelError) as info:
        classify_nsfw("some text")
    message = str(info.value)
    assert "\n" not in message
    assert "cs336-data assets download nsfw" in message and "$CS336_NSFW_MODEL" in message
    with pytest.raises(MissingModelError, match="cs336-data quality train"):
        classify_quality("text", tmp_path / "nope.bin")


def test_env_override_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("CS336_LID_MODEL", str(tmp_path / "lid.bin"))
    assert asset_path("lid") == tmp_path / "lid.bin"
    assert asset_path("lid", "/x/y.bin").as_posix() == "/x/y.bin"


def test_download_is_atomic_and_fails_in_one_line(tmp_path, monkeypatch):
    """The download path against a local file:// URL (no network): a whole copy, or no file and one line."""
    source = tmp_path / "model.bin"
    source.write_bytes(b"\x00fake model" * 1000)
    fake = Asset("fake", "fake.bin", "CS336_FAKE_MODEL", source.as_uri(), "cs336-data assets download fake")
    monkeypatch.setitem(assets.ASSETS, "fake", fake)
    got = download_asset("fake", tmp_path / "cache")
    assert got.read_bytes() == source.read_bytes() and not list((tmp_path / "cache").glob("*.part"))
    monkeypatch.setitem(assets.ASSETS, "gone", Asset("gone", "gone.bin", "X", (tmp_path / "no").as_uri(), "x"))
    with pytest.raises(OSError, match="could not download gone") as info:
        download_asset("gone", tmp_path / "cache")
    assert "\n" not in str(info.value) and not (tmp_path / "cache" / "gone.bin").exists()
    with pytest.raises(ValueError, match="not downloadable"):
        download_asset("quality", tmp_path / "cache")


# ---------------------------------------------------------------- real models (skip when absent)


def test_real_language_id():
    path = _real_model("lid")
    assert identify_language("The quick brown fox jumps over the lazy dog.", path)[0] == "en"
    lang, score = identify_language("Le renard brun saute par-dessus le chien paresseux.", path)
    assert lang == "fr" and isinstance(score, float) and 0 < score <= 1
    assert identify_language("欢迎来到我们的网站", path)[0] == "zh"


def test_real_harmful_models():
    nsfw, toxic = _real_model("nsfw"), _real_model("toxic")
    assert classify_nsfw("Thanks for fixing the citation formatting on this article.", nsfw)[0] == "non-nsfw"
    assert classify_toxic_speech("Thanks for fixing the citation formatting on this article.", toxic)[0] == "non-toxic"


# ---------------------------------------------------------------- models trained here


def _write_labelled(path, rows):
    with open(path, "w") as f:
        f.writelines(fasttext_line(label, text) for label, text in rows)


def _texts(rng, vocab, n, length=40):
    return [" ".join(rng.choice(vocab) for _ in range(length)) for _ in range(n)]


@pytest.fixture(scope="module")
def toy_models(tmp_path_factory):
    """Binary fastText models with the real models' label names, trained on two disjoint generated vocabularies."""
    root = tmp_path_factory.mktemp("models")
    rng = random.Random(0)
    clean = [f"calm{i}" for i in range(200)]
    dirty = [f"rude{i}" for i in range(200)]
    models = {}
    labels = {"lid": ("fr", "en"), "nsfw": ("nsfw", "non-nsfw"), "toxic": ("toxic", "non-toxic")}
    for name, (bad, good) in labels.items():
        rows = [(good, t) for t in _texts(rng, clean, 150)] + [(bad, t) for t in _texts(rng, dirty, 150)]
        rng.shuffle(rows)
        _write_labelled(root / f"{name}.train", rows)
        models[name] = train_quality_classifier(root / f"{name}.train", root / f"{name}.bin", epoch=25, lr=0.5, **SMALL)
    models["words"] = (clean, dirty)
    return models


def test_classifier_wrapper_labels_and_scores(toy_models):
    clf = FastTextClassifier(toy_models["nsfw"])
    label, score = clf.top("calm1 calm2\ncalm3 calm4")  # newlines are fine
    assert label == "non-nsfw" and isinstance(score, float) and 0.9 < score <= 1.0
    pairs = clf.predict("rude1 rude2 rude3", k=2)
    assert [p[0] for p in pairs] == ["nsfw", "non-nsfw"] and sum(p[1] for p in pairs) == pytest.approx(1, abs=1e-3)
    assert clf.top("")[0] in {"nsfw", "non-nsfw"}  # empty input still gets an answer


def test_language_and_harmful_filters(toy_models):
    clean, dirty = toy_models["words"]
    lang = LanguageFilter(["en"], 0.6, toy_models["lid"])
    harm = HarmfulFilter(0.5, 0.5, toy_models["nsfw"], toy_models["toxic"])
    docs = [Document(" ".join(clean[:30])), Document(" ".join(dirty[:30]))]
    kept = list(run_steps(docs, [lang, harm]))
    assert [d.text for d in kept] == [docs[0].text]
    assert kept[0].meta["lang"] == "en" and kept[0].meta["p_nsfw"] < 0.5
    assert lang.counters["other_lang:fr"] == 1 and harm.counters["seen"] == 1


def test_quality_training_end_to_end(tmp_path):
    """The `quality train` path on generated pages: balance, split, train, evaluate, classify."""
    rng = random.Random(1)
    formal = [f"scholarly{i}" for i in range(300)]
    spam = [f"clickbuy{i}" for i in range(300)]
    positives = [*_texts(rng, formal, 120), ""]  # an empty page is skipped, not a crash
    negatives = _texts(rng, spam, 200)
    split = write_training_data(positives, negatives, tmp_path / "data", max_per_class=100, seed=0)
    assert split.counts == {"wiki": 100, "cc": 100, "valid": 20}
    assert len(split.train.read_text().splitlines()) == 180 and len(split.valid.read_text().splitlines()) == 20
    model = train_quality_classifier(split.train, tmp_path / "quality.bin", epoch=25, lr=0.5, **SMALL)
    report = evaluate(model, split.valid, thresholds=(0.5,))
    assert report["0.5"]["precision"] == 1.0 and report["0.5"]["recall"] == 1.0
    label, score = classify_quality(" ".join(formal[:50]), model)
    assert label == "wiki" and isinstance(score, float) and score > 0.5
    assert classify_quality(" ".join(spam[:50]), model)[0] == "cc"
    step = QualityFilter(0.5, model)
    assert [d.text for d in run_steps([Document(" ".join(spam[:20])), Document(" ".join(formal[:20]))], [step])] \
        == [" ".join(formal[:20])]


def test_training_needs_both_classes(tmp_path):
    with pytest.raises(ValueError, match="both classes"):
        write_training_data(["a b c"], [], tmp_path)
