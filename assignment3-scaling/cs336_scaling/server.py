"""A local training API with the course's endpoints, messages, API keys and budget rules (FastAPI + uvicorn).

GET /loss?d_model&num_layers&num_heads&batch_size&learning_rate&train_flops&api_key → {"loss", "total_flops_used"}
GET /total_flops_used?api_key → float;  GET /previous_runs?api_key → {"previous_runs": [...]}
Errors answer {"message": ...}: 404 for an out-of-range value (as the course API), 422 for a bad key,
403 for a query that would pass the budget. A configuration already run for this key is answered from
SQLite and costs nothing. Trainers are plain callables RunConfig → loss, run one at a time.
"""

import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable

from cs336_scaling.api_spec import (
    DEFAULT_BUDGET,
    APIError,
    RunConfig,
    budget_message,
    invalid_key_message,
    validate,
)

Trainer = Callable[[RunConfig], float]


class RunStore:
    """Runs per API key in SQLite, so a restarted server keeps its users' budgets and answers."""

    def __init__(self, path: str | os.PathLike):
        path = os.fspath(path)
        if path != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False)
        self._db.execute("CREATE TABLE IF NOT EXISTS runs (api_key TEXT, key TEXT, config TEXT, loss REAL, "
                         "train_flops REAL, trainer TEXT, seconds REAL, created REAL, PRIMARY KEY (api_key, key))")
        self._db.commit()
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
            raise ValueError("the server needs at least one API key")

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


def create_app(service: TrainingService):
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    app = FastAPI(title="cs336-scaling local training API",
                  description=f"trainer: {service.trainer_name}; budget {service.budget:.3g} FLOPs per key")

    @app.exception_handler(APIError)
    def api_error(_request: Request, error: APIError):
        return JSONResponse({"message": error.message}, status_code=error.status)

    # Plain `def` endpoints run in FastAPI's thread pool, so a long training run does not block the loop.
    @app.get("/loss")
    def loss(request: Request):
        return service.loss(dict(request.query_params))

    @app.get("/total_flops_used")
    def total_flops_used(request: Request):
        return service.total_flops_used(request.query_params.get("api_key"))

    @app.get("/previous_runs")
    def previous_runs(request: Request):
        return service.previous_runs(request.query_params.get("api_key"))

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
