"""The client's validation, cache and budget, and the local server's rules, over real HTTP on loopback."""

import json
import urllib.error
import urllib.parse
import urllib.request

import pytest

from cs336_scaling.api_spec import APIError, BudgetExceededError, RunConfig, validate
from cs336_scaling.client import TrainingAPIClient
from cs336_scaling.server import BackgroundServer, RunStore, TrainingService
from cs336_scaling.surrogate import SurrogateLaw

GOOD = {"d_model": 256, "num_layers": 4, "num_heads": 4, "batch_size": 128, "learning_rate": 1e-3,
        "train_flops": int(1e16)}
SERVER_BUDGET = 4e16


class CountingTrainer:
    def __init__(self):
        self.calls = 0
        self.law = SurrogateLaw()

    def __call__(self, config: RunConfig) -> float:
        self.calls += 1
        return self.law.loss(config)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    trainer = CountingTrainer()
    store = RunStore(tmp_path_factory.mktemp("server") / "runs.sqlite")
    service = TrainingService(trainer, ["key-a", "key-b", "key-c"], store, budget=SERVER_BUDGET)
    with BackgroundServer(service) as background:
        background.trainer, background.store = trainer, store
        yield background


def raw_get(url: str, endpoint: str, params: dict) -> tuple[int, object]:
    try:
        with urllib.request.urlopen(f"{url}/{endpoint}?{urllib.parse.urlencode(params)}") as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.mark.parametrize(("change", "message"), [
    ({"d_model": 9999}, "d_model must be in range [64, 1024], got 9999"),
    ({"d_model": 63}, "d_model must be in range [64, 1024], got 63"),
    ({"num_layers": 25}, "num_layers must be in range [2, 24], got 25"),
    ({"num_heads": 1}, "num_heads must be in range [2, 16], got 1"),
    ({"batch_size": 64}, "batch_size must be one of [128, 256], got 64"),
    ({"learning_rate": 2e-3}, "learning_rate must be in range [0.0001, 0.001], got 0.002"),
    ({"train_flops": int(2e16)}, "train_flops must be one of [1e+13, 3e+13"),
    ({"d_model": 256.5}, "d_model must be an integer, got 256.5"),
])
def test_validation_messages(change, message):
    with pytest.raises(APIError) as error:
        validate({**GOOD, **change})
    assert error.value.message.startswith(message)
    assert error.value.status == 404


def test_validation_normalises():
    config = validate({**GOOD, "train_flops": "1e16", "d_model": "256"})
    assert config == RunConfig(**GOOD)
    assert config.non_embedding_params == 12 * 4 * 256**2
    assert config.tokens == pytest.approx(1e16 / (6 * 12 * 4 * 256**2))
    with pytest.raises(APIError, match="missing required parameter d_model"):
        validate({k: v for k, v in GOOD.items() if k != "d_model"})


def test_client_refuses_out_of_range_before_sending(server):
    client = TrainingAPIClient(server.url, "key-a")
    with pytest.raises(APIError, match=r"num_heads must be in range \[2, 16\], got 17"):
        client.loss({**GOOD, "num_heads": 17})
    assert client.requests_sent == 0


def test_server_answers_out_of_range_like_the_api(server):
    status, body = raw_get(server.url, "loss", {**GOOD, "d_model": 9999, "api_key": "key-a"})
    assert (status, body) == (404, {"message": "d_model must be in range [64, 1024], got 9999"})


@pytest.mark.parametrize("endpoint", ["loss", "total_flops_used", "previous_runs"])
def test_invalid_key(server, endpoint):
    status, body = raw_get(server.url, endpoint, {**GOOD, "api_key": "INVALID_API_KEY"})
    assert body == {"message": "Invalid API key provided: INVALID_API_KEY"}
    assert status == 422
    client = TrainingAPIClient(server.url, "INVALID_API_KEY")
    with pytest.raises(APIError, match="Invalid API key provided: INVALID_API_KEY"):
        client.previous_runs()


