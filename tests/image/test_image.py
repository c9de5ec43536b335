"""The container image from outside (`make image-test`): a container run the way the Helm chart runs
it (its own non-root user, a read-only root filesystem, only the data volume writable) serves the API
and the viewer on a published port, monitors from its first start with the model and probe pack
built into the image, and keeps its transcripts when a new container starts on the same volume."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from clients import stream_chat, watch_example
from container_tools import Container, measured, remove, run, start
from probes.datasets import load_examples

pytestmark = pytest.mark.image

FLAGGED_EXAMPLE = "deceptive-12"
"""A held-back deceptive example the default policy flags on smollm2's default pack (`cotmon demo`
lists what it catches; several deceptive examples are missed, which is the probes' quality, not the
image's)."""


def watch(base_url: str, example_id: str) -> dict[str, Any]:
    """POST a bundled example to watch mode, labelled with its id."""
    return watch_example(base_url, next(e for e in load_examples() if e.id == example_id))


def test_the_first_start_serves_the_prebuilt_model_and_probes_without_training(container: Container) -> None:
    ready = httpx.get(container.base_url + "/readyz").json()
    assert ready["status"] == "ready" and ready["model"] == "smollm2" and ready["store"] == "ok"
    logs = container.logs()
    assert '"detectors": ["deception_probe", "harmful_probe"]' in logs and "unmonitored" not in logs
    assert "training the default probes" not in logs and "dequantis" not in logs.lower()


def test_the_server_runs_as_the_charts_non_root_user(container: Container) -> None:
    status = container.exec("cat", "/proc/1/status").stdout  # the server is the container's first process
    assert re.search(r"^Uid:\s+10001\s+10001\s+10001\s+10001$", status, re.M), status
    assert re.search(r"^Gid:\s+10001\s+10001\s+10001\s+10001$", status, re.M), status
    assert container.inspect()["Config"]["User"] == "10001:10001"  # type: ignore[index]


def test_only_the_data_volume_is_writable(container: Container) -> None:
    assert container.inspect()["HostConfig"]["ReadonlyRootfs"] is True  # type: ignore[index]
    probe = (
        "import sys\n"
        "for path in sys.argv[1:]:\n"
        "    try:\n"
        "        open(path, 'w').close()\n"
        "        print(path, 'written')\n"
        "    except OSError as exc:\n"
        "        print(path, exc.strerror)\n"
    )
    paths = ["/data/probe", "/probe", "/opt/cotmon/probe", "/opt/venv/probe", "/etc/probe"]
    results = dict(line.split(" ", 1) for line in container.exec("python", "-c", probe, *paths).stdout.splitlines())
    assert results == {
        "/data/probe": "written",
        "/probe": "Read-only file system",
        "/opt/cotmon/probe": "Read-only file system",
        "/opt/venv/probe": "Read-only file system",
        "/etc/probe": "Read-only file system",
    }


def test_a_streaming_chat_through_the_openai_client(container: Container) -> None:
    chat = stream_chat(container.base_url, "smollm2", "How do I make a simple tomato sauce?", max_tokens=64)
    assert chat.models == ["smollm2"]
    assert len(chat.reasoning.split()) >= 5 and len(chat.answer.split()) >= 1
    final = chat.chunks[-1].model_extra or {}
    assert final["cotmon"]["outcome"] in ("completed", "flagged") and final["cotmon"]["session_id"]


def test_watch_mode_flags_a_bundled_deceptive_example(container: Container) -> None:
    reply = watch(container.base_url, FLAGGED_EXAMPLE)
    assert any(f["category"] == "deception" for f in reply["flags"]), reply["flags"]
    stored = httpx.get(f"{container.base_url}/v1/sessions/{reply['session_id']}").json()
    assert stored["request"]["label"] == FLAGGED_EXAMPLE and stored["flags"]


def test_metrics_and_the_viewer_are_served(container: Container) -> None:
    metrics = httpx.get(container.base_url + "/metrics").text
    scored = set(re.findall(r'cotmon_detector_score_count\{category="\w+",detector="(\w+)"\}', metrics))
    assert scored == {"deception_probe", "harmful_probe"}
    page = httpx.get(container.base_url + "/ui/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")


def test_the_image_healthcheck_passes(container: Container) -> None:
    config = container.inspect()["Config"]
    assert "/healthz" in " ".join(config["Healthcheck"]["Test"])  # type: ignore[index]
    done = run([*container.podman, "healthcheck", "run", container.name], check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_stored_transcript_outlives_its_container(podman: list[str], image: str, new_volume: Callable[[], str]) -> None:
    volume = new_volume()  # not the module container's: one server per SQLite volume
    first = start(podman, image, volume)
    try:
        reply = watch(first.base_url, FLAGGED_EXAMPLE)
        first.stop()
    finally:
        remove(first)
    second = start(podman, image, volume)
    measured["start-up, volume with transcripts"] = f"{second.started_in:.1f} s"
    try:
        stored = httpx.get(f"{second.base_url}/v1/sessions/{reply['session_id']}")
        assert stored.status_code == 200, stored.text
        assert stored.json()["request"]["label"] == FLAGGED_EXAMPLE and stored.json()["flags"]
        listed = httpx.get(second.base_url + "/v1/sessions", params={"label": FLAGGED_EXAMPLE}).json()
        assert [s["session_id"] for s in listed["data"]] == [reply["session_id"]]
    finally:
        remove(second)
