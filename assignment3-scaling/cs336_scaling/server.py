"""A local training API with the course's endpoints, messages, API keys and budget rules (FastAPI + uvicorn).

GET /loss?d_model&num_layers&num_heads&batch_size&learning_rate&train_flops&api_key → {"loss", "total_flops_used"}
GET /total_flops_used?api_key → float;  GET /previous_runs?api_key → {"previous_runs": [...]}
Errors answer {"message": ...}: 404 for an out-of-range value (as the course API), 422 for a bad key,
403 for a query that would pass the budget. A configuration already run for this key is answered from
SQLite and costs nothing. Trainers are plain callables RunConfig → loss, run one at a time.
"""

import json
import math
import os
import threading
import time
from collections.abc import Callable, Iterable

from cs336_basics.cli_support import UserError
from cs336_scaling.api_spec import (
    DEFAULT_BUDGET,
    INT_RANGES,
    LEARNING_RATE_RANGE,
    TRAIN_FLOPS,
    APIError,
    RunConfig,
    budget_message,
    invalid_key_message,
    validate,
)
from cs336_scaling.client import open_database

Trainer = Callable[[RunConfig], float]


class RunStore:
    """Runs per API key in SQLite, so a restarted server keeps its users' budgets and answers."""

    def __init__(self, path: str | os.PathLike):
        self._db = open_database(path, "CREATE TABLE IF NOT EXISTS runs (api_key TEXT, key TEXT, config TEXT, "
                                 "loss REAL, train_flops REAL, trainer TEXT, seconds REAL, created REAL, "
                                 "PRIMARY KEY (api_key, key))", "--db")
        self.lock = threading.Lock()

    def get(self, api_key: str, config: RunConfig) -> float | None:
        row = self._db.execute("SELECT loss FROM runs WHERE api_key=? AND key=?", (api_key, config.key())).fetchone()
        return None if row is None else float(row[0])

    def add(self, api_key: str, config: RunConfig, loss: float, trainer: str, seconds: float) -> None:
        self._db.execute("INSERT INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                         (api_key, config.key(), json.dumps(config.to_dict()), loss, float(config.train_flops),
                          trainer, seconds, time.time()))
        self._db.commit()

    def used(self, api_key: str) -> float:
        row = self._db.execute("SELECT COALESCE(SUM(train_flops), 0) FROM runs WHERE api_key=?", (api_key,)).fetchone()
        return float(row[0])

    def runs(self, api_key: str) -> list[dict]:
        rows = self._db.execute("SELECT config, loss FROM runs WHERE api_key=? ORDER BY created", (api_key,))
        return [{**json.loads(config), "loss": loss} for config, loss in rows]


class TrainingService:
    """The API's rules without HTTP, so they are testable directly and the HTTP layer stays thin."""

    def __init__(self, trainer: Trainer, api_keys: Iterable[str], store: RunStore, budget: float = DEFAULT_BUDGET,
                 trainer_name: str = "surrogate"):
        self.trainer, self.api_keys, self.store = trainer, set(api_keys), store
        self.budget, self.trainer_name = budget, trainer_name
        if not self.api_keys:
            raise UserError("the server needs at least one API key (--api-key or $CS336_SCALING_API_KEYS)")
        if not (math.isfinite(budget) and budget > 0):  # NaN would compare False and turn the budget off
            raise UserError(f"--budget must be a finite number > 0, got {budget}")

    def check_key(self, api_key: str | None) -> str:
        if api_key is None or api_key not in self.api_keys:
            raise APIError(invalid_key_message(api_key or ""), status=422)
        return api_key

    def loss(self, params: dict) -> dict:
        api_key = self.check_key(params.get("api_key"))
        config = validate(params)
        with self.store.lock:
            loss = self.store.get(api_key, config)
            if loss is None:
                used = self.store.used(api_key)
                if used + config.train_flops > self.budget:
                    raise APIError(budget_message(config.train_flops, used, self.budget), status=403)
                started = time.perf_counter()
                loss = float(self.trainer(config))
                self.store.add(api_key, config, loss, self.trainer_name, time.perf_counter() - started)
            return {"loss": loss, "total_flops_used": self.store.used(api_key)}

    def total_flops_used(self, api_key: str | None) -> float:
        return self.store.used(self.check_key(api_key))

    def previous_runs(self, api_key: str | None) -> dict:
        return {"previous_runs": self.store.runs(self.check_key(api_key))}


