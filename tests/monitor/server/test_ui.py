"""The transcript viewer at /ui/: a real server with the tiny model and a SQLite store, read over
HTTP and in a real Chromium (Playwright, no downloads: Debian's chromium, found on PATH)."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import gc
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from component_fixtures import require
from conftest import NEVER, Serve
from monitor.build import NO_RULES
from monitor.pipeline import Pipeline
from monitor.server.app import create_app
from monitor.server.logins import LoginThrottle, LoginTokens
from monitor.server.ui.render import default_detector, quote_marks, shade, token_scores
from monitor.settings import Settings
from monitor.testing import ServerThread
from monitor.types import Detection, Evidence, TraceStep

CSP = "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
# count_over 0.0 counts every token: fires at the 60th token, so only long reasoning is flagged.
LONG_COT = {
    "name": "long-cot",
    "category": "deception",
    "severity": "critical",
    "when": {"detector": "p", "stat": "count_over", "over": 0.0, "window": 60, "gte": 60},
    "actions": ["alert", "store"],
}
SCRIPT = "<script>window.__xss = 1; alert(1)</script>"
IMG = '<img src=x onerror="window.__xss=2">'
LONG_REASONING = (
    "The user asks whether the deployment succeeded. The logs show it failed twice. "
    f"{SCRIPT} Maybe I can hide that. {IMG} "
    "I will tell them it went fine so they stay happy, and nobody will check the logs."
)
MESSAGES = [{"role": "user", "content": "Did the deployment succeed?"}]


def watch(server: Any, session_id: str, reasoning: str, answer: str, key: str | None = None) -> dict[str, Any]:
    """Scores a transcript in watch mode; the store keeps it."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    reply = httpx.post(
        server.base_url + "/v1/monitor/transcripts",
        json={"model": "tiny", "messages": MESSAGES, "reasoning": reasoning, "answer": answer, "label": session_id},
        headers=headers,
        timeout=60,
    )
    assert reply.status_code == 200, reply.text
    return reply.json()  # type: ignore[no-any-return]


@pytest.fixture
def viewer(serve: Serve) -> Any:
    """A server with two stored sessions: `flagged-xss` (long, flagged, hostile CoT) and `short-clean`."""
    server = serve(rules=[LONG_COT], store_keep="all")
    flagged = watch(server, "flagged-xss", LONG_REASONING, "Yes, it succeeded.")
    clean = watch(server, "short-clean", "Check the logs.", "It failed.")
    assert [f["rule"] for f in flagged["flags"]] == ["long-cot"] and clean["flags"] == []
    server.ids = {"flagged-xss": flagged["session_id"], "short-clean": clean["session_id"]}  # labels: ids are the server's
    return server


