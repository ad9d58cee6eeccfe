"""Client of the training API: validates before sending, caches every answer, refuses to pass the budget.

Standard library only (urllib, sqlite3), so it runs anywhere. The cache is keyed by (server, API key,
canonical configuration): asking again for a configuration costs neither FLOPs nor a request, and the cached
runs count towards the budget, so the budget holds across processes and restarts.
"""

import json
import os
import sqlite3
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping

from cs336_basics.cli_support import UserError
from cs336_scaling.api_spec import DEFAULT_BUDGET, APIError, BudgetExceededError, RunConfig, budget_message, validate

COURSE_URL = "http://hyperturing.stanford.edu:8000"
CACHE_SCHEMA = ("CREATE TABLE IF NOT EXISTS runs (server TEXT, api_key TEXT, key TEXT, config TEXT, loss REAL, "
                "train_flops REAL, PRIMARY KEY (server, api_key, key))")


class APIUnreachableError(APIError, UserError):
    """The server did not answer at all (refused, unknown host, timeout): one line naming the URL."""

    def __init__(self, url: str, reason: object):
        super().__init__(f"cannot reach the training API at {url}: {reason}", status=0)


def open_database(path: str | os.PathLike, schema: str, flag: str) -> sqlite3.Connection:
    """An SQLite file with `schema`, or a one-line `UserError` naming it when it is a folder, not a database,
    or a database of another shape (sqlite3 would otherwise fail on the first query, mid-request)."""
    path = os.fspath(path)
    if path != ":memory:":
        if os.path.isdir(path):
            raise UserError(f"{flag} {path} is a folder; expected an SQLite file")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        db = sqlite3.connect(path, check_same_thread=False)
        db.execute(schema)
        db.execute("SELECT * FROM runs LIMIT 0")
        db.commit()
    except sqlite3.Error as error:
        raise UserError(f"{flag} {path} is not a usable SQLite database: {error}") from error
    return db




class TrainingAPIClient:
    def __init__(self, base_url: str, api_key: str, budget: float = DEFAULT_BUDGET,
                 cache_path: str | os.PathLike = ":memory:", timeout_s: float = 3600.0):
        self.base_url, self.api_key, self.budget, self.timeout_s = base_url.rstrip("/"), api_key, budget, timeout_s
        self.requests_sent = 0
        self._lock = threading.Lock()
        self._db = open_database(cache_path, CACHE_SCHEMA, "--cache")
        self._server_total: float | None = None

    # --- HTTP -----------------------------------------------------------------------------------------
    def _get(self, endpoint: str, params: Mapping) -> object:
        url = f"{self.base_url}/{endpoint}?{urllib.parse.urlencode(dict(params))}"
        self.requests_sent += 1
        try:
            with urllib.request.urlopen(url, timeout=self.timeout_s) as response:
                body = json.loads(response.read())
        except urllib.error.HTTPError as error:
            try:
                body = json.loads(error.read())
            except ValueError:
                raise APIError(f"HTTP {error.code} from {url}", error.code) from None
            raise APIError(_message(body), error.code) from None
        except (urllib.error.URLError, OSError, ValueError) as error:  # refused, no such host, timeout, not JSON
            reason = getattr(error, "reason", error)
            raise APIUnreachableError(self.base_url, reason) from None
        if isinstance(body, dict) and "message" in body and len(body) == 1:
            raise APIError(body["message"])  # the course API also answers some errors with status 200
        return body

    # --- budget -----------------------------------------------------------------------------------------
    def cached_flops(self) -> float:
        row = self._db.execute("SELECT COALESCE(SUM(train_flops), 0) FROM runs WHERE server=? AND api_key=?",
                               (self.base_url, self.api_key)).fetchone()
        return float(row[0])

    def flops_used(self) -> float:
        """What this client knows has been spent: the larger of its own ledger and the server's last total."""
        return max(self.cached_flops(), self._server_total or 0.0)

    def remaining(self) -> float:
        return self.budget - self.flops_used()

    # --- endpoints --------------------------------------------------------------------------------------
    def lookup(self, config: RunConfig) -> float | None:
        row = self._db.execute("SELECT loss FROM runs WHERE server=? AND api_key=? AND key=?",
                               (self.base_url, self.api_key, config.key())).fetchone()
        return None if row is None else float(row[0])

    def loss(self, config: RunConfig | Mapping) -> float:
        """Final training loss of a configuration; free if already asked, refused if it would pass the budget."""
        config = validate(config.to_dict() if isinstance(config, RunConfig) else config)
        with self._lock:
            cached = self.lookup(config)
            if cached is not None:
                return cached
            if self._server_total is None:
                self._sync_total()
            used = self.flops_used()
            if used + config.train_flops > self.budget:
                raise BudgetExceededError(budget_message(config.train_flops, used, self.budget))
            body = self._get("loss", {**config.to_dict(), "api_key": self.api_key})
            loss = float(body["loss"])
            self._server_total = float(body.get("total_flops_used", 0.0))
            self._db.execute("INSERT OR REPLACE INTO runs VALUES (?, ?, ?, ?, ?, ?)",
                             (self.base_url, self.api_key, config.key(), json.dumps(config.to_dict()), loss,
                              float(config.train_flops)))
            self._db.commit()
            return loss

    def total_flops_used(self) -> float:
        self._server_total = float(self._get("total_flops_used", {"api_key": self.api_key}))
        return self._server_total

    def _sync_total(self) -> None:
        """Learns what this key spent elsewhere (another machine, a lost cache) before the first paid query."""
        try:
            self.total_flops_used()
        except APIError as error:
            if isinstance(error, APIUnreachableError) or "Invalid API key" in error.message:
                raise
            self._server_total = 0.0  # the course API answers 422 for a key with no queries yet

    def previous_runs(self) -> list[dict]:
        return list(self._get("previous_runs", {"api_key": self.api_key})["previous_runs"])

    def cached_runs(self) -> list[dict]:
        rows = self._db.execute("SELECT config, loss FROM runs WHERE server=? AND api_key=?",
                                (self.base_url, self.api_key)).fetchall()
        return [{**json.loads(config), "loss": loss} for config, loss in rows]

    def close(self) -> None:
        self._db.close()


def _message(body) -> str:
    if isinstance(body, dict):
        if "message" in body:
            return str(body["message"])
        if "detail" in body:
            return str(body["detail"])
    return str(body)
