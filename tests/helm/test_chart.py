"""The Helm chart, rendered by the real helm binary: `helm lint --strict` and Kubernetes' own schemas
(kubernetes-validate, 1.30) accept the default, sidecar and PostgreSQL values; the sidecar pod, the
Secret, the SQLite volume, GPUs, probes and the security context come out as values ask; the
PrometheusRule carries files/alerts.yaml with the viewer URL filled in and the dashboard ConfigMap
files/dashboard.json as is; values.schema.json and the chart's own checks reject bad values with a
message that names them; NOTES.txt tells where things are and warns when transcripts would be lost."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from deploy_tools import ALERTS, CHART, DASHBOARD, EXAMPLES, ROOT, VIEWER_URL_PLACEHOLDER

NAMESPACE = "monitoring-ns"
RELEASE = "rel"
FULLNAME = "rel-cotmon"
SERVICE_URL = f"http://{FULLNAME}.{NAMESPACE}.svc.cluster.local:8000"
SIDECAR = EXAMPLES / "values-sidecar.yaml"
POSTGRES = EXAMPLES / "values-postgres.yaml"
VALUE_SETS = {"default": [], "sidecar": ["-f", str(SIDECAR)], "postgres": ["-f", str(POSTGRES)]}
# kubernetes-validate has no schema for the Prometheus Operator's CRDs and says so; nothing else may appear.
CRD_WARNING = re.compile(r"WARN \S+ Couldn't find schema for kind (ServiceMonitor|PrometheusRule) with api version monitoring\.")

Manifest = dict[str, Any]


def helm_template(helm: Path, *args: str, chart: Path = CHART) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(helm), "template", RELEASE, str(chart), "--namespace", NAMESPACE, *args], capture_output=True, text=True, check=False
    )


def render(helm: Path, *args: str, chart: Path = CHART) -> list[Manifest]:
    """The manifests `helm template` renders (it must succeed)."""
    result = helm_template(helm, *args, chart=chart)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def values_file(tmp_path: Path, values: dict[str, Any]) -> list[str]:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    return ["-f", str(path)]


def only(manifests: list[Manifest], kind: str, name: str | None = None) -> Manifest:
    found = [m for m in manifests if m["kind"] == kind and (name is None or m["metadata"]["name"] == name)]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''} in {[(m['kind'], m['metadata']['name']) for m in manifests]}"
    return found[0]


def kinds(manifests: list[Manifest]) -> list[str]:
    return [m["kind"] for m in manifests]


def pod_spec(manifests: list[Manifest]) -> dict[str, Any]:
    spec: dict[str, Any] = only(manifests, "Deployment")["spec"]["template"]["spec"]
    return spec


def container(manifests: list[Manifest], name: str) -> dict[str, Any]:
    (found,) = [c for c in pod_spec(manifests)["containers"] if c["name"] == name]
    return found


def env(container: dict[str, Any]) -> dict[str, Any]:
    """name -> value, or the valueFrom source."""
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def notes(helm: Path, tmp_path: Path, *args: str) -> str:
    """NOTES.txt as an install prints it: `helm template` leaves NOTES out, so a copy of the chart
    wraps it in a named template and renders that into a manifest."""
    chart = tmp_path / "chart" / "cotmon"
    shutil.copytree(CHART, chart)
    source = chart / "templates" / "NOTES.txt"
    (chart / "templates" / "_notes.tpl").write_text('{{- define "notes" }}' + source.read_text() + "{{- end }}")
    source.unlink()
    (chart / "templates" / "notes.yaml").write_text('notes: {{ include "notes" . | toJson }}')
    result = helm_template(helm, "--show-only", "templates/notes.yaml", *args, chart=chart)
    assert result.returncode == 0, result.stderr
    text: str = yaml.safe_load(result.stdout)["notes"]
    return text


@pytest.mark.parametrize("name", VALUE_SETS)
def test_lint_strict_passes(helm: Path, name: str) -> None:
    lint = [str(helm), "lint", "--strict", str(CHART), *VALUE_SETS[name]]
    result = subprocess.run(lint, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", VALUE_SETS)
def test_rendered_manifests_pass_kubernetes_schemas(helm: Path, name: str) -> None:
    rendered = helm_template(helm, *VALUE_SETS[name])
    assert rendered.returncode == 0, rendered.stderr
    validate = [sys.executable, "-m", "kubernetes_validate", "--strict", "-k", "1.30.0", "--quiet", "-"]
    result = subprocess.run(validate, input=rendered.stdout, capture_output=True, text=True, check=False)
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert result.returncode == 0 and all(CRD_WARNING.match(line) for line in lines), "\n".join(lines)


def test_sidecar_pod_runs_the_agent_beside_cotmon_on_localhost(helm: Path) -> None:
    manifests = render(helm, "-f", str(SIDECAR))
    assert [c["name"] for c in pod_spec(manifests)["containers"]] == ["cotmon", "agent"]
    agent = container(manifests, "agent")
    assert agent["image"] == "ghcr.io/example/agent:1.0"
    variables = env(agent)
    assert variables["OPENAI_BASE_URL"] == "http://localhost:8000/v1"
    assert variables["OPENAI_API_KEY"] == {"secretKeyRef": {"name": "cotmon-agent-keys", "key": "api-key", "optional": True}}
    assert env(container(manifests, "cotmon"))["COTMON_API_KEY"] == variables["OPENAI_API_KEY"]
    service_ports = {p["name"]: p["targetPort"] for p in only(manifests, "Service")["spec"]["ports"]}
    assert service_ports == {"http": "http", "web": "web"}


def test_sidecar_mode_without_an_agent_image_fails_clearly(helm: Path) -> None:
    result = helm_template(helm, "--set", "mode=sidecar")
    assert result.returncode != 0
    assert "mode: sidecar needs agent.image" in result.stderr


def test_standalone_mode_has_cotmon_alone(helm: Path) -> None:
    manifests = render(helm)
    assert [c["name"] for c in pod_spec(manifests)["containers"]] == ["cotmon"]
    assert [p["name"] for p in only(manifests, "Service")["spec"]["ports"]] == ["http"]


@pytest.mark.parametrize(
    ("external_url", "viewer_url"),
    [("", SERVICE_URL), ("https://cotmon.example.com/", "https://cotmon.example.com")],
    ids=["in-cluster", "external"],
)
def test_prometheus_rule_groups_are_the_alert_file_with_the_viewer_url(helm: Path, external_url: str, viewer_url: str) -> None:
    values = ["prometheusRule.enabled=true", "prometheusRule.labels.release=prometheus", f"viewer.externalURL={external_url}"]
    manifests = render(helm, *(arg for value in values for arg in ("--set", value)))
    rule = only(manifests, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1" and rule["metadata"]["labels"]["release"] == "prometheus"
    expected = yaml.safe_load(ALERTS.read_text().replace(VIEWER_URL_PLACEHOLDER, viewer_url))["groups"]
    assert rule["spec"]["groups"] == expected
    assert VIEWER_URL_PLACEHOLDER not in json.dumps(rule)


def test_prometheus_templates_in_alerts_pass_through_verbatim(helm: Path, tmp_path: Path) -> None:
    """A rule file like the real one: Prometheus' {{ }} templates stay as they are, every link gets the URL."""
    chart = tmp_path / "cotmon"
    shutil.copytree(CHART, chart)
    annotations = {
        "summary": "{{ $value | humanize }} flags of {{ $labels.rule }}",
        "viewer": f"{VIEWER_URL_PLACEHOLDER}/ui/?rule={{{{ $labels.rule }}}}&severity=critical",
    }
    alert = {"alert": "CotmonFlag", "expr": 'increase(cotmon_flags_total{job="cotmon"}[5m]) > 0', "annotations": annotations}
    (chart / "files" / "alerts.yaml").write_text(yaml.safe_dump({"groups": [{"name": "cotmon", "rules": [alert]}]}))
    only_rule = ["--show-only", "templates/prometheusrule.yaml"]
    (rendered,) = render(helm, "--set", "prometheusRule.enabled=true", *only_rule, chart=chart)
    assert rendered["spec"]["groups"][0]["rules"][0]["annotations"] == {
        "summary": "{{ $value | humanize }} flags of {{ $labels.rule }}",
        "viewer": f"{SERVICE_URL}/ui/?rule={{{{ $labels.rule }}}}&severity=critical",
    }


