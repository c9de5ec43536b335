"""The command line: help, policy check, settings from the environment."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from monitor.cli import main
from monitor.settings import Settings, SettingsError
from policies import bundled_policy


def test_help_lists_the_commands() -> None:
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    assert "demo" in result.output and "policy" in result.output


def test_policy_check_accepts_the_bundled_policies() -> None:
    for name in ("default", "strict"):
        path = str(bundled_policy(name))
        result = CliRunner().invoke(
            main, ["policy", "check", path, "--detector", "deception_probe=0.7", "--detector", "harmful_probe=0.6"]
        )
        assert result.exit_code == 0, result.output
        assert "ok" in result.output


def test_policy_check_reports_file_rule_and_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "name: x\nrules:\n  - {name: r, category: deception, severity: loud, when: {detector: d, gte: 0.5}, actions: [alert]}\n"
    )
    result = CliRunner().invoke(main, ["policy", "check", str(bad)])
    assert result.exit_code != 0
    assert "bad.yaml" in result.output and "rule 'r'" in result.output and "severity" in result.output


def test_settings_come_from_defaults_then_environment_then_overrides() -> None:
    assert Settings.load({}).model == "smollm2" and Settings.load({}).probes == Path("auto")
    assert Settings.load({"COTMON_PROBES": "none"}).probes is None
    assert Settings.load({"COTMON_MODEL": "org/m"}).model == "org/m"
    assert Settings.load({"COTMON_MODEL": "org/m"}, model="other").model == "other"
    assert Settings.load({"COTMON_DATA_DIR": "/x"}).store_location == "sqlite:////x/transcripts.db"
    assert Settings.load({"COTMON_STORE_URL": "postgresql://db/cotmon"}).store_location == "postgresql://db/cotmon"


def test_a_prebuilt_dir_adds_read_only_caches_before_the_data_dir() -> None:
    assert Settings.load({}).prebuilt_models == () and Settings.load({}).prebuilt_probes == ()
    settings = Settings.load({"COTMON_PREBUILT_DIR": "/opt/cotmon", "COTMON_DATA_DIR": "/data"})
    assert settings.prebuilt_models == (Path("/opt/cotmon/models"),) and settings.models_dir == Path("/data/models")
    assert settings.prebuilt_probes == (Path("/opt/cotmon/probes"),) and settings.probes_dir == Path("/data/probes")


def test_an_unknown_cotmon_variable_is_ignored() -> None:
    # the container image sets variables a newer cotmon reads (COTMON_ALLOWED_HOSTS); an older one goes on
    assert Settings.load({"COTMON_NO_SUCH_SETTING": "x"}) == Settings.load({})


def test_bad_setting_names_the_variable() -> None:
    with pytest.raises(SettingsError, match="COTMON_SEED"):
        Settings.load({"COTMON_SEED": "many"})
