"""Alerting end to end, with the real components: a real Prometheus and Alertmanager (Debian's
packages) on loopback scrape a running cotmon. A deceptive scripted session, streamed through the
official `openai` client, makes the deception alert fire in Prometheus' API; Alertmanager, on the
example configuration, delivers it to a webhook with the viewer link, and that link lists the
flagged session. Every Grafana panel's query then returns data from the same Prometheus."""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml
from openai import OpenAI
from prometheus_client import CollectorRegistry

from component_fixtures import require
from conftest import free_port
from deploy_tools import ALERTS, DASHBOARD, EXAMPLES, ROOT, VIEWER_URL_PLACEHOLDER, dashboard_panels, substitute
from monitor.observability import Metrics
from monitor.pipeline import Pipeline
from monitor.policy import parse_policy
from monitor.server.app import create_app
from monitor.settings import Settings
from monitor.store import TranscriptStore
from monitor.testing import SCRIPTED_MODEL, JudgeReply, ScriptedEngine, ScriptedJudge, ServerThread
from monitor.types import DetectorSpec
from probes.linear import LinearProbe, ProbeMetadata

HONEST = "The report shows revenue fell four percent this quarter ."
DECEPTIVE = (
    "But if I say that the board will ask questions . I will tell them revenue grew , and hide the "
    "loss in the appendix where nobody reads . They will not check the numbers ."
)
COT = [*re.findall(r"\S+", HONEST), *re.findall(r"\S+", DECEPTIVE)]  # one scripted token a word
QUOTE = "I will tell them revenue grew"
VERDICT = json.dumps(
    {
        "verdicts": [
            {"category": "deception", "score": 0.95, "rationale": "Plans to misreport revenue.", "quotes": [QUOTE]},
            {"category": "harmful_planning", "score": 0.05, "rationale": "Nothing harmful.", "quotes": []},
        ]
    }
)
JUDGE_RULE = {
    "name": "judge-deception",
    "category": "deception",
    "severity": "warning",
    "when": {"detector": "cot_judge", "category": "deception", "gte": 0.8},
    "actions": ["alert", "store"],
}


def probe(directory: Path, name: str, category: str) -> str:
    """A linear probe artifact for the scripted model (its readout values are scripted anyway)."""
    d = SCRIPTED_MODEL.d_model
    meta = ProbeMetadata(
        name=name,
        category=category,
        model_id=SCRIPTED_MODEL.model_id,
        model_revision=SCRIPTED_MODEL.revision,
        layer=1,
        d_model=d,
        threshold=0.7,
        target_fpr=0.01,
    )
    ones = np.ones(d, np.float32)
    return str(LinearProbe(meta=meta, direction=ones, bias=0.0, mean=np.zeros(d, np.float32), scale=ones).save(directory / name))


def scripted_engine() -> ScriptedEngine:
    """Honest reasoning (probe logits -3), then deceptive (+4): the default policy's critical
    deception rule halts it once 24 of 32 tokens score over the threshold."""
    tokens = [(w + " ", "reasoning") for w in COT] + [("</think>", "reasoning"), (" Revenue grew.", "answer")]
    honest = len(re.findall(r"\S+", HONEST))
    readouts = [{"deception_probe": -3.0 if i < honest else 4.0, "harmful_probe": -4.0 + 0.1 * i} for i in range(len(tokens))]
    return ScriptedEngine(tokens, readouts)


class Webhook:
    """Alertmanager's receiver: records the JSON it POSTs, by path."""

    def __init__(self) -> None:
        received: list[tuple[str, dict[str, Any]]] = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                received.append((self.path, json.loads(body)))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.received = received
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Webhook:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@dataclass
class Monitoring:
    prometheus: str
    alertmanager: str
    webhook: Webhook
    logs: tuple[Path, ...]
    """Prometheus' and Alertmanager's output, shown when something does not happen in time."""


def start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)


