"""The container image's tests (a plugin of tests/conftest.py): podman as `make image-test` runs it,
containers started the way the Helm chart runs them, and the image's measurements in the summary.

Tests marked `image` need the image built first (`make image-test` builds it, then runs them with
`-m image`): they are deselected from any run whose `-m` does not name `image`.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx
import pytest

OPT_IN_MARKERS = ("image",)
"""Markers whose tests run only when `-m` names them."""
IMAGE_VARIABLE = "COTMON_TEST_IMAGE"
PODMAN_VARIABLE = "COTMON_TEST_PODMAN"
CONTAINER_PORT = 8000

measured: dict[str, str] = {}
"""What the image's tests measured (size, start-up times), printed at the end of the run."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    wanted = config.getoption("markexpr") or ""
    dropped = [i for i in items if any(i.get_closest_marker(m) and m not in wanted for m in OPT_IN_MARKERS)]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [i for i in items if i not in dropped]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if measured:
        terminalreporter.section("container image")
        for name, value in measured.items():
            terminalreporter.write_line(f"{name:34} {value}")


def run(command: list[str], check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        pytest.fail(f"{shlex.join(command)} failed ({done.returncode}): {(done.stderr or done.stdout).strip()[-2000:]}")
    return done


@pytest.fixture(scope="session")
def podman() -> list[str]:
    """The podman command `make image-test` uses (with its runtime option), checked to be installed."""
    from component_fixtures import require

    require("podman")
    command = shlex.split(os.environ.get(PODMAN_VARIABLE, "podman"))
    if "--runtime" in command:
        require("runc")
    return command


@pytest.fixture(scope="session")
def image(podman: list[str]) -> str:
    """The image under test: COTMON_TEST_IMAGE, which must have been built."""
    name = os.environ.get(IMAGE_VARIABLE, "")
    if not name:
        pytest.fail(f"{IMAGE_VARIABLE} is not set: `make image-test` builds the image and runs these tests", pytrace=False)
    if run([*podman, "image", "exists", name], check=False).returncode != 0:
        pytest.fail(f"no image {name}: `make image-test` builds it", pytrace=False)
    size = int(run([*podman, "image", "inspect", "--format", "{{.Size}}", name]).stdout)
    measured["image"] = name
    measured["image size (uncompressed)"] = f"{size / 1e9:.2f} GB ({size / 2**30:.2f} GiB)"
    return name


@dataclass
class Container:
    """A running container of the image, its API on a loopback port."""

    podman: list[str]
    name: str
    base_url: str
    started_in: float
    """Seconds from `podman run` to /readyz answering 200."""

    def exec(self, *command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run([*self.podman, "exec", self.name, *command], check=check)

    def inspect(self) -> dict[str, object]:
        found: list[dict[str, object]] = json.loads(run([*self.podman, "container", "inspect", self.name]).stdout)
        return found[0]

    def logs(self) -> str:
        done = run([*self.podman, "logs", self.name], check=False)
        return done.stdout + done.stderr

    def stop(self) -> None:
        """SIGTERM, as Kubernetes stops a pod (the server drains, then exits)."""
        run([*self.podman, "stop", "--time", "40", self.name], timeout=60)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(podman: list[str], image: str, volume: str, timeout: float = 600) -> Container:
    """`podman run` the image as the chart runs it: its own user (no --user), a read-only root
    filesystem, no capabilities, no privilege escalation, the data volume at /data; then wait for
    /readyz. The published port reaches the server from outside, as a Service would."""
    name = f"cotmon-test-{uuid.uuid4().hex[:8]}"
    port = free_port()
    command = [
        *podman,
        "run",
        "--detach",
        "--name",
        name,
        "--read-only",
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges",
        "--publish",
        f"127.0.0.1:{port}:{CONTAINER_PORT}",
        "--volume",
        f"{volume}:/data",
        image,
    ]
    began = time.monotonic()
    run(command)
    container = Container(podman, name, f"http://127.0.0.1:{port}", 0.0)
    while True:
        try:
            if httpx.get(container.base_url + "/readyz", timeout=5).status_code == 200:
                break
        except httpx.TransportError:
            pass
        state = container.inspect()["State"]
        running = isinstance(state, dict) and state.get("Running")
        if not running or time.monotonic() - began > timeout:
            logs = container.logs()
            remove(container)
            pytest.fail(f"the container did not become ready ({'exited' if not running else 'timed out'}):\n{logs[-4000:]}")
        time.sleep(0.25)
    container.started_in = time.monotonic() - began
    return container


def remove(container: Container) -> None:
    run([*container.podman, "rm", "--force", "--time", "5", container.name], check=False)


@pytest.fixture(scope="module")
def new_volume(podman: list[str]) -> Iterator[Callable[[], str]]:
    """new_volume() -> a fresh named volume for /data (podman gives it the owner of the image's
    /data, uid 10001); all are removed after the module."""
    made: list[str] = []

    def make() -> str:
        made.append(f"cotmon-test-{uuid.uuid4().hex[:8]}")
        run([*podman, "volume", "create", made[-1]])
        return made[-1]

    yield make
    for name in made:
        run([*podman, "volume", "rm", "--force", name], check=False)


@pytest.fixture(scope="module")
def container(podman: list[str], image: str, new_volume: Callable[[], str]) -> Iterator[Container]:
    """One container for the module's tests, started on an empty data volume."""
    started = start(podman, image, new_volume())
    measured["start-up, empty volume"] = f"{started.started_in:.1f} s (podman run to /readyz 200)"
    try:
        yield started
    finally:
        remove(started)