def _describe_parameters() -> dict[str, str]:
    """One line per query parameter for the OpenAPI schema (/docs), from the contract's own ranges."""
    docs = {name: f"integer in [{low}, {high}]" for name, (low, high) in INT_RANGES.items()}
    docs["d_model"] += "; divisible by num_heads"
    docs["batch_size"] = "128 or 256"
    docs["learning_rate"] = f"number in [{LEARNING_RATE_RANGE[0]:g}, {LEARNING_RATE_RANGE[1]:g}]"
    docs["train_flops"] = "training FLOPs, one of " + ", ".join(f"{x:.0e}" for x in TRAIN_FLOPS)
    docs["api_key"] = "your API key"
    return docs


def create_app(service: TrainingService):
    from typing import Annotated

    from fastapi import FastAPI, Query, Request
    from fastapi.responses import JSONResponse

    app = FastAPI(title="cs336-scaling local training API",
                  description=f"trainer: {service.trainer_name}; budget {service.budget:.3g} FLOPs per key. "
                              "Errors answer {\"message\": ...}.")
    docs = _describe_parameters()

    def param(name: str):
        # Declared as optional text so that the contract (api_spec.validate), not FastAPI, words the errors.
        return Annotated[str | None, Query(description=docs[name])]

    @app.exception_handler(APIError)
    def api_error(_request: Request, error: APIError):
        return JSONResponse({"message": error.message}, status_code=error.status)

    @app.exception_handler(Exception)
    def server_error(_request: Request, error: Exception):
        # The traceback still reaches the server's log; the client gets the API's JSON shape, not plain text.
        return JSONResponse({"message": f"internal error: {type(error).__name__}: {error}"}, status_code=500)

    # Plain `def` endpoints run in FastAPI's thread pool, so a long training run does not block the loop.
    @app.get("/loss", summary="final training loss of a configuration (charged once per key and configuration)")
    def loss(d_model: param("d_model") = None, num_layers: param("num_layers") = None,
             num_heads: param("num_heads") = None, batch_size: param("batch_size") = None,
             learning_rate: param("learning_rate") = None, train_flops: param("train_flops") = None,
             api_key: param("api_key") = None):
        return service.loss({"d_model": d_model, "num_layers": num_layers, "num_heads": num_heads,
                             "batch_size": batch_size, "learning_rate": learning_rate, "train_flops": train_flops,
                             "api_key": api_key})

    @app.get("/total_flops_used", summary="FLOPs this key has spent")
    def total_flops_used(api_key: param("api_key") = None):
        return service.total_flops_used(api_key)

    @app.get("/previous_runs", summary="every configuration this key has run, with its loss")
    def previous_runs(api_key: param("api_key") = None):
        return service.previous_runs(api_key)

    return app


class BackgroundServer:
    """uvicorn in a daemon thread on 127.0.0.1 and a free port (tests, the study's --local mode)."""

    def __init__(self, service: TrainingService, host: str = "127.0.0.1", port: int = 0):
        import socket

        import uvicorn

        if port == 0:
            with socket.socket() as sock:
                sock.bind((host, 0))
                port = sock.getsockname()[1]
        self.url = f"http://{host}:{port}"
        config = uvicorn.Config(create_app(service), host=host, port=port, log_level="warning")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def __enter__(self) -> "BackgroundServer":
        self._thread.start()
        deadline = time.time() + 20
        while not self._server.started:
            if time.time() > deadline or not self._thread.is_alive():
                raise RuntimeError(f"uvicorn did not start on {self.url}")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
