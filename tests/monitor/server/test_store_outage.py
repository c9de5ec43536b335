"""A transcript store that goes away while the server runs: a real PostgreSQL database that stops
accepting connections (its sessions killed). Readiness, the session API and the viewer answer
503s that say so, name no database, and recover when it comes back."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psycopg
import pytest
from prometheus_client import CollectorRegistry

from monitor.build import NO_RULES
from monitor.observability import Metrics
from monitor.pipeline import Pipeline
from monitor.server.app import create_app
from monitor.settings import Settings
from monitor.store import TranscriptStore
from monitor.testing import ScriptedEngine, ServerThread
from store_fixtures import PostgresCluster


class Database:
    """One database of the test cluster, which can be taken away and given back."""

    def __init__(self, cluster: PostgresCluster):
        self.cluster, self.url = cluster, cluster.create_database()
        self.name = urlsplit(self.url).path.lstrip("/")

    def _admin(self, *statements: str) -> None:
        with psycopg.connect(
            host=str(self.cluster.socket_dir), port=self.cluster.port, user="test", dbname="postgres", autocommit=True
        ) as conn:
            for statement in statements:
                conn.execute(statement)  # type: ignore[arg-type]

    def go_away(self) -> None:
        self._admin(
            f'ALTER DATABASE "{self.name}" ALLOW_CONNECTIONS false',
            f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{self.name}'",
        )

    def come_back(self) -> None:
        self._admin(f'ALTER DATABASE "{self.name}" ALLOW_CONNECTIONS true')


@pytest.fixture
def outage(postgres_cluster: PostgresCluster, tmp_path: Path) -> Iterator[tuple[Any, Database]]:
    """A server whose store is a PostgreSQL database that has just gone away."""
    database = Database(postgres_cluster)
    settings = Settings.load({}, data_dir=tmp_path / "data", store_url=database.url)
    store = TranscriptStore(database.url, keep="all")
    pipeline = Pipeline(ScriptedEngine([("hi", "answer")]), [], NO_RULES, metrics=Metrics(CollectorRegistry()), sinks=[store])
    with ServerThread(create_app(settings, pipeline, store=store, model_name="scripted")) as server:
        assert httpx.get(server.base_url + "/v1/sessions").status_code == 200
        database.go_away()
        try:
            yield server, database
        finally:
            database.come_back()
            store.close()


def test_readiness_says_the_store_is_unavailable_without_naming_it(outage: tuple[Any, Database]) -> None:
    server, database = outage
    reply = httpx.get(server.base_url + "/readyz")
    assert reply.status_code == 503 and reply.json() == {"status": "not ready", "reason": "transcript store unavailable"}
    for secret in (database.name, str(database.cluster.socket_dir), "test@", "postgresql"):
        assert secret not in reply.text


def test_sessions_and_the_viewer_answer_503_while_the_store_is_down_then_recover(outage: tuple[Any, Database]) -> None:
    server, database = outage
    api = httpx.get(server.base_url + "/v1/sessions")
    assert api.status_code == 503 and api.headers["retry-after"] == "5"
    error = api.json()["error"]
    assert (error["message"], error["type"], error["code"]) == (
        "transcript store unavailable; retry later",
        "server_error",
        "store_unavailable",
    )
    assert httpx.get(server.base_url + "/v1/sessions/some-id").status_code == 503
    for path in ("/ui/", "/ui/sessions/some-id"):
        page = httpx.get(server.base_url + path)
        assert page.status_code == 503 and page.headers["content-type"].startswith("text/html"), path
        assert "transcript store unavailable" in page.text and database.name not in page.text, path
    database.come_back()
    assert httpx.get(server.base_url + "/v1/sessions").status_code == 200
    assert httpx.get(server.base_url + "/readyz").status_code == 200
