"""The Host header check against DNS rebinding, over real HTTP: a page that rebinds its own name
to the server's address sends that name as Host, and gets a 400 instead of transcripts."""

from __future__ import annotations

import httpx
import pytest

from conftest import Serve
from monitor.server.hosts import host_name


def _get(base_url: str, path: str, host: str) -> httpx.Response:
    return httpx.get(base_url + path, headers={"Host": host}, timeout=30)


def test_a_rebinding_pages_host_is_refused_with_a_400_naming_the_host_header(serve: Serve) -> None:
    server = serve(store_keep="all")
    for path in ("/v1/sessions", "/v1/models", "/ui/"):
        reply = _get(server.base_url, path, "evil.example:8000")
        assert reply.status_code == 400, path
        error = reply.json()["error"]
        assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", "Host", "host_not_allowed"), path
        assert "evil.example" in error["message"]
    replay = httpx.post(server.base_url + "/v1/sessions/any/replay", json={}, headers={"Host": "evil.example"})
    assert replay.status_code == 400 and replay.json()["error"]["param"] == "Host"


def test_loopback_names_are_allowed_on_any_port(serve: Serve) -> None:
    server = serve()
    for host in ("localhost:1234", "LOCALHOST.", "127.0.0.1", "127.0.0.1:80", "[::1]:8000", "[::1]"):
        assert _get(server.base_url, "/v1/sessions", host).status_code == 200, host


def test_health_readiness_and_metrics_answer_whatever_the_host(serve: Serve) -> None:
    # Kubernetes probes and Prometheus send the pod IP as Host.
    server = serve()
    for path in ("/healthz", "/readyz", "/metrics"):
        assert _get(server.base_url, path, "10.1.2.3:8000").status_code == 200, path


def test_listed_names_and_the_listen_address_are_allowed_and_a_star_allows_any(serve: Serve) -> None:
    server = serve(host="10.9.8.7", allowed_hosts="cotmon.agents.svc, viewer.example.com")
    for host in ("cotmon.agents.svc:8000", "Viewer.Example.com", "10.9.8.7:8000"):
        assert _get(server.base_url, "/v1/sessions", host).status_code == 200, host
    assert _get(server.base_url, "/v1/sessions", "agents.svc").status_code == 400
    everywhere = serve(host="0.0.0.0")  # a wildcard listen address is no name
    assert _get(everywhere.base_url, "/v1/sessions", "0.0.0.0:8000").status_code == 400
    anyone = serve(allowed_hosts="*")
    assert _get(anyone.base_url, "/v1/sessions", "evil.example").status_code == 200


@pytest.mark.parametrize(
    ("header", "name"),
    [("Example.COM:443", "example.com"), ("[::1]:80", "[::1]"), ("::1", "[::1]"), ("localhost.", "localhost"), ("a.b", "a.b")],
)
def test_a_host_header_is_compared_by_its_name_alone(header: str, name: str) -> None:
    assert host_name(header) == name