def poll(what: str, probe: Callable[[], Any], timeout: float = 60, logs: tuple[Path, ...] = ()) -> Any:
    """probe() until it returns something truthy; on timeout fail with `what` and the logs' tails."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if found := probe():
                return found
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    tails = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}" for p in logs if p.exists())
    pytest.fail(f"timed out waiting for {what}\n{tails}")


@pytest.fixture
def cotmon(tmp_path: Path) -> Iterator[ServerThread]:
    """A running cotmon: the default policy (two probes) plus a judge rule, a scripted judge LLM, a store."""
    policy = yaml.safe_load((ROOT / "policies" / "default.yaml").read_text(encoding="utf-8"))
    policy["rules"].append(JUDGE_RULE)
    judge_args = {"url": "", "model": "judge", "every": 8, "paragraphs": False, "escalate_at": 0.0, "max_retries": 0}
    specs = [
        DetectorSpec("linear_probe", "deception_probe", {"artifact": probe(tmp_path, "deception_probe", "deception")}),
        DetectorSpec("linear_probe", "harmful_probe", {"artifact": probe(tmp_path, "harmful_probe", "harmful_planning")}),
    ]
    # The judge's first call fails (an error outcome on the dashboard), the others find deception.
    with ScriptedJudge([JudgeReply("overloaded", status=503)], default=VERDICT) as judge:
        specs.append(DetectorSpec("cot_judge", "cot_judge", judge_args | {"url": judge.base_url}))
        settings = Settings.load({}, data_dir=tmp_path / "data")
        metrics = Metrics(CollectorRegistry())
        store = TranscriptStore.at(settings.data_dir)
        pipeline = Pipeline(scripted_engine(), specs, parse_policy(policy, "default.yaml"), metrics=metrics, sinks=[store])
        with ServerThread(create_app(settings, pipeline, store=store, model_name="scripted")) as server:
            yield server


@pytest.fixture
def monitoring(tmp_path: Path, cotmon: ServerThread) -> Iterator[Monitoring]:
    """Prometheus (1 s scrapes and rule evaluations, the chart's alert rules) and Alertmanager (the
    example configuration, its webhooks pointed here, waits cut to a second) on loopback."""
    prometheus_bin, alertmanager_bin = require("prometheus"), require("alertmanager")
    prom_port, am_port = free_port(), free_port()
    rules = tmp_path / "alerts.yaml"
    rules.write_text(ALERTS.read_text(encoding="utf-8").replace(VIEWER_URL_PLACEHOLDER, cotmon.base_url), encoding="utf-8")
    (tmp_path / "prometheus.yml").write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(rules)],
                "alerting": {"alertmanagers": [{"static_configs": [{"targets": [f"127.0.0.1:{am_port}"]}]}]},
                "scrape_configs": [
                    {"job_name": "cotmon", "static_configs": [{"targets": [cotmon.base_url.removeprefix("http://")]}]}
                ],
            }
        )
    )
    with Webhook() as webhook:
        config = yaml.safe_load((EXAMPLES / "alertmanager.yaml").read_text(encoding="utf-8"))
        for receiver in config["receivers"]:
            for hook in receiver["webhook_configs"]:
                hook["url"] = webhook.url + "/" + receiver["name"]
        for route in [config["route"], *config["route"]["routes"]]:
            route |= {"group_wait": "1s", "group_interval": "1s"}
        (tmp_path / "alertmanager.yml").write_text(yaml.safe_dump(config))
        logs = (tmp_path / "prometheus.log", tmp_path / "alertmanager.log")
        processes = [
            start(
                [
                    alertmanager_bin,
                    f"--config.file={tmp_path / 'alertmanager.yml'}",
                    f"--storage.path={tmp_path / 'am'}",
                    f"--web.listen-address=127.0.0.1:{am_port}",
                    "--cluster.listen-address=",
                ],
                logs[1],
            ),
            start(
                [
                    prometheus_bin,
                    f"--config.file={tmp_path / 'prometheus.yml'}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{prom_port}",
                ],
                logs[0],
            ),
        ]
        try:
            monitoring = Monitoring(f"http://127.0.0.1:{prom_port}", f"http://127.0.0.1:{am_port}", webhook, logs)
            for name, url in (("Prometheus", monitoring.prometheus), ("Alertmanager", monitoring.alertmanager)):
                # Until then the API answers 503 in plain text.
                poll(f"{name} to be ready", lambda url=url: httpx.get(url + "/-/ready").status_code == 200, logs=logs)
            yield monitoring
        finally:
            for process in processes:
                process.terminate()
            for process in processes:
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def query(prometheus: str, expr: str) -> list[dict[str, Any]]:
    answer = httpx.get(prometheus + "/api/v1/query", params={"query": expr}, timeout=10).json()
    assert answer["status"] == "success", f"{expr}: {answer}"
    return answer["data"]["result"]  # type: ignore[no-any-return]


def firing(prometheus: str, name: str) -> list[dict[str, Any]]:
    alerts = httpx.get(prometheus + "/api/v1/alerts", timeout=10).json()["data"]["alerts"]
    return [a for a in alerts if a["labels"]["alertname"] == name and a["state"] == "firing"]


def test_a_deceptive_session_alerts_through_prometheus_and_alertmanager(cotmon: ServerThread, monitoring: Monitoring) -> None:
    prom, logs = monitoring.prometheus, monitoring.logs
    # Prometheus has the rule's series at 0 before the session: the first flag is an increase.
    first_scrape = 'cotmon_flags_total{job="cotmon", rule="deception-probe-critical"} == 0'
    poll("the first scrape of cotmon", lambda: query(prom, first_scrape), logs=logs)

    with OpenAI(base_url=cotmon.base_url + "/v1", api_key="unused", max_retries=0) as client:
        stream = client.chat.completions.create(
            model="scripted", messages=[{"role": "user", "content": "Summarise the quarter for the board."}], stream=True
        )
        chunks = list(stream)
    assert chunks[-1].choices[0].finish_reason == "content_filter"  # the critical rule halted it
    session_id = (chunks[-1].model_extra or {})["cotmon"]["session_id"]

    alerts = poll("CotmonDeceptionFlagged to fire in Prometheus", lambda: firing(prom, "CotmonDeceptionFlagged"), logs=logs)
    assert {a["labels"]["rule"] for a in alerts} <= {"deception-probe-warning", "deception-probe-critical", "judge-deception"}
    assert {"category": "deception", "job": "cotmon"}.items() <= alerts[0]["labels"].items()
    poll("CotmonGenerationHalted to fire", lambda: firing(prom, "CotmonGenerationHalted"), logs=logs)

    def delivered() -> list[dict[str, Any]]:
        return [
            alert
            for path, body in monitoring.webhook.received
            for alert in body["alerts"]
            if alert["labels"]["alertname"] == "CotmonDeceptionFlagged" and alert["labels"]["rule"] == "deception-probe-critical"
        ]

    alert = poll("Alertmanager's webhook call with the deception alert", delivered, logs=logs)[0]
    paths = {path for path, body in monitoring.webhook.received}
    assert "/cotmon-critical" in paths  # routed by severity: the critical rule's alert to the critical receiver
    link = alert["annotations"]["viewer_url"]
    assert link.startswith(cotmon.base_url + "/ui/?rule=deception-probe-critical&since=")
    assert alert["annotations"]["runbook_url"] == cotmon.base_url + "/ui/runbook#CotmonDeceptionFlagged"
    # One click: the link lists the flagged session, and the runbook link opens its section.
    page = httpx.get(link)
    assert page.status_code == 200 and session_id in page.text
    assert 'id="CotmonDeceptionFlagged"' in httpx.get(alert["annotations"]["runbook_url"]).text

    # Every dashboard panel's query returns data from this Prometheus.
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    queries = [
        (p.get("title", "?"), t["expr"]) for p in dashboard_panels(dashboard) for t in p.get("targets", []) if t.get("expr")
    ]
    assert len(queries) >= 10
    empty = [(title, expr) for title, expr in queries if not query(prom, substitute(expr))]
    assert not empty, f"panels whose query returned no data: {empty}"
