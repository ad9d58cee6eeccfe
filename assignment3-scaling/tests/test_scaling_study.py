"""The surrogate is a documented, deterministic law; the study spends ≤ 2e18 and finds its optimum at 1e19."""

import math

import pytest

from cs336_scaling.api_spec import RunConfig
from cs336_scaling.parametric import ParametricLaw
from cs336_scaling.surrogate import SurrogateLaw, best_shape, true_optimum


def test_surrogate_is_deterministic_and_seeded():
    config = RunConfig(512, 8, 8, 128, 5e-4, int(1e17))
    law = SurrogateLaw()
    assert law.loss(config) == law.loss(config)
    assert law.loss(config) != SurrogateLaw(seed=1).loss(config)
    assert abs(law.loss(config) - law.expected_loss(config)) < 5 * law.noise
    assert SurrogateLaw(noise=0.0).loss(config) == law.expected_loss(config)


def test_surrogate_penalises_bad_hyperparameters():
    law = SurrogateLaw(noise=0.0)
    n = 12 * 8 * 512**2
    good = RunConfig(512, 8, 8, 128, float(law.best_lr(n)), int(1e17))
    assert law.expected_loss(good) < law.expected_loss(RunConfig(512, 8, 8, 128, 1e-4, int(1e17)))
    assert law.expected_loss(good) < law.expected_loss(RunConfig(512, 8, 2, 128, good.learning_rate, int(1e17)))
    wide = RunConfig(1024, 2, 16, 128, good.learning_rate, int(1e17))  # same N, d_model/n_layer = 512
    assert law.expected_loss(good) < law.expected_loss(wide)
    assert law.expected_loss(RunConfig(1024, 24, 16, 256, 1e-3, int(1e13))) <= math.log(32_000)


def test_true_optimum_matches_the_closed_form():
    law = SurrogateLaw()
    chinchilla = ParametricLaw(law.E, law.A, law.B, law.alpha, law.beta)
    truth = true_optimum(law, 1e19)
    # lr* is inside the API's range there, so only the (small) batch term moves the optimum off the closed form
    assert truth["n_opt"] == pytest.approx(float(chinchilla.n_opt(1e19)), rel=0.1)
    assert truth["batch_size"] == 256 and 1e-4 <= truth["learning_rate"] <= 1e-3
    assert true_optimum(law, 1e16)["batch_size"] == 128


def test_best_shape():
    d_model, layers, heads = best_shape(2.3e8)
    assert 12 * layers * d_model**2 == pytest.approx(2.3e8, rel=0.15)
    assert d_model % heads == 0 and 2 <= heads <= 16


def test_study_end_to_end_against_the_surrogate(tmp_path, capsys):
    from cs336_scaling.cli import main

    report = tmp_path / "STUDY.md"
    json_path = tmp_path / "study.json"
    assert main(["study", "--out-dir", str(tmp_path), "--report", str(report), "--json", str(json_path)]) == 0
    import json

    result = json.loads(json_path.read_text())
    assert result["flops_used"] <= 2e18
    assert sum(q["train_flops"] for q in result["queries"] if not q["reused"]) == pytest.approx(result["flops_used"])
    assert abs(result["truth"]["n_error"]) < 0.25
    assert abs(result["truth"]["loss_error"]) < 0.05
    assert result["prediction"]["batch_size"] in (128, 256)
    text = report.read_text()
    assert "Against the surrogate's truth" in text and "a3_study_n_opt.png" in text
    assert (tmp_path / "a3_study_profiles.png").exists()
    assert "surrogate truth" in capsys.readouterr().out


def test_rerun_study_is_free_from_the_cache(tmp_path, monkeypatch):
    """A study run again on the same cache file sends nothing and reaches the same prediction."""
    from functools import partial

    from cs336_scaling import study
    from cs336_scaling.client import TrainingAPIClient
    from cs336_scaling.server import RunStore, TrainingService
    from cs336_scaling.study import Study, StudyConfig

    small_grid = {"a": [5.0], "b": [5.0], "e": [0.5], "alpha": [0.3], "beta": [0.3]}  # speed; the fit is not tested
    monkeypatch.setattr(study, "fit_parametric", partial(study.fit_parametric, inits=small_grid))

    service = TrainingService(SurrogateLaw().loss, ["k"], RunStore(":memory:"), budget=2e17)
    config = StudyConfig(budget=2e17, lr_probe_flops=int(1e15), profile_flops=(int(1e15), int(3e15), int(1e16)),
                         profile_sizes=(5, 5, 5), batch_probe_flops=(int(1e15), int(3e15), int(1e16)),
                         out_dir=str(tmp_path))
    results = []
    for _ in range(2):
        client = TrainingAPIClient("http://in-process", "k", budget=2e17, cache_path=tmp_path / "cache.sqlite")
        endpoints = {"loss": lambda p: service.loss({k: str(v) for k, v in p.items()}),
                     "total_flops_used": lambda p: service.total_flops_used(p["api_key"])}
        sent = []
        client._get = lambda endpoint, params, endpoints=endpoints, sent=sent: sent.append(1) or endpoints[endpoint](
            params)
        results.append((Study(client, config).run(), len(sent)))
    (first, sent_first), (second, sent_second) = results
    assert sent_first > 0 and sent_second == 0
    assert second["prediction"] == first["prediction"]
    assert service.total_flops_used("k") == first["flops_used"] <= 2e17
