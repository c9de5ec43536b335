"""The viewer's plumbing: templates, security headers, login, forms and error pages.

Every page is rendered by Jinja2 with autoescape on, so text from a transcript (which the
monitored model wrote) is always text. Responses carry a Content-Security-Policy that allows no
script at all, only this app's stylesheet, and form posts to this origin.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import jinja2
from fastapi import Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.routing import APIRoute

from monitor.server.auth import has_bearer_key
from monitor.server.protocol import APIError
from monitor.server.state import STORE_FAILURES, server_state, store_unavailable
from monitor.server.ui import render

HERE = Path(__file__).parent
COOKIE = "cotmon_key"
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}
MAX_FORM_FIELDS = 20

templates = jinja2.Environment(
    loader=jinja2.FileSystemLoader(HERE / "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
templates.filters.update(
    utc=render.utc,
    score=render.score_text,
    clip=render.clip,
    pathpart=lambda value: quote(str(value), safe=""),
)


class LoginRequired(Exception):
    """The request has neither the API key as a bearer header nor the login cookie."""


def base_url(request: Request) -> str:
    return str(request.scope.get("root_path", "")).rstrip("/") + "/ui"


def authorised(request: Request) -> bool:
    """No key configured, or the key as a bearer header, or a valid login cookie."""
    s = server_state(request)
    key = s.settings.api_key
    if key is None or has_bearer_key(request, key):
        return True
    cookie = request.cookies.get(COOKIE)
    return cookie is not None and s.logins.valid(cookie, key)


def require_login(request: Request) -> None:
    """Dependency of every page but the login form, the runbook and the stylesheet."""
    if not authorised(request):
        raise LoginRequired


def safe_next(target: str | None, request: Request) -> str:
    """Where to go after logging in: a viewer path on this server, nothing else (no open redirect)."""
    base = base_url(request)
    if target and target.startswith(base + "/") and not target.startswith("//") and "\\" not in target:
        return target
    return base + "/"


def check_origin(request: Request) -> None:
    """Refuse form posts a browser sent from another site (defence in depth next to SameSite=Strict).

    Browsers say where a request comes from in `Sec-Fetch-Site`; `Origin` is checked too, but it
    is `null` for this viewer's own forms, since its pages send no referrer.
    """
    site = request.headers.get("sec-fetch-site")
    origin = request.headers.get("origin")
    foreign_origin = origin not in (None, "null") and urlsplit(origin).netloc != request.headers.get("host")
    if (site is not None and site not in ("same-origin", "none")) or foreign_origin:
        raise APIError(403, "form posts from another origin are refused", code="forbidden")


async def form_fields(request: Request) -> dict[str, str]:
    """A posted urlencoded form (the only kind the viewer's forms send); the last value of each field."""
    kind = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if kind != "application/x-www-form-urlencoded":
        raise APIError(415, "post the form as application/x-www-form-urlencoded")
    body = (await request.body()).decode("utf-8", errors="replace")
    try:
        parsed = parse_qs(body, keep_blank_values=True, max_num_fields=MAX_FORM_FIELDS)
    except ValueError as exc:
        raise APIError(400, f"bad form: {exc}") from None
    return {name: values[-1] for name, values in parsed.items()}


def page(request: Request, template: str, code: int = 200, **context: Any) -> HTMLResponse:
    """`template` rendered with `context` (autoescaped), answered with status `code`."""
    s = server_state(request)
    html = templates.get_template(template).render(
        base=base_url(request),
        can_logout=s.settings.api_key is not None and COOKIE in request.cookies,
        model_name=s.model_name,
        **context,
    )
    return HTMLResponse(html, status_code=code)


def error_page(request: Request, status: int, message: str) -> HTMLResponse:
    return page(request, "error.html", status, status=status, message=message)


class UIRoute(APIRoute):
    """A viewer route: login redirects, errors as HTML pages, and the security headers on every answer."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            try:
                response = await handler(request)
            except LoginRequired:
                target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                login = f"{base_url(request)}/login?next={quote(target, safe='')}"
                response = RedirectResponse(login, status_code=303)
            except STORE_FAILURES as exc:
                err = store_unavailable(exc, request.url.path)
                response = error_page(request, err.status, err.message)
                response.headers.update(err.headers)
            except APIError as err:
                response = error_page(request, err.status, err.message)
                response.headers.update(err.headers)
            for name, value in SECURITY_HEADERS.items():
                response.headers.setdefault(name, value)
            return response

        return guarded
