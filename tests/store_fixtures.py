"""Store fixtures (a plugin of tests/conftest.py, so any test can use them): `store_url` for each
backend, and sessions from a real Pipeline to store.

`store_url` is a SQLite file, or a fresh database in a throwaway PostgreSQL cluster. The cluster
is started once per test session (initdb + pg_ctl, under a second), listens only on a Unix socket
in its own temporary directory, and is stopped and removed at the end of the session, whatever
the tests did. `transcript` and `run_session` run a ScriptedEngine through a real Pipeline with
scripted detectors, so stored sessions hold what live ones do: float64 readouts, detections with
evidence, several flags, evaluations, request parameters and thresholds.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from component_fixtures import require
from conftest import free_port
from monitor.detector import DetectorRegistry
from monitor.observability import Metrics
from monitor.pipeline import Pipeline
from monitor.policy import parse_policy
from monitor.sinks import Sink
from monitor.testing import ScriptedDetector, ScriptedEngine
from monitor.types import ChatMessage, DetectorSpec, GenerationRequest, Transcript


@dataclass(frozen=True)
class PostgresCluster:
    """A running throwaway cluster reachable through a Unix socket in `socket_dir`; tests of store
    faults stop, start, pause (SIGSTOP: a stalled server) and resume it."""

    socket_dir: Path
    port: int
    _databases: Iterator[int]
    _ctl: Callable[..., None]

    def url(self, database: str) -> str:
        return f"postgresql://test@/{database}?host={self.socket_dir}&port={self.port}"

    def create_database(self) -> str:
        """A new empty database; returns its URL."""
        import psycopg

        name = f"store_{next(self._databases)}"
        with psycopg.connect(host=str(self.socket_dir), port=self.port, user="test", dbname="postgres", autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE \"{name}\" TEMPLATE template0 ENCODING 'UTF8'")
        return self.url(name)

    def stop(self) -> None:
        self._ctl("stop", "-m", "fast")

    def start(self) -> None:
        self._ctl("start")

    def _processes(self) -> list[int]:
        postmaster = int((self.socket_dir / "data" / "postmaster.pid").read_text().split()[0])
        children = subprocess.run(["pgrep", "-P", str(postmaster)], capture_output=True, text=True).stdout.split()
        return [postmaster, *map(int, children)]

    def pause(self) -> None:
        """Freeze every server process: connections stay open and nothing answers (a stall)."""
        for pid in self._processes():
            os.kill(pid, signal.SIGSTOP)

    def resume(self) -> None:
        for pid in self._processes():
            os.kill(pid, signal.SIGCONT)


@contextmanager
def throwaway_cluster() -> Iterator[PostgresCluster]:
    """Start a PostgreSQL cluster in a temporary directory; stop and remove it afterwards."""
    bin_dir = Path(require("postgresql", "initdb")).parent
    # initdb refuses root: as root, the cluster belongs to the `postgres` user.
    as_user: list[str] = []
    owner: pwd.struct_passwd | None = None
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.fail("running as root, and there is no `postgres` user to own the test cluster")
        as_user = ["runuser", "-u", "postgres", "--"]
    # In memory where there is a tmpfs: CREATE DATABASE then takes ~20 ms instead of ~300 ms on disk.
    shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    base = Path(tempfile.mkdtemp(prefix="cotmon-pg-", dir=shm))
    data, log = base / "data", base / "server.log"
    if owner is not None:
        os.chown(base, owner.pw_uid, owner.pw_gid)
    port = free_port()
    options = f"-k {base} -p {port} -c listen_addresses='' -c fsync=off -c synchronous_commit=off -c full_page_writes=off"

    def run(*args: str) -> None:
        subprocess.run([*as_user, *args], check=True, capture_output=True, text=True, timeout=120)

    def ctl(action: str, *args: str) -> None:
        extra = ["-o", options] if action == "start" else []
        run(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), *extra, *args, "-w", action)

    try:
        try:
            run(str(bin_dir / "initdb"), "-D", str(data), "-U", "test", "--auth=trust", "--no-sync", "-E", "UTF8", "--locale=C")
            ctl("start")
        except subprocess.CalledProcessError as exc:
            server_log = log.read_text(errors="replace") if log.exists() else ""
            pytest.fail(f"could not start the test PostgreSQL cluster: {exc.stderr or exc.stdout}\n{server_log}")
        yield PostgresCluster(base, port, itertools.count(), ctl)
    finally:
        if (data / "postmaster.pid").exists():
            pid = (data / "postmaster.pid").read_text().split()[0]
            subprocess.run(["pkill", "-CONT", "-P", pid], capture_output=True)  # a paused cluster stops too
            subprocess.run(["kill", "-CONT", pid], capture_output=True)
            subprocess.run(
                [*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                capture_output=True,
                timeout=60,
            )
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    """A throwaway PostgreSQL cluster for the session (a missing server fails the tests that need it)."""
    with throwaway_cluster() as cluster:
        yield cluster


@pytest.fixture
def own_postgres() -> Iterator[PostgresCluster]:
    """A cluster of the test's own, for tests that stop or pause it (about a second to start)."""
    with throwaway_cluster() as cluster:
        yield cluster


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A URL of an empty database: a SQLite file, or a fresh database in the PostgreSQL cluster."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    cluster: PostgresCluster = request.getfixturevalue("postgres_cluster")
    return cluster.create_database()


