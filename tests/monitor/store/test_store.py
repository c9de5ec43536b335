"""TranscriptStore on SQLite and on a real PostgreSQL: round trips, retention, checkpoints, filters,
reads, the migrated schema, concurrency, errors, and `parse_time`."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

import monitor.store.store
from conftest import ProbeFactory
from monitor.engine.hf import HFEngine
from monitor.observability import Metrics
from monitor.pipeline import Pipeline
from monitor.policy import parse_policy
from monitor.store import SessionQuery, SessionSummary, StoreError, TranscriptStore, parse_time
from monitor.store.schema import flags, metadata
from monitor.store.store import StoreConflict, normalise_url, sampled
from monitor.types import ChatMessage, DetectorSpec, Evidence, GenerationRequest, Transcript

RunSession = Callable[..., Transcript]  # the `run_session` fixture (tests/monitor/store/conftest.py)


@pytest.fixture
def store(store_url: str) -> Iterator[TranscriptStore]:
    with TranscriptStore(store_url) as opened:
        yield opened


def variant(t: Transcript, session_id: str, started_at: float | None = None, **changes: object) -> Transcript:
    """`t` as another session (its steps too), started at `started_at` when given."""
    steps = tuple(dataclasses.replace(s, session_id=session_id) for s in t.steps)
    times = {} if started_at is None else {"started_at": started_at, "ended_at": started_at + 5.0}
    return dataclasses.replace(t, session_id=session_id, steps=steps, **times, **changes)  # type: ignore[arg-type]


def flag_rows(store: TranscriptStore) -> int:
    with store.engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(flags)).scalar_one())


def ids(items: Iterable[SessionSummary | Transcript]) -> list[str]:
    return [item.session_id for item in items]


# -- round trips ------------------------------------------------------------------------------------


def test_pipeline_transcript_round_trips_exactly(store: TranscriptStore, transcript: Transcript) -> None:
    # What the fixture session holds, so that the equality below covers all of it.
    assert len(transcript.flags) == 3 and {f.severity for f in transcript.flags} == {"info", "warning", "critical"}
    assert any(e.quotes for d in transcript.detections for e in d.evidence)
    assert transcript.request["seed"] == 7 and transcript.thresholds == {"s": 0.5, "q": None} and transcript.evaluations
    assert any(v != float(np.float32(v)) for s in transcript.steps for v in s.readouts.values())
    store.save(transcript)
    assert store.get(transcript.session_id) == transcript


async def test_tiny_model_transcript_round_trips_exactly(
    store_url: str, engine: HFEngine, make_probe: ProbeFactory, metrics: Metrics
) -> None:
    spec = DetectorSpec("linear_probe", "p", {"artifact": str(make_probe())})
    rules = [
        {
            "name": "any-score",
            "category": "deception",
            "severity": "info",
            "when": {"detector": "p", "gte": 0.0},
            "actions": ["alert"],
        },
        {
            "name": "sustained",
            "category": "deception",
            "severity": "warning",
            "when": {"detector": "p", "stat": "count_over", "over": 0.0, "window": 4, "gte": 4},
            "actions": ["alert", "store"],
        },
    ]
    with TranscriptStore(store_url) as store:
        policy = parse_policy({"name": "tiny", "rules": rules}, "tiny.yaml")
        pipeline = Pipeline(engine, [spec], policy, metrics=metrics, sinks=[store])
        request = GenerationRequest((ChatMessage("user", "Hello"),), max_tokens=16, temperature=0.8, seed=1)
        t = await pipeline.generate(request).run()
        assert len(t.flags) == 2 and len(t.steps) > 4 and all(s.readouts for s in t.steps)
        assert store.get(t.session_id) == t


def test_halted_transcript_round_trips_exactly(store: TranscriptStore, run_session: RunSession) -> None:
    halt = {"name": "halt", "category": "harmful_planning", "severity": "critical", "when": {"detector": "q", "gte": 0.9}}
    t = run_session(rules=[{**halt, "actions": ["alert", "store", "halt"]}])
    assert t.outcome == "halted" and not t.steps[-1].final
    store.save(t)
    assert store.get(t.session_id) == t


def test_float32_exact_readouts_round_trip(store: TranscriptStore, transcript: Transcript) -> None:
    steps = tuple(dataclasses.replace(s, readouts={"s": 0.5 * s.index, "q": -0.25}) for s in transcript.steps)
    t = dataclasses.replace(transcript, steps=steps)
    store.save(t)
    assert store.get(t.session_id) == t


def test_float64_readouts_keep_every_bit(store: TranscriptStore, transcript: Transcript) -> None:
    values = [math.pi, 1 / 3, 1e-300, -1.0000000000000002, 5e-324]
    steps = tuple(dataclasses.replace(s, readouts={"a": values[s.index % 5], "b": s.index + 0.1}) for s in transcript.steps)
    t = dataclasses.replace(transcript, steps=steps)
    store.save(t)
    assert store.get(t.session_id) == t


def test_readouts_beyond_float32_range_are_stored_without_a_warning(store: TranscriptStore, transcript: Transcript) -> None:
    steps = tuple(dataclasses.replace(s, readouts={"huge": 1e300 * (s.index + 1), "inf": math.inf}) for s in transcript.steps)
    t = dataclasses.replace(transcript, steps=steps)
    store.save(t)
    assert store.get(t.session_id) == t


def test_readouts_whose_names_vary_between_steps_round_trip(store: TranscriptStore, transcript: Transcript) -> None:
    shapes = [{"s": 0.1}, {}, {"s": 0.2, "q": 0.3}, {"q": 0.4, "s": 0.5}, {"sae/feature_12": 7.25}]
    steps = tuple(dataclasses.replace(s, readouts=shapes[s.index % len(shapes)]) for s in transcript.steps)
    t = dataclasses.replace(transcript, steps=steps)
    store.save(t)
    assert store.get(t.session_id) == t


def test_detections_sharing_evidence_round_trip(store: TranscriptStore, transcript: Transcript) -> None:
    shared = (Evidence("probe direction", "layer 1, threshold 0.5"), Evidence("feature 12", quotes=("hide the bug",)))
    evidence = [shared, (), shared[:1], shared, (Evidence("probe direction", "layer 1, threshold 0.5"),)]
    detections = tuple(dataclasses.replace(d, evidence=evidence[i % len(evidence)]) for i, d in enumerate(transcript.detections))
    t = dataclasses.replace(transcript, detections=detections)
    store.save(t)
    assert store.get(t.session_id) == t


def test_non_ascii_text_round_trips(store: TranscriptStore, transcript: Transcript) -> None:
    text = ("Ünïcödé ", "中文推理 ", "🙂🚀 ", "مرحبا ", "\u200b", "e\u0301")  # zero-width and combining characters too
    steps = tuple(dataclasses.replace(s, text=text[s.index % len(text)]) for s in transcript.steps)
    messages = (ChatMessage("user", "Привет — ¿qué tal? 🙂"),)
    t = variant(dataclasses.replace(transcript, steps=steps), "séance-🙂", messages=messages, error="Ошибка ✗")
    store.save(t)
    assert store.get(t.session_id) == t
    assert store.sessions()[0].preview == t.reasoning


def test_text_with_a_nul_character_is_stored(store: TranscriptStore, transcript: Transcript) -> None:
    steps = (dataclasses.replace(transcript.steps[0], text="\x00"), *transcript.steps[1:])
    t = dataclasses.replace(transcript, steps=steps)
    store.save(t)
    assert store.get(t.session_id) == t


def test_empty_session_round_trips(store: TranscriptStore, transcript: Transcript) -> None:
    t = dataclasses.replace(
        transcript, session_id="empty", steps=(), detections=(), evaluations=(), outcome="error", error="boom"
    )
    store.save(t)
    assert store.get("empty") == t
    assert store.sessions()[0].n_tokens == 0 and store.sessions()[0].preview == ""


def test_get_of_an_unknown_session_is_none(store: TranscriptStore) -> None:
    assert store.get("nope") is None


def test_delete_removes_the_session_and_its_flags(store: TranscriptStore, transcript: Transcript) -> None:
    store.save(transcript)
    assert store.delete(transcript.session_id) is True
    assert store.get(transcript.session_id) is None and flag_rows(store) == 0
    assert store.delete(transcript.session_id) is False


def test_summary_carries_flags_severity_scores_and_preview(store: TranscriptStore, transcript: Transcript) -> None:
    store.save(transcript)
    [summary] = store.sessions()
    assert summary.flags == transcript.flags and summary.flagged and summary.severity == "critical"
    assert (summary.n_tokens, summary.n_reasoning) == (12, 10)
    assert summary.preview == transcript.reasoning and summary.policy_name == "store-test"
    assert summary.max_scores == {name: max(d.score for d in transcript.detections if d.detector == name) for name in ("s", "q")}
    assert summary.thresholds == {"s": 0.5, "q": None} and summary.model_id == "scripted"


# -- retention --------------------------------------------------------------------------------------


def test_keep_flagged_stores_flagged_and_drops_unflagged(store_url: str, transcript: Transcript) -> None:
    with TranscriptStore(store_url, keep="flagged") as store:
        store.write(transcript)
        store.write(variant(transcript, "calm", 1.0, flags=()))
        assert ids(store.sessions()) == [transcript.session_id]


def test_keep_all_stores_flagged_and_unflagged(store_url: str, transcript: Transcript) -> None:
    with TranscriptStore(store_url, keep="all") as store:
        store.write(transcript)
        store.write(variant(transcript, "calm", 1.0, flags=()))
        assert sorted(ids(store.sessions())) == sorted(["calm", transcript.session_id])


def test_keep_sample_stores_the_sampled_unflagged_sessions_and_every_flagged_one(store_url: str, transcript: Transcript) -> None:
    calm = [f"calm-{i}" for i in range(40)]
    with TranscriptStore(store_url, keep="sample", sample_rate=0.3) as store:
        store.write(transcript)
        for i, session_id in enumerate(calm):
            store.write(variant(transcript, session_id, float(i), flags=()))
        kept = set(ids(store.sessions(SessionQuery(flagged=False, limit=None))))
        assert kept == {s for s in calm if sampled(s, 0.3)} and 0 < len(kept) < len(calm)
        assert store.count(SessionQuery(flagged=True)) == 1


def test_sampled_keeps_the_given_share_the_same_way_every_time() -> None:
    session_ids = [f"session-{i}" for i in range(1000)]
    first = [sampled(s, 0.3) for s in session_ids]
    assert 0.25 <= sum(first) / len(first) <= 0.35
    assert [sampled(s, 0.3) for s in session_ids] == first
    assert not any(sampled(s, 0.0) for s in session_ids) and all(sampled(s, 1.0) for s in session_ids)


@pytest.mark.parametrize(("keep", "rate"), [("some", 0.0), ("sample", 1.5), ("sample", -0.1)])
def test_bad_retention_settings_are_a_store_error(tmp_path: Path, keep: str, rate: float) -> None:
    with pytest.raises(StoreError, match=r"retention|sample rate"):
        TranscriptStore(f"sqlite:///{tmp_path / 'x.db'}", keep=keep, sample_rate=rate)  # type: ignore[arg-type]


# -- checkpoints ------------------------------------------------------------------------------------


def test_final_write_replaces_the_checkpoint(store: TranscriptStore, transcript: Transcript) -> None:
    first = transcript.flags[0]
    cut = first.index + 1
    partial = dataclasses.replace(
        transcript,
        outcome="running",
        steps=transcript.steps[:cut],
        detections=tuple(d for d in transcript.detections if d.start < cut),
        flags=(first,),
        evaluations=transcript.evaluations[:cut],
    )
    store.checkpoint(partial)
    assert store.get(transcript.session_id) == partial
    store.write(transcript)
    assert store.count() == 1 and flag_rows(store) == len(transcript.flags)
    assert store.get(transcript.session_id) == transcript


def stored_bytes(store: TranscriptStore, session_id: str) -> tuple[object, ...]:
    """Every stored column of a session, its blobs and its flag rows: what "byte-identical" compares."""
    with store.engine.connect() as conn:
        rows = [
            conn.execute(sa.select(table).where(table.c.session_id == session_id).order_by(*table.primary_key)).all()
            for table in metadata.sorted_tables
        ]
    return tuple(tuple(tuple(r) for r in rs) for rs in rows)


def test_a_finished_session_is_never_replaced(store: TranscriptStore, transcript: Transcript) -> None:
    store.save(transcript)
    before = stored_bytes(store, transcript.session_id)
    rewritten = dataclasses.replace(transcript, flags=(), messages=(ChatMessage("user", "something else"),))
    shorter = dataclasses.replace(transcript, steps=transcript.steps[:3], outcome="completed")
    for attempt in (rewritten, shorter, dataclasses.replace(transcript, outcome="running")):
        with pytest.raises(StoreConflict, match="never replaced"):
            store.save(attempt)
    assert stored_bytes(store, transcript.session_id) == before


def test_a_checkpoint_is_only_ever_extended(store: TranscriptStore, transcript: Transcript) -> None:
    cut = transcript.flags[0].index + 1
    partial = dataclasses.replace(
        transcript, outcome="running", steps=transcript.steps[:cut], flags=transcript.flags[:1], evaluations=()
    )
    partial = dataclasses.replace(partial, detections=tuple(d for d in transcript.detections if d.start < cut))
    store.checkpoint(partial)
    before = stored_bytes(store, transcript.session_id)
    other_tokens = tuple(dataclasses.replace(s, token_id=s.token_id + 1) for s in transcript.steps)
    for attempt in (dataclasses.replace(transcript, steps=other_tokens), dataclasses.replace(transcript, flags=())):
        with pytest.raises(StoreConflict):
            store.save(attempt)
    assert stored_bytes(store, transcript.session_id) == before
    store.write(transcript)  # the whole session extends its checkpoint
    assert store.get(transcript.session_id) == transcript


def test_writing_the_same_finished_session_again_changes_nothing(store: TranscriptStore, transcript: Transcript) -> None:
    store.save(transcript)  # e.g. a retry whose first acknowledgement was lost
    before = stored_bytes(store, transcript.session_id)
    store.save(transcript)
    assert stored_bytes(store, transcript.session_id) == before


def test_pipeline_with_the_store_as_sink_keeps_one_row_per_session(store: TranscriptStore, run_session: RunSession) -> None:
    t = run_session(sinks=[store])  # three flags: three checkpoints, then the final write
    assert store.count() == 1 and flag_rows(store) == 3
    assert store.get(t.session_id) == t


# -- filters ----------------------------------------------------------------------------------------


def corpus_sessions(transcript: Transcript) -> dict[str, Transcript]:
    """Seven sessions: a..g started at 1000..6000 (f and g both at 6000), various flags and outcomes."""
    crit, info, warn = transcript.flags  # q-spike (harmful_planning), s-noted, s-high (deception)
    rows = [
        ("a", 1000.0, (), "completed"),
        ("b", 2000.0, (info,), "completed"),
        ("c", 3000.0, (warn,), "halted"),
        ("d", 4000.0, (crit, info), "completed"),
        ("e", 5000.0, (), "error"),
        ("f", 6000.0, (info, warn), "aborted"),
        ("g", 6000.0, (warn,), "completed"),
    ]
    return {sid: variant(transcript, sid, started_at, flags=found, outcome=outcome) for sid, started_at, found, outcome in rows}


@pytest.fixture
def corpus(store: TranscriptStore, transcript: Transcript) -> TranscriptStore:
    for t in corpus_sessions(transcript).values():
        store.save(t)
    return store


def test_sessions_are_listed_newest_first(corpus: TranscriptStore) -> None:
    assert ids(corpus.sessions()) == ["f", "g", "e", "d", "c", "b", "a"]


def test_filter_by_flagged(corpus: TranscriptStore) -> None:
    assert ids(corpus.sessions(SessionQuery(flagged=True))) == ["f", "g", "d", "c", "b"]
    assert ids(corpus.sessions(SessionQuery(flagged=False))) == ["e", "a"]


def test_filter_by_category(corpus: TranscriptStore) -> None:
    assert ids(corpus.sessions(SessionQuery(category="harmful_planning"))) == ["d"]
    assert ids(corpus.sessions(SessionQuery(category="deception"))) == ["f", "g", "d", "c", "b"]
    assert corpus.sessions(SessionQuery(category="nothing")) == []


def test_filter_by_rule(corpus: TranscriptStore) -> None:
    assert ids(corpus.sessions(SessionQuery(rule="s-high"))) == ["f", "g", "c"]
    assert ids(corpus.sessions(SessionQuery(rule="q-spike"))) == ["d"]


def test_filter_by_severity_includes_higher_severities(corpus: TranscriptStore) -> None:
    assert ids(corpus.sessions(SessionQuery(severity="info"))) == ["f", "g", "d", "c", "b"]
    assert ids(corpus.sessions(SessionQuery(severity="warning"))) == ["f", "g", "d", "c"]
    assert ids(corpus.sessions(SessionQuery(severity="critical"))) == ["d"]


def test_filter_by_outcome(corpus: TranscriptStore) -> None:
    assert ids(corpus.sessions(SessionQuery(outcome="halted"))) == ["c"]
    assert ids(corpus.sessions(SessionQuery(outcome="completed"))) == ["g", "d", "b", "a"]


def test_filter_by_time_since_inclusive_until_exclusive(corpus: TranscriptStore) -> None:
    assert ids(corpus.sessions(SessionQuery(since=3000.0))) == ["f", "g", "e", "d", "c"]
    assert ids(corpus.sessions(SessionQuery(until=3000.0))) == ["b", "a"]
    assert ids(corpus.sessions(SessionQuery(since=2000.0, until=6000.0))) == ["e", "d", "c", "b"]


def test_limit_and_offset_page_through_in_order(corpus: TranscriptStore) -> None:
    pages = [ids(corpus.sessions(SessionQuery(limit=3, offset=o))) for o in (0, 3, 6)]
    assert pages == [["f", "g", "e"], ["d", "c", "b"], ["a"]]
    assert ids(corpus.sessions(SessionQuery(flagged=True, limit=2, offset=1))) == ["g", "d"]


QUERIES = [
    SessionQuery(),
    SessionQuery(flagged=True),
    SessionQuery(flagged=False),
    SessionQuery(category="deception", severity="warning"),
    SessionQuery(rule="s-noted", outcome="completed"),
    SessionQuery(since=2000.0, until=6000.0, flagged=True),
    SessionQuery(severity="critical", category="nothing"),
]


def test_count_agrees_with_sessions(corpus: TranscriptStore) -> None:
    for query in QUERIES:
        unpaged = dataclasses.replace(query, limit=None)
        assert corpus.count(query) == len(corpus.sessions(unpaged)), query


# -- bulk reads -------------------------------------------------------------------------------------


def test_transcripts_iterates_every_match_in_batches(corpus: TranscriptStore, transcript: Transcript) -> None:
    saved = corpus_sessions(transcript)
    assert list(corpus.transcripts(batch=3)) == [saved[s] for s in ["f", "g", "e", "d", "c", "b", "a"]]
    assert ids(corpus.transcripts(SessionQuery(flagged=True, limit=None), batch=2)) == ["f", "g", "d", "c", "b"]
    assert ids(corpus.transcripts(SessionQuery(limit=4, offset=1), batch=3)) == ["g", "e", "d", "c"]


def test_detection_columns_match_the_stored_detections(corpus: TranscriptStore, transcript: Transcript) -> None:
    rows = list(corpus.detection_columns(SessionQuery(flagged=True, limit=None)))
    assert [summary for summary, _ in rows] == corpus.sessions(SessionQuery(flagged=True))
    for _, columns in rows:
        assert columns.detections() == transcript.detections
        assert [tuple(e) for e in columns.evaluations.tolist()] == list(transcript.evaluations)


# -- schema, reopening, concurrency -----------------------------------------------------------------


def test_migrated_database_matches_the_schema(store: TranscriptStore) -> None:
    with store.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), metadata) == []


def test_opening_again_is_a_no_op_migration(store_url: str, transcript: Transcript) -> None:
    with TranscriptStore(store_url) as first:
        first.save(transcript)
    with TranscriptStore(store_url) as second:
        assert second.get(transcript.session_id) == transcript
        with second.engine.connect() as conn:
            versions = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalars().all()
    config = Config()
    config.set_main_option("script_location", str(Path(monitor.store.store.__file__).parent / "migrations"))
    assert versions == [ScriptDirectory.from_config(config).get_current_head()]


def test_concurrent_writers_lose_nothing(store_url: str, transcript: Transcript) -> None:
    stores = [TranscriptStore(store_url) for _ in range(8)]  # one engine per writer, opened in turn
    errors: list[BaseException] = []

    def writer(w: int) -> None:
        try:
            for i in range(25):
                stores[w].save(variant(transcript, f"w{w}-{i}", float(w * 100 + i)))
        except BaseException as exc:  # the assertion below reports it
            errors.append(exc)

    try:
        threads = [threading.Thread(target=writer, args=(w,)) for w in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        for opened in stores:
            opened.close()
    assert errors == []
    with TranscriptStore(store_url) as store:
        assert store.count() == 200 and flag_rows(store) == 200 * len(transcript.flags)
        assert set(ids(store.sessions(SessionQuery(limit=None)))) == {f"w{w}-{i}" for w in range(8) for i in range(25)}


OPEN_FROM_THREADS = """
import sys, threading
from monitor.store import TranscriptStore