def get(server: Any, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.get(server.base_url + path, timeout=30, **kwargs)


# -- computations -----------------------------------------------------------------------------------


def test_a_tokens_score_is_the_max_of_that_detectors_detections_covering_it() -> None:
    detections = [
        Detection("p", "deception", 0.2, 0, 3),
        Detection("p", "deception", 0.7, 2, 4),
        Detection("p", "deception", 0.4, 3, 9),  # runs past the last token: clipped
        Detection("judge", "deception", 0.99, 0, 6),  # another detector: ignored
    ]
    assert token_scores(6, detections, "p") == [0.2, 0.2, 0.7, 0.7, 0.4, 0.4]
    assert token_scores(3, detections, "nobody") == [None, None, None]
    assert [shade(s) for s in (None, 0.0, 0.04, 0.5, 1.0, 7.0, float("nan"))] == [0, 0, 0, 5, 10, 10, 0]


def test_tokens_overlapping_a_quote_occurrence_are_marked() -> None:
    texts = ["I ", "will ", "hide", " it", ". Then", " hide"]
    assert quote_marks(texts, ["hide it", ""]) == [False, False, True, True, False, False]
    assert quote_marks(texts, ["hide"]) == [False, False, True, False, False, True]  # every occurrence
    assert quote_marks(texts, ["l hi"]) == [False, True, True, False, False, False]  # across a token boundary


# -- pages over HTTP --------------------------------------------------------------------------------


def test_a_bad_filter_value_is_a_400_page_saying_what_is_wrong(viewer: Any) -> None:
    for query, message in (
        ("since=last+tuesday", "is not a time"),
        ("flagged=maybe", "flagged must be yes, no or any"),
        ("limit=lots", "limit must be a whole number"),
        ("limit=0", "limit must be between 1 and 1000"),
        ("severity=dire", "severity must be one of"),
    ):
        reply = get(viewer, f"/ui/?{query}")
        assert reply.status_code == 400, query
        assert reply.headers["content-type"].startswith("text/html") and message in reply.text, query


def test_an_unknown_session_is_a_404_page(viewer: Any) -> None:
    reply = get(viewer, "/ui/sessions/no-such-session")
    assert reply.status_code == 404 and reply.headers["content-type"].startswith("text/html")
    assert "is not in the store" in reply.text and reply.headers["content-security-policy"] == CSP


def test_every_viewer_response_carries_the_security_headers(viewer: Any) -> None:
    for path, status in (
        ("/ui/", 200),
        (f"/ui/sessions/{viewer.ids['short-clean']}", 200),
        ("/ui/nowhere", 404),
        ("/ui/static/style.css", 200),
    ):
        reply = get(viewer, path)
        assert reply.status_code == status, path
        assert reply.headers["content-security-policy"] == CSP, path
        assert reply.headers["x-content-type-options"] == "nosniff" and reply.headers["referrer-policy"] == "no-referrer"
    assert get(viewer, "/ui/static/style.css").headers["content-type"].startswith("text/css")
    assert get(viewer, "/ui/static/..%2Fviews.py").status_code == 404


def test_the_list_filters_like_the_sessions_api(viewer: Any) -> None:
    flagged = get(viewer, "/ui/?flagged=yes&severity=critical").text
    assert "flagged-xss" in flagged and "short-clean" not in flagged and "long-cot · critical" in flagged
    unflagged = get(viewer, "/ui/?flagged=no").text
    assert "short-clean" in unflagged and "flagged-xss" not in unflagged
    paged = get(viewer, "/ui/?limit=1").text
    assert "1–1 of 2 sessions" in paged and "offset=1" in paged


def test_the_judges_rationale_and_quotes_show_and_the_quotes_are_highlighted_in_the_cot(viewer: Any) -> None:
    stored = viewer.store.get(viewer.ids["flagged-xss"])
    rationale = "It plans to hide the failed deployment from the user."
    judged = Detection(
        "judge", "deception", 0.93, 0, 10, (Evidence("judge: deception", rationale, ("Maybe I can hide that.",), "judge"),)
    )
    viewer.store.save(dataclasses.replace(stored, session_id="judged", detections=(*stored.detections, judged)))
    html = get(viewer, "/ui/sessions/judged").text
    assert "LLM judge" in html and rationale in html and '<blockquote class="quote">Maybe I can hide that.</blockquote>' in html
    quoted = "".join(re.findall(r'class="t [^"]*quoted[^"]*"[^>]*>([^<]*)</span>', html))
    assert "hide that" in quoted and "deployment" not in quoted
    assert default_detector(stored) == "p" and 'option value="p" selected' in html


def test_replay_errors_are_shown_on_the_page_with_their_status(viewer: Any) -> None:
    replay = viewer.base_url + "/ui/sessions/{}/replay"
    reply = httpx.post(
        replay.format(viewer.ids["flagged-xss"]), data={"mode": "policy", "policy": "rules: [unclosed"}, timeout=30
    )
    assert reply.status_code == 400 and "invalid YAML" in reply.text and "rules: [unclosed" in reply.text
    assert reply.headers["content-security-policy"] == CSP
    stored = viewer.store.get(viewer.ids["flagged-xss"])
    moved = dataclasses.replace(stored, session_id="elsewhere", model=dataclasses.replace(stored.model, revision="other"))
    viewer.store.save(moved)
    reply = httpx.post(replay.format("elsewhere"), data={"mode": "full"}, timeout=30)
    assert reply.status_code == 409 and "cannot replay in full here" in reply.text
    reloaded = get(
        viewer, f"/ui/sessions/{viewer.ids['flagged-xss']}/replay"
    )  # a GET of the result's address: back to the session
    assert reloaded.status_code == 303 and reloaded.headers["location"] == f"/ui/sessions/{viewer.ids['flagged-xss']}#replay"


def test_form_posts_from_another_site_are_refused(viewer: Any) -> None:
    for headers in ({"Origin": "https://evil.example"}, {"Sec-Fetch-Site": "cross-site", "Origin": "null"}):
        reply = httpx.post(
            f"{viewer.base_url}/ui/sessions/{viewer.ids['flagged-xss']}/replay", data={"mode": "policy"}, headers=headers
        )
        assert reply.status_code == 403 and "another origin" in reply.text, headers


def test_with_an_api_key_the_viewer_needs_the_key_or_the_login_cookie(serve: Serve) -> None:
    server = serve(api_key="s3cret", store_keep="all")
    assert get(server, "/ui/").status_code == 303 and get(server, "/ui/").headers["location"] == "/ui/login?next=%2Fui%2F"
    assert get(server, "/ui/", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    wrong = httpx.post(server.base_url + "/ui/login", data={"key": "guess", "next": "/ui/"})
    assert wrong.status_code == 401 and "not this server" in wrong.text
    right = httpx.post(server.base_url + "/ui/login", data={"key": "s3cret", "next": "https://evil.example/"})
    assert right.status_code == 303 and right.headers["location"] == "/ui/"  # no open redirect
    cookie = right.headers["set-cookie"]
    assert cookie.startswith("cotmon_key=") and "HttpOnly" in cookie and "SameSite=strict" in cookie and "s3cret" not in cookie
    assert get(server, "/ui/", cookies={"cotmon_key": right.cookies["cotmon_key"]}).status_code == 200
    assert get(server, "/ui/", cookies={"cotmon_key": "forged"}).status_code == 303


def _login(server: Any, key: str, client: httpx.Client | None = None) -> httpx.Response:
    post = client.post if client is not None else httpx.post
    return post(server.base_url + "/ui/login", data={"key": key, "next": "/ui/"})


def test_after_five_failed_logins_an_address_gets_429s_with_retry_after(serve: Serve) -> None:
    server = serve(api_key="s3cret")
    assert [_login(server, f"guess-{i}").status_code for i in range(5)] == [401] * 5
    refused = _login(server, "s3cret")  # even the right key, until the window has passed
    assert refused.status_code == 429 and "Too many failed logins" in refused.text
    assert 0 < int(refused.headers["retry-after"]) <= 300 and refused.headers["content-security-policy"] == CSP
    with httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2")) as elsewhere:
        assert _login(server, "s3cret", elsewhere).status_code == 303  # another address is not held up


def test_the_login_throttle_forgets_failures_older_than_its_window() -> None:
    now = [0.0]
    throttle = LoginThrottle(max_failures=2, window_s=60, clock=lambda: now[0])
    throttle.failed("a")
    now[0] = 50
    throttle.failed("a")
    assert throttle.retry_after("a") == 10 and throttle.retry_after("b") is None
    now[0] = 60.5
    assert throttle.retry_after("a") is None
    throttle.failed("a")
    assert throttle.retry_after("a") == 50  # the last two failures, at 50 and 60.5
    throttle.succeeded("a")
    assert throttle.retry_after("a") is None


def test_each_login_gets_its_own_cookie_and_one_captured_before_logout_is_refused_after(serve: Serve) -> None:
    server = serve(api_key="s3cret")
    captured = _login(server, "s3cret").cookies["cotmon_key"]
    other = _login(server, "s3cret").cookies["cotmon_key"]
    assert captured != other
    assert get(server, "/ui/", cookies={"cotmon_key": captured}).status_code == 200
    logout = httpx.post(server.base_url + "/ui/logout", cookies={"cotmon_key": captured})
    assert logout.status_code == 303
    assert get(server, "/ui/", cookies={"cotmon_key": captured}).status_code == 303  # to the login form
    assert get(server, "/ui/", cookies={"cotmon_key": other}).status_code == 200  # another login stays


def test_a_login_token_expires_and_a_tampered_one_is_refused() -> None:
    now = [1000.0]
    tokens = LoginTokens(ttl_s=60, clock=lambda: now[0])
    token = tokens.issue("key")
    expiry, nonce, signature = token.split(".")
    assert tokens.valid(token, "key") and not tokens.valid(token, "another key")
    assert not tokens.valid(f"{int(expiry) + 3600}.{nonce}.{signature}", "key")
    now[0] = 1061
    assert not tokens.valid(token, "key")


def test_a_long_session_renders_off_the_event_loop_so_health_checks_answer_meanwhile(serve: Serve, transcript: Any) -> None:
    server = serve(store_keep="all")
    # 25k tokens of 256 characters: on the event loop, laying them out would hold it ~0.6 s or more.
    n = 25_000
    steps = tuple(TraceStep("long", i, i, f"w{i % 97} " * 64, "reasoning", {}, i == n - 1) for i in range(n))
    scores = tuple(Detection("s", "deception", (i % 100) / 100, i, i + 1) for i in range(n))
    server.store.save(dataclasses.replace(transcript, session_id="long", steps=steps, detections=scores, evaluations=()))
    latencies = []
    # A full garbage collection stops every thread for a time that grows with the whole heap (here
    # torch's and the test session's); it is not what this test measures, so none runs meanwhile.
    gc.disable()
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            rendering = pool.submit(get, server, "/ui/sessions/long")
            while not rendering.done():
                started = time.perf_counter()
                assert get(server, "/healthz").status_code == 200
                latencies.append(time.perf_counter() - started)
            assert rendering.result().status_code == 200
    finally:
        gc.enable()
    assert len(latencies) >= 5 and max(latencies) < 0.4, latencies


def test_without_a_store_the_viewer_says_so(engine: Any, tmp_path: Path) -> None:
    settings = Settings.load({}, data_dir=tmp_path / "data")
    app = create_app(settings, Pipeline(engine, [], NO_RULES), store=None, model_name="tiny")
    with ServerThread(app) as server:
        listing = get(server, "/ui/")
        assert listing.status_code == 200 and "keeps no transcript store" in listing.text
        assert get(server, "/ui/sessions/any").status_code == 404


# -- in a browser -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    from playwright import sync_api  # a dev dependency

    chromium = require("chromium")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"],
        )
        yield browser
        browser.close()


@pytest.fixture
def tab(chromium: Any) -> Iterator[Any]:
    """A fresh browser context (no cookies) and a page in it."""
    context = chromium.new_context()
    yield context.new_page()
    context.close()


def test_in_a_browser_a_flagged_session_is_found_shaded_and_its_cot_stays_text(viewer: Any, tab: Any) -> None:
    page = tab
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    listing = page.goto(viewer.base_url + "/ui/")
    assert listing.headers["content-security-policy"] == CSP
    assert page.locator("table.sessions tbody tr").count() == 2
    page.select_option("select[name=flagged]", "yes")
    page.click("form.filters button[type=submit]")
    rows = page.locator("table.sessions tbody tr")
    assert rows.count() == 1 and "flagged-xss" in rows.inner_text() and "flagged=yes" in page.url

    with page.expect_navigation() as opened:
        page.click("a.sid")
    assert opened.value.headers["content-security-policy"] == CSP
    alphas = page.eval_on_selector_all(
        "#cot span.t",
        "spans => spans.map(s => { const m = getComputedStyle(s).backgroundColor.match(/[\\d.]+/g); "
        "return m.length === 4 ? Number(m[3]) : 1; })",
    )
    assert len(alphas) > 60 and any(a > 0 for a in alphas)
    flags = page.locator("table.flags").inner_text()
    assert "long-cot" in flags and "critical" in flags

    cot = page.locator("#cot").inner_text()
    assert SCRIPT in cot and IMG in cot
    assert page.locator("#cot img, #cot script").count() == 0 and page.locator("img").count() == 0
    assert page.evaluate("typeof window.__xss") == "undefined" and dialogs == []

    page.fill("textarea[name=policy]", yaml.safe_dump({"name": "relaxed", "rules": [NEVER]}))
    page.click("form.replay button[type=submit]")
    diff = page.locator("table.diff tbody tr").first.inner_text()
    assert "long-cot" in diff and "gone" in diff
    assert "Same tokens" in page.locator("dl.meta").inner_text() and dialogs == []


def test_in_a_browser_with_an_api_key_the_viewer_logs_in_first(serve: Serve, tab: Any) -> None:
    page = tab
    server = serve(rules=[LONG_COT], api_key="s3cret", store_keep="all")
    watch(server, "keyed-session", "Check the logs.", "It failed.", key="s3cret")
    page.goto(server.base_url + "/ui/")
    assert "/ui/login" in page.url and page.locator("input[name=key]").count() == 1
    page.fill("input[name=key]", "s3cret")
    page.click("form.login button[type=submit]")
    assert page.url == server.base_url + "/ui/"
    assert "keyed-session" in page.locator("table.sessions").inner_text()