def test_queries_duplicates_and_budget_over_http(server, tmp_path):
    cache = tmp_path / "cache.sqlite"
    client = TrainingAPIClient(server.url, "key-b", budget=SERVER_BUDGET, cache_path=cache)
    calls = server.trainer.calls
    first = client.loss(GOOD)
    assert client.total_flops_used() == pytest.approx(1e16)
    # the same configuration again, however spelled: from the cache, no request, no FLOPs
    sent = client.requests_sent
    assert client.loss({**GOOD, "learning_rate": "0.001", "train_flops": 1e16}) == first
    assert client.loss(RunConfig(**GOOD)) == first
    assert client.requests_sent == sent
    # a fresh client (no cache) asking again: the server answers from its store, charges nothing, trains nothing
    fresh = TrainingAPIClient(server.url, "key-b", budget=SERVER_BUDGET)
    assert fresh.loss(GOOD) == first
    assert fresh.total_flops_used() == pytest.approx(1e16)
    assert server.trainer.calls == calls + 1
    # the cache survives the process: a new client on the same file sends nothing
    reopened = TrainingAPIClient(server.url, "key-b", budget=SERVER_BUDGET, cache_path=cache)
    assert reopened.loss(GOOD) == first and reopened.requests_sent == 0
    # spend up to the budget, then the client refuses before sending
    client.loss({**GOOD, "train_flops": int(3e16)})
    assert client.flops_used() == pytest.approx(4e16)
    sent = client.requests_sent
    with pytest.raises(BudgetExceededError, match="Budget exceeded"):
        client.loss({**GOOD, "train_flops": int(1e13)})
    assert client.requests_sent == sent
    assert client.total_flops_used() == pytest.approx(4e16)
    runs = client.previous_runs()
    assert len(runs) == 2 and {r["train_flops"] for r in runs} == {int(1e16), int(3e16)}
    assert runs[0]["loss"] == first and set(runs[0]) == {*GOOD, "loss"}


def test_server_enforces_budget_against_a_lax_client(server):
    lax = TrainingAPIClient(server.url, "key-c", budget=1e30)
    lax.loss({**GOOD, "train_flops": int(3e16)})
    with pytest.raises(APIError, match="Budget exceeded") as error:
        lax.loss({**GOOD, "train_flops": int(3e16), "d_model": 512})
    assert error.value.status == 403
    assert lax.total_flops_used() == pytest.approx(3e16)
    # a new client (empty cache) learns the key's spending from the server and refuses before sending /loss
    careful = TrainingAPIClient(server.url, "key-c", budget=SERVER_BUDGET)
    with pytest.raises(BudgetExceededError, match="Budget exceeded"):
        careful.loss({**GOOD, "train_flops": int(3e16), "d_model": 512})
    assert careful.requests_sent == 1  # the /total_flops_used check only


def test_client_never_exceeds_budget_under_random_queries(server):
    """Random valid queries from one key until refusals: the spent total never passes the budget."""
    import random

    from cs336_scaling.api_spec import TRAIN_FLOPS

    rng = random.Random(0)
    store = RunStore(":memory:")
    service = TrainingService(CountingTrainer(), ["k"], store, budget=1e15)
    client = TrainingAPIClient("http://unused", "k", budget=1e15)
    endpoints = {"loss": lambda p: service.loss({k: str(v) for k, v in p.items()}),
                 "total_flops_used": lambda p: service.total_flops_used(p["api_key"])}
    client._get = lambda endpoint, params: endpoints[endpoint](params)  # the service without HTTP
    refused = 0
    for _ in range(200):
        query = {**GOOD, "d_model": rng.choice([64, 128, 256]), "train_flops": rng.choice(TRAIN_FLOPS[:7])}
        try:
            client.loss(query)
        except BudgetExceededError:
            refused += 1
        assert store.used("k") <= 1e15 and client.flops_used() <= 1e15
    assert refused > 0


def test_store_persists_across_restarts(tmp_path):
    path = tmp_path / "runs.sqlite"
    trainer = CountingTrainer()
    TrainingService(trainer, ["k"], RunStore(path)).loss({**GOOD, "api_key": "k"})
    again = TrainingService(trainer, ["k"], RunStore(path))
    assert again.total_flops_used("k") == pytest.approx(1e16)
    assert again.loss({**GOOD, "api_key": "k"})["total_flops_used"] == pytest.approx(1e16)
    assert trainer.calls == 1
    with pytest.raises(ValueError, match="at least one API key"):
        TrainingService(trainer, [], RunStore(path))