start, failures = threading.Barrier(8), []

def opener():
    start.wait()
    try:
        for _ in range(3):
            TranscriptStore(sys.argv[1]).close()
    except Exception as exc:
        failures.append(f"{type(exc).__name__}: {exc}")

threads = [threading.Thread(target=opener) for _ in range(8)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print("\\n".join(failures))
"""


def test_stores_opened_from_several_threads_at_once(store_url: str) -> None:
    TranscriptStore(store_url).close()  # even when every open is a no-op migration
    # In a child process: the race leaves alembic's module globals holding open connections.
    run = subprocess.run([sys.executable, "-c", OPEN_FROM_THREADS, store_url], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == ""


# -- errors -----------------------------------------------------------------------------------------


def test_unreachable_database_is_a_store_error_that_hides_the_password() -> None:
    with pytest.raises(StoreError) as raised:
        TranscriptStore("postgresql://u:secret@127.0.0.1:1/x")
    message = str(raised.value)
    assert "secret" not in message and "postgresql+psycopg://u:***@127.0.0.1:1/x" in message


@pytest.mark.parametrize(
    "url",
    ["not a url", "nosuchdriver://u:secret@host/db", "sqlite:////nonexistent-dir/sub/transcripts.db"],
)
def test_invalid_url_is_a_store_error(url: str) -> None:
    with pytest.raises(StoreError, match="cannot open the transcript store") as raised:
        TranscriptStore(url)
    assert "secret" not in str(raised.value)


def unmigratable(store_url: str) -> None:
    """Give the database a `sessions` table that the first migration cannot create."""
    engine = sa.create_engine(normalise_url(store_url))
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE sessions (something_else INTEGER)"))
    engine.dispose()


def engine_of_failed_open(raised: pytest.ExceptionInfo[StoreError]) -> sa.Engine:
    """The engine a failed `TranscriptStore(...)` made (its `__init__` frame's `self.engine`)."""
    for entry in raised.traceback:
        store = entry.locals.get("self")
        if entry.name == "__init__" and isinstance(store, TranscriptStore):
            return store.engine
    raise AssertionError("no TranscriptStore.__init__ frame in the traceback")


def test_a_database_that_cannot_be_migrated_is_a_store_error(store_url: str) -> None:
    unmigratable(store_url)
    with pytest.raises(StoreError, match=r"cannot open the transcript store .*sessions") as raised:
        TranscriptStore(store_url)
    engine_of_failed_open(raised).dispose()  # see the next test


def test_a_failed_open_leaves_no_connection_open(store_url: str) -> None:
    unmigratable(store_url)
    with pytest.raises(StoreError) as raised:
        TranscriptStore(store_url)
    engine = engine_of_failed_open(raised)
    left_open = engine.pool.checkedin()  # type: ignore[attr-defined]
    engine.dispose()  # here rather than at the end of the session, where psycopg would warn
    assert left_open == 0


# -- parse_time -------------------------------------------------------------------------------------

NOW = 1_800_000_000.0
MIDNIGHT = 1764460800.0  # 2025-11-30T00:00:00Z


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1764460800", MIDNIGHT),
        ("1764460800.25", MIDNIGHT + 0.25),
        ("2025-11-30T00:00:00Z", MIDNIGHT),
        ("2025-11-30T02:30:00+02:30", MIDNIGHT),
        ("2025-11-30T00:00", MIDNIGHT),
        ("2025-11-30", MIDNIGHT),
        ("2025-11-30 12:00", MIDNIGHT + 12 * 3600),
    ],
)
def test_parse_time_reads_unix_seconds_and_iso_8601(text: str, expected: float) -> None:
    assert parse_time(text, now=NOW) == expected


@pytest.mark.parametrize(("text", "seconds"), [("30m", 1800), ("2h", 7200), ("7d", 604800), (" 1.5h ", 5400), ("45s", 45)])
def test_parse_time_reads_ages_before_now(text: str, seconds: float) -> None:
    assert parse_time(text, now=NOW) == NOW - seconds


@pytest.mark.parametrize("text", ["yesterday", "", "30 minutes", "7x", "-5m", "2025-13-01"])
def test_parse_time_rejects_anything_else_saying_what_is_accepted(text: str) -> None:
    with pytest.raises(ValueError, match=r"is not a time: use unix seconds, ISO 8601 .* or an age"):
        parse_time(text, now=NOW)


@pytest.mark.parametrize("text", ["nan", "inf"])
def test_parse_time_rejects_non_finite_numbers(text: str) -> None:
    with pytest.raises(ValueError):
        parse_time(text, now=NOW)