def test_service_monitor_scrapes_metrics_as_job_cotmon(helm: Path) -> None:
    manifests = render(helm, "--set", "serviceMonitor.enabled=true")
    monitor = only(manifests, "ServiceMonitor")
    service = only(manifests, "Service")
    assert service["metadata"]["labels"][monitor["spec"]["jobLabel"]] == "cotmon"
    (endpoint,) = monitor["spec"]["endpoints"]
    assert (endpoint["port"], endpoint["path"]) == ("http", "/metrics")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()


def test_monitoring_resources_are_off_by_default(helm: Path) -> None:
    manifests = render(helm)
    assert {"ServiceMonitor", "PrometheusRule"}.isdisjoint(kinds(manifests))
    assert [m["metadata"]["name"] for m in manifests if m["kind"] == "ConfigMap"] == [f"{FULLNAME}-env"]


def test_dashboard_configmap_holds_the_dashboard_with_viewer_links_for_grafana(helm: Path) -> None:
    url = "https://cotmon.example.com"
    manifests = render(
        helm, "--set", "dashboard.enabled=true", "--set", "dashboard.folder=Safety", "--set", f"viewer.externalURL={url}/"
    )
    dashboard = only(manifests, "ConfigMap", f"{FULLNAME}-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["metadata"]["annotations"] == {"grafana_folder": "Safety"}
    (text,) = dashboard["data"].values()
    source = DASHBOARD.read_text()
    assert VIEWER_URL_PLACEHOLDER in source and VIEWER_URL_PLACEHOLDER not in text
    assert json.loads(text) == json.loads(source.replace(VIEWER_URL_PLACEHOLDER, url))


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("replicaCout=2", "Additional property replicaCout is not allowed"),
        ("store.keep=some", 'store.keep must be one of the following: "flagged", "all", "sample"'),
        ("mode=sidecars", 'mode must be one of the following: "standalone", "sidecar"'),
        ("persistence.enabeld=false", "Additional property enabeld is not allowed"),
    ],
)
def test_schema_rejects_bad_values_by_name(helm: Path, flag: str, message: str) -> None:
    result = helm_template(helm, "--set", flag)
    assert result.returncode != 0
    assert message in result.stderr