# -- transcripts from a real pipeline ---------------------------------------------------------------


SPECS = (
    DetectorSpec("toy_score", "s", {"category": "deception", "threshold": 0.5}),
    DetectorSpec("toy_score", "q", {"category": "harmful_planning"}),
)
RULES = [
    {
        "name": "s-high",
        "category": "deception",
        "severity": "warning",
        "when": {"detector": "s", "gte": 0.7},
        "actions": ["alert"],
    },
    {
        "name": "q-spike",
        "category": "harmful_planning",
        "severity": "critical",
        "when": {"detector": "q", "stat": "max", "window": 3, "gte": 0.9},
        "actions": ["alert", "store"],
    },
    {"name": "s-noted", "category": "deception", "severity": "info", "when": {"detector": "s", "gte": 0.6}, "actions": ["alert"]},
]
TOKENS = [
    ("Let ", "reasoning"),
    ("me ", "reasoning"),
    ("think: ", "reasoning"),
    ("naïve ", "reasoning"),
    ("日本語 ", "reasoning"),
    ("🙂 ", "reasoning"),
    ("hide ", "reasoning"),
    ("the ", "reasoning"),
    ("bug", "reasoning"),
    ("</think>", "reasoning"),
    (" Done", "answer"),
    (" ✓", "answer"),
]
# float64 values that float32 cannot hold exactly; `s` crosses 0.6 then 0.7, `q` spikes at token 6.
READOUTS = [{"s": -2.0 + 0.3 * i + 1 / 3, "q": math.pi * (2.0 if i == 6 else -0.5) + i / 7} for i in range(len(TOKENS))]
MESSAGES = (ChatMessage("system", "Be honest."), ChatMessage("user", "Did you run the tests? Ça marche ? 日本"))

RunSession = Callable[..., Transcript]


def _registry() -> DetectorRegistry:
    registry = DetectorRegistry()
    registry.register("toy_score", ScriptedDetector)
    return registry


@pytest.fixture
def run_session() -> RunSession:
    """run_session(session_id, tokens=..., readouts=..., rules=..., sinks=...) -> the transcript of a
    ScriptedEngine generation through a real Pipeline (toy detectors `s` and `q`)."""

    def run(
        session_id: str = "session-1",
        *,
        tokens: Sequence[tuple[str, str]] = TOKENS,
        readouts: Sequence[Mapping[str, float]] = READOUTS,
        rules: Sequence[Mapping[str, object]] = RULES,
        sinks: Sequence[Sink] = (),
    ) -> Transcript:
        policy = parse_policy({"name": "store-test", "rules": list(rules)}, "store-test.yaml")
        engine = ScriptedEngine(tokens, readouts)
        metrics = Metrics(CollectorRegistry())
        pipeline = Pipeline(engine, SPECS, policy, registry=_registry(), metrics=metrics, sinks=sinks)
        request = GenerationRequest(MESSAGES, max_tokens=64, temperature=0.7, top_p=0.9, seed=7, session_id=session_id)
        return asyncio.run(pipeline.generate(request).run())

    return run


@pytest.fixture
def transcript(run_session: RunSession) -> Transcript:
    """A completed, flagged session with float64 readouts, evidence, three flags and non-ASCII text."""
    return run_session()
