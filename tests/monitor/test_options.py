"""Command-line options made from Settings fields: `cotmon serve`'s names, precedence and help."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from monitor.cli import main, serve
from monitor.settings import Settings

SERVE_OPTIONS = {
    "--model", "--think", "--host", "--allowed-hosts", "--port", "--device", "--dtype", "--probes", "--no-probes",
    "--detectors", "--policy", "--served-model-name", "--engine", "--tensor-parallel-size", "--gpu-memory-utilization",
    "--vllm-capture", "--upstream-url", "--upstream-model", "--reader", "--judge-url", "--judge-model", "--store-url",
    "--store-keep", "--max-concurrent", "--max-queued", "--max-prompt-tokens", "--max-transcript-tokens",
}  # fmt: skip


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> list[Settings]:
    """The settings `cotmon serve` would run the server with (the server itself is not started)."""
    runs: list[Settings] = []
    monkeypatch.setattr("monitor.server.serve.serve", lambda settings, default_policy: runs.append(settings))
    monkeypatch.setattr("monitor.observability.configure_logging", lambda **kwargs: None)
    return runs


def test_serve_keeps_every_option_it_had() -> None:
    options = {flag for param in serve.params if isinstance(param, click.Option) for flag in param.opts}
    assert options - {"-h", "--help"} == SERVE_OPTIONS


def test_an_option_overrides_its_variable_which_overrides_the_default(served: list[Settings]) -> None:
    env = {"COTMON_MODEL": "org/m", "COTMON_PORT": "9", "COTMON_MAX_QUEUED": "3"}
    args = ["serve", "--port", "7", "--no-probes", "--allowed-hosts", "a, b", "--store-keep", "all", "--engine", "upstream"]
    result = CliRunner(env=env).invoke(main, args)
    assert result.exit_code == 0, result.output
    (settings,) = served
    assert settings.model == "org/m" and settings.port == 7 and settings.max_queued == 3
    assert settings.probes is None and settings.allowed_hosts == ("a", "b")
    assert settings.store_keep == "all" and settings.engine == "upstream"


def test_a_probe_directory_and_a_policy_file_are_paths(served: list[Settings], tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("name: p\nrules: []\n")
    result = CliRunner().invoke(main, ["serve", "--probes", str(tmp_path), "--policy", str(policy)])
    assert result.exit_code == 0, result.output
    assert served[0].probes == tmp_path and served[0].policy == policy


@pytest.mark.parametrize(
    "args", [["--port", "many"], ["--engine", "llama"], ["--store-keep", "some"], ["--policy", "/no/such/policy.yaml"]]
)
def test_a_bad_option_value_is_a_usage_error(served: list[Settings], args: list[str]) -> None:
    result = CliRunner().invoke(main, ["serve", *args])
    assert result.exit_code == 2 and args[0] in result.output and not served


def test_serve_help_is_the_settings_documentation() -> None:
    helps: dict[str, Any] = {param.name: param.help for param in serve.params if isinstance(param, click.Option)}
    for name, text in helps.items():
        if name in Settings.model_fields:
            assert text.startswith(Settings.model_fields[name].description or "-"), name
            assert f"COTMON_{name.upper()}" in text, name
    assert "default 8000" in helps["port"] and "default smollm2" in helps["model"]