def test_cotmon_container_has_probes_and_a_restrictive_security_context(helm: Path) -> None:
    manifests = render(helm)
    cotmon = container(manifests, "cotmon")
    assert cotmon["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert cotmon["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert cotmon["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    security = cotmon["securityContext"]
    assert security["runAsNonRoot"] and security["runAsUser"] > 0 and security["readOnlyRootFilesystem"]
    assert security["allowPrivilegeEscalation"] is False and security["capabilities"]["drop"] == ["ALL"]
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    pod = pod_spec(manifests)
    assert pod["automountServiceAccountToken"] is False
    assert only(manifests, "ServiceAccount")["automountServiceAccountToken"] is False
    assert {m["mountPath"] for m in cotmon["volumeMounts"]} >= {"/tmp", "/cache/huggingface"}


def test_the_default_image_is_the_one_make_image_builds(helm: Path) -> None:
    repository = re.search(r"^IMAGE_REPOSITORY \?= (\S+)$", (ROOT / "Makefile").read_text(), re.M)
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert repository and yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"] == version
    assert container(render(helm), "cotmon")["image"] == f"{repository[1]}:{version}"
    assert container(render(helm, "--set", "gpu=1"), "cotmon")["image"] == f"{repository[1]}:{version}-cuda"  # VARIANT=cuda
    assert container(render(helm, "--set", "gpu=1", "--set", "image.tag=mine"), "cotmon")["image"] == f"{repository[1]}:mine"


def test_the_pod_runs_as_the_images_user_with_its_data_dir_on_the_volume(helm: Path) -> None:
    containerfile = (ROOT / "Containerfile").read_text()
    user = re.search(r"^USER (\d+):(\d+)$", containerfile, re.M)
    assert user and "--uid 10001 --gid 10001" in containerfile
    manifests = render(helm)
    security, pod = container(manifests, "cotmon")["securityContext"], pod_spec(manifests)["securityContext"]
    assert (
        (security["runAsUser"], security["runAsGroup"]) == (int(user[1]), int(user[2])) == (pod["runAsUser"], pod["runAsGroup"])
    )
    assert pod["fsGroup"] == int(user[2])  # the data volume is writable by the image's group
    assert 'VOLUME ["/data"]' in containerfile and "COTMON_DATA_DIR=/data" in containerfile
    settings = only(manifests, "ConfigMap", f"{FULLNAME}-env")["data"]
    assert settings["COTMON_DATA_DIR"] == "/data" and settings["COTMON_MODEL"] == "smollm2"
    assert "COTMON_PREBUILT_DIR" not in settings  # the image's own: its prebuilt model and probe pack


def test_grace_period_outlasts_the_drain(helm: Path) -> None:
    manifests = render(helm, "--set", "config.drainSeconds=60")
    assert only(manifests, "ConfigMap", f"{FULLNAME}-env")["data"]["COTMON_DRAIN_SECONDS"] == "60"
    assert pod_spec(manifests)["terminationGracePeriodSeconds"] > 60
    result = helm_template(helm, "--set", "config.drainSeconds=60", "--set", "terminationGracePeriodSeconds=30")
    assert result.returncode != 0 and "must exceed config.drainSeconds" in result.stderr


def test_cotmon_answers_to_every_name_the_chart_makes_it_reachable_by_and_no_other(helm: Path, tmp_path: Path) -> None:
    """COTMON_ALLOWED_HOSTS as the pod gets it (the container runs `--host 0.0.0.0`), read by cotmon itself."""
    from monitor.server.hosts import allowed_hosts, host_name
    from monitor.settings import Settings

    def allowed(*args: str) -> frozenset[str] | None:
        variables = only(render(helm, *args), "ConfigMap", f"{FULLNAME}-env")["data"]
        return allowed_hosts(Settings.load(variables, host="0.0.0.0"))

    ingress = {"enabled": True, "hosts": [{"host": "cotmon.example.com"}]}
    names = allowed(*values_file(tmp_path, {"ingress": ingress, "viewer": {"externalURL": "https://viewer.example.com:8443/"}}))
    assert names is not None
    reachable_at = (SERVICE_URL, f"http://{FULLNAME}:8000", f"http://{FULLNAME}.{NAMESPACE}.svc:8000", "http://localhost:8000")
    for url in (*reachable_at, "https://cotmon.example.com", "https://viewer.example.com"):
        assert host_name(urlsplit(url).netloc) in names, url
    assert "evil.example" not in names
    assert "10.0.0.9" in (allowed("--set", "config.allowedHosts={10.0.0.9}") or ())
    assert allowed("--set", "config.allowedHosts={*}") is None


def test_existing_secret_is_referenced_and_not_rendered(helm: Path) -> None:
    manifests = render(helm, "-f", str(POSTGRES))
    assert "Secret" not in kinds(manifests)
    variables = env(container(manifests, "cotmon"))
    assert variables["COTMON_STORE_URL"] == {"secretKeyRef": {"name": "cotmon-secrets", "key": "store-url"}}
    assert variables["COTMON_JUDGE_API_KEY"]["secretKeyRef"]["optional"] is True


def test_secret_values_go_to_a_secret_not_a_configmap(helm: Path) -> None:
    url = "postgresql://cotmon:pw@db/cotmon"
    manifests = render(helm, "--set", "secret.apiKey=k3y", "--set", "store.type=postgresql", "--set", f"store.url={url}")
    secret = only(manifests, "Secret", FULLNAME)
    assert {k: base64.b64decode(v).decode() for k, v in secret["data"].items()} == {"api-key": "k3y", "store-url": url}
    variables = env(container(manifests, "cotmon"))
    assert variables["COTMON_API_KEY"] == {"secretKeyRef": {"name": FULLNAME, "key": "api-key"}}
    assert variables["COTMON_STORE_URL"] == {"secretKeyRef": {"name": FULLNAME, "key": "store-url"}}
    configmaps = json.dumps([m for m in manifests if m["kind"] == "ConfigMap"])
    assert "k3y" not in configmaps and "pw@db" not in configmaps


@pytest.mark.parametrize(
    ("args", "claim"),
    [
        ([], True),
        (["--set", "persistence.enabled=false"], False),
        (["-f", str(POSTGRES)], False),
    ],
    ids=["sqlite", "sqlite-no-persistence", "postgres"],
)
def test_data_volume_is_a_claim_only_with_sqlite_and_persistence(helm: Path, args: list[str], claim: bool) -> None:
    manifests = render(helm, *args)
    claims = [m["metadata"]["name"] for m in manifests if m["kind"] == "PersistentVolumeClaim"]
    (data,) = [v for v in pod_spec(manifests)["volumes"] if v["name"] == "data"]
    assert claims == ([f"{FULLNAME}-data"] if claim else [])
    assert data.get("persistentVolumeClaim") == ({"claimName": f"{FULLNAME}-data"} if claim else None)
    assert ("emptyDir" in data) is not claim
    assert {"name": "data", "mountPath": "/data"} in container(manifests, "cotmon")["volumeMounts"]


def test_sqlite_with_several_replicas_fails_pointing_to_postgresql(helm: Path) -> None:
    result = helm_template(helm, "--set", "replicaCount=2")
    assert result.returncode != 0
    assert "one SQLite file cannot be shared by replicas; use PostgreSQL" in result.stderr


def test_gpu_count_becomes_an_nvidia_gpu_limit(helm: Path) -> None:
    assert "nvidia.com/gpu" not in container(render(helm), "cotmon")["resources"]["limits"]
    manifests = render(helm, "-f", str(POSTGRES))
    assert container(manifests, "cotmon")["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod_spec(manifests)["tolerations"][0]["key"] == "nvidia.com/gpu"


def test_policy_and_watch_list_are_mounted_files_named_by_env(helm: Path, tmp_path: Path) -> None:
    when = {"detector": "sae", "gte": 0.5}
    rule = {"name": "r", "category": "deception", "severity": "warning", "when": when, "actions": ["alert"]}
    policy = {"name": "mine", "rules": [rule]}
    detectors = "detectors:\n  - kind: sae_features\n    name: sae\n    args: {sae: /saes/l19, watch: [{feature: 7}]}\n"
    manifests = render(helm, *values_file(tmp_path, {"policy": policy, "detectors": detectors}))
    files = only(manifests, "ConfigMap", f"{FULLNAME}-files")["data"]
    assert yaml.safe_load(files["policy.yaml"]) == policy and files["detectors.yaml"] == detectors
    settings = only(manifests, "ConfigMap", f"{FULLNAME}-env")["data"]
    assert (settings["COTMON_POLICY"], settings["COTMON_DETECTORS"]) == ("/etc/cotmon/policy.yaml", "/etc/cotmon/detectors.yaml")
    assert {"name": "files", "mountPath": "/etc/cotmon", "readOnly": True} in container(manifests, "cotmon")["volumeMounts"]


def test_network_policy_admits_the_http_port_from_the_given_peers(helm: Path) -> None:
    assert "NetworkPolicy" not in kinds(render(helm))
    (rule,) = only(render(helm, "-f", str(POSTGRES)), "NetworkPolicy")["spec"]["ingress"]
    assert rule["ports"] == [{"port": "http", "protocol": "TCP"}]
    assert rule["from"][0]["namespaceSelector"]["matchExpressions"][0]["values"] == ["agents", "monitoring", "ingress-nginx"]


def test_notes_say_where_the_viewer_and_the_api_are(helm: Path, tmp_path: Path) -> None:
    text = notes(helm, tmp_path)
    assert f"kubectl --namespace {NAMESPACE} port-forward svc/{FULLNAME} 8000:8000" in text
    assert f"OPENAI_BASE_URL={SERVICE_URL}/v1" in text
    assert "WARNING" not in text


def test_notes_warn_that_sqlite_without_persistence_loses_transcripts(helm: Path, tmp_path: Path) -> None:
    text = notes(helm, tmp_path, "--set", "persistence.enabled=false")
    assert "WARNING: SQLite on an emptyDir" in text and "lost when" in text


def test_the_examples_policies_are_valid_cotmon_policies(helm: Path) -> None:
    """What the chart mounts as COTMON_POLICY parses with cotmon's own policy parser."""
    from monitor.policy import parse_policy

    manifests = render(helm, "-f", str(SIDECAR))
    text = only(manifests, "ConfigMap", f"{FULLNAME}-files")["data"]["policy.yaml"]
    policy = parse_policy(yaml.safe_load(text), "values-sidecar.yaml")
    assert [rule.name for rule in policy.rules] == ["deception-probe-critical", "harmful-planning-warning"]
