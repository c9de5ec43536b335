"""SpooledStore: kept sessions are journaled on local disk as they stream and reach the store from a
background thread; journals left by a crash are stored as `interrupted` with every step they had."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from monitor.observability import Metrics
from monitor.store import TranscriptStore
from monitor.store.spool import Journal, SpooledStore, read_journal
from monitor.types import Transcript
from store_fixtures import PostgresCluster, RunSession

NEVER = {
    "name": "never",
    "category": "deception",
    "severity": "info",
    "when": {"detector": "s", "gte": 1.0},
    "actions": ["alert"],
}


@pytest.fixture
def store(tmp_path: Path) -> Iterator[TranscriptStore]:
    with TranscriptStore(f"sqlite:///{tmp_path / 'store.db'}", keep="flagged") as opened:
        yield opened


def spool_of(store: TranscriptStore, directory: Path, metrics: Metrics | None = None) -> SpooledStore:
    metrics = metrics or Metrics(CollectorRegistry())
    spool = SpooledStore(store, directory, errors=metrics.store_errors, waiting=metrics.store_spooled, retry=0.05)
    spool.start()
    return spool


def journal_prefix(path: Path, t: Transcript, cut: int) -> None:
    """What a process that died after streaming `cut` steps of `t` leaves behind."""
    head = dataclasses.replace(t, outcome="running", steps=t.steps[:1], detections=(), flags=(), evaluations=())
    journal = Journal(path, head)
    journal.extend(t.steps[1:cut], [d for d in t.detections if d.start < cut], t.evaluations[:cut], t.flags[:1])
    journal.close()


def test_a_session_reaches_the_store_through_its_journal_which_is_then_removed(
    store: TranscriptStore, tmp_path: Path, run_session: RunSession
) -> None:
    spool = spool_of(store, tmp_path / "spool")
    t = run_session(sinks=[spool])
    assert spool.flush(10) and store.get(t.session_id) == t
    assert list((tmp_path / "spool").iterdir()) == []
    spool.close()


def test_an_unkept_session_leaves_no_journal(store: TranscriptStore, tmp_path: Path, run_session: RunSession) -> None:
    spool = spool_of(store, tmp_path / "spool")
    t = run_session(rules=[NEVER], sinks=[spool])
    assert not t.flagged and spool.flush(10) and store.count() == 0
    assert list((tmp_path / "spool").iterdir()) == []
    spool.close()


def test_a_journal_left_by_a_crash_is_stored_as_interrupted_with_every_step(
    store: TranscriptStore, tmp_path: Path, transcript: Transcript
) -> None:
    cut = transcript.flags[0].index + 4  # streamed past its first flag
    (tmp_path / "spool").mkdir()
    journal_prefix(tmp_path / "spool" / f"{transcript.session_id}.jsonl", transcript, cut)
    spool = spool_of(store, tmp_path / "spool")
    assert spool.flush(10)
    stored = store.get(transcript.session_id)
    assert stored is not None and stored.outcome == "interrupted"
    assert stored.steps == transcript.steps[:cut] and stored.flags == transcript.flags[:1]
    assert list((tmp_path / "spool").iterdir()) == []
    spool.close()


def test_a_torn_last_line_is_left_out(tmp_path: Path, transcript: Transcript) -> None:
    path = tmp_path / "s.jsonl"
    journal_prefix(path, transcript, 6)
    with path.open("a") as f:
        f.write(json.dumps({"steps": [{"index": 6}]})[:9])  # the process died mid-write
    recovered = read_journal(path)
    assert recovered.outcome == "interrupted" and recovered.steps == transcript.steps[:6]


def test_while_the_store_is_down_sessions_wait_on_disk_and_all_arrive_when_it_returns(
    own_postgres: PostgresCluster, tmp_path: Path, run_session: RunSession
) -> None:
    metrics = Metrics(CollectorRegistry())
    with TranscriptStore(own_postgres.create_database(), keep="flagged", timeout=1) as store:
        spool = spool_of(store, tmp_path / "spool", metrics)
        own_postgres.stop()
        served = [run_session(f"s{i}", sinks=[spool]) for i in range(6)]
        assert not spool.flush(1) and spool.last_error is not None
        assert metrics.registry.get_sample_value("cotmon_store_spooled_sessions") == 6
        assert len(list((tmp_path / "spool").iterdir())) == 6
        own_postgres.start()
        assert spool.flush(30), spool.last_error
        assert [store.get(t.session_id) for t in served] == served  # nothing lost, every step and flag
        assert metrics.registry.get_sample_value("cotmon_store_spooled_sessions") == 0
        assert (metrics.registry.get_sample_value("cotmon_store_errors_total") or 0) >= 1
        spool.close()
