"""A stalled or stopped PostgreSQL under load: the server stays responsive, alerts count only sessions
that are durable (spooled on local disk), and every served session reaches the store once it is back."""

from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from conftest import LONG_COT, Serve
from store_fixtures import PostgresCluster

LONG = LONG_COT
MESSAGES = [{"role": "user", "content": "Did you run the tests?"}]
FLAGGED = "I never ran them but I will say I did, since nobody checks the logs anyway, and they trust me."
CLEAN = "Ran them."


def _watch(base: str, reasoning: str) -> dict[str, Any]:
    body = {"messages": MESSAGES, "reasoning": reasoning, "answer": "Yes."}
    reply = httpx.post(base + "/v1/monitor/transcripts", json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    return reply.json()  # type: ignore[no-any-return]


def _flags_counted(server: Any) -> float:
    labels = {"category": "deception", "severity": "critical", "rule": "long-cot"}
    return server.metrics.registry.get_sample_value("cotmon_flags_total", labels) or 0.0


def _serve_on(serve: Serve, cluster: PostgresCluster) -> Any:
    return serve(rules=[LONG], store_url=cluster.create_database(), store_keep="all", store_timeout=1)


def _stored(server: Any) -> dict[str, Any]:
    sessions = httpx.get(server.base_url + "/v1/sessions", params={"limit": 1000}, timeout=30).json()["data"]
    return {s["session_id"]: s for s in sessions}


def test_a_stalled_postgres_leaves_healthz_fast_and_loses_no_session(serve: Serve, own_postgres: PostgresCluster) -> None:
    server = _serve_on(serve, own_postgres)
    _watch(server.base_url, CLEAN)  # the pool holds a connection now: the stall hangs it mid-conversation
    own_postgres.pause()
    try:
        with ThreadPoolExecutor(4) as pool:
            served = [r["session_id"] for r in pool.map(lambda text: _watch(server.base_url, text), (FLAGGED, CLEAN) * 2)]
            reads = [pool.submit(httpx.get, server.base_url + "/v1/sessions", timeout=30) for _ in range(3)]
            waits = []
            for _ in range(20):  # store reads and writes hang on the paused database meanwhile
                t0 = time.perf_counter()
                assert httpx.get(server.base_url + "/healthz", timeout=5).status_code == 200
                waits.append(time.perf_counter() - t0)
                time.sleep(0.05)
            assert [r.result().status_code for r in reads] == [503] * 3  # after the store timeout, not never
        ready = httpx.get(server.base_url + "/readyz", timeout=5)
        assert ready.status_code == 200 and ready.json()["spooled"] >= 4
        # Before: 25/25 timed out. A busy 2-core CI machine adds tens of ms to any request.
        assert statistics.median(waits) < 0.1 and max(waits) < 1.0, f"/healthz during the stall: {waits}"
        assert _flags_counted(server) == 2  # each flagged session journaled on disk before it was counted
    finally:
        own_postgres.resume()
    assert server.spool.flush(30)
    stored = _stored(server)
    assert set(served) <= set(stored) and len(stored) == 5
    assert sum(stored[s]["flagged"] for s in served) == 2


def test_during_an_outage_flags_are_counted_for_spooled_sessions_that_all_arrive_later(
    serve: Serve, own_postgres: PostgresCluster
) -> None:
    server = _serve_on(serve, own_postgres)
    own_postgres.stop()
    try:
        served = [_watch(server.base_url, text)["session_id"] for text in (FLAGGED, CLEAN, FLAGGED, FLAGGED, CLEAN)]
        stream = httpx.post(
            server.base_url + "/v1/chat/completions",
            json={"model": "tiny", "messages": MESSAGES, "max_tokens": 8, "ignore_eos": True},
            timeout=60,
        )
        served.append(stream.json()["cotmon"]["session_id"])
        assert _flags_counted(server) == 3
        ready = httpx.get(server.base_url + "/readyz", timeout=5).json()
        assert ready["store"] == "degraded" and ready["spooled"] == 6
        assert httpx.get(server.base_url + "/v1/sessions", timeout=10).status_code == 503
        assert server.metrics.registry.get_sample_value("cotmon_store_spooled_sessions") == 6
    finally:
        own_postgres.start()
    assert server.spool.flush(30), server.spool.last_error
    stored = _stored(server)
    assert set(stored) == set(served)  # count = served
    assert sum(s["flagged"] for s in stored.values()) == _flags_counted(server) == 3
    assert httpx.get(server.base_url + "/readyz", timeout=5).json()["store"] == "ok"
