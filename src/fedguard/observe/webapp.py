"""The dashboard's web application (Starlette): one page that follows run folders live.

Routes: ``/`` the page, ``/static/dashboard.js`` its script, ``/static/plotly.min.js`` the
plotly.js that the ``plotly`` Python package ships (served from its package data, so the page
needs no network), ``/api/runs`` the followed runs as JSON (:mod:`fedguard.observe.runview`),
which the page polls. Every route only reads run folders: nothing here can change a run, and
no route shows a client's data, updates, checkpoints or keys (the JSON holds metrics, status,
configuration, partition counts, contribution scores and audit results).

With ``viewers`` (a viewers file, :mod:`fedguard.observe.access`) every request needs a viewer
token: ``Authorization: Bearer TOKEN``, or ``?token=TOKEN`` once (the answer then sets an
HttpOnly cookie so the page's own requests carry it).
"""

from __future__ import annotations

import importlib.resources
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    Response,
)
from starlette.routing import Route

from fedguard.observe import access, runview

COOKIE = "fedguard_viewer"
STATIC = importlib.resources.files("fedguard.observe") / "static"
# How often the page asks for the runs again (milliseconds); the page's ?poll= overrides it.
DEFAULT_POLL_MS = 1000


def plotly_js_path() -> Path:
    """The minified plotly.js inside the installed ``plotly`` package."""
    path = Path(str(importlib.resources.files("plotly") / "package_data" / "plotly.min.js"))
    if not path.is_file():
        raise FileNotFoundError(f"plotly.min.js is missing from the plotly package ({path})")
    return path


def _headers() -> dict[str, str]:
    return {
        "X-Content-Type-Options": "nosniff",
        "X-Frame-Options": "DENY",
        "Referrer-Policy": "no-referrer",  # a ?token= must not leak to another site
    }


class _ViewerOnly(BaseHTTPMiddleware):
    """Refuses (401) a request without an accepted viewer token."""

    def __init__(self, app: object, check: access.ViewerCheck) -> None:
        super().__init__(app)  # type: ignore[arg-type]
        self.check = check

    async def dispatch(
        self, request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        header = request.headers.get("authorization", "")
        bearer = header[7:] if header.lower().startswith("bearer ") else None
        query = request.query_params.get("token")
        for token in (bearer, query, request.cookies.get(COOKIE)):
            if self.check.accepts(token):
                response = await call_next(request)
                if token is not None and token == query:
                    response.set_cookie(COOKIE, token, httponly=True, samesite="strict")
                return response
        return PlainTextResponse(
            "401: this dashboard needs a viewer token (open it with ?token=TOKEN; make one with "
            "`fedguard tokens DIR --viewer NAME`)",
            status_code=401,
            headers=_headers(),
        )


def build_app(
    run_dirs: Sequence[Path],
    *,
    viewers: Path | None = None,
    poll_ms: int = DEFAULT_POLL_MS,
    title: str = "fedguard dashboard",
) -> Starlette:
    """The dashboard following ``run_dirs`` (folders that may not exist yet: a run about to
    start); with ``viewers``, for viewer tokens only."""
    if poll_ms < 100:
        raise ValueError(f"poll_ms must be at least 100, got {poll_ms}")
    dirs = [Path(d) for d in run_dirs]
    reader = runview.RunReader()
    lock = threading.Lock()  # the reader's cache, between the server's worker threads
    js = plotly_js_path()
    page = (STATIC / "dashboard.html").read_text(encoding="utf-8")
    page = page.replace("{{title}}", title).replace("{{poll_ms}}", str(int(poll_ms)))

    async def index(request: Request) -> Response:
        return HTMLResponse(page, headers={**_headers(), "Cache-Control": "no-store"})

    async def script(request: Request) -> Response:
        body = (STATIC / "dashboard.js").read_text(encoding="utf-8")
        return Response(body, media_type="text/javascript", headers=_headers())

    async def plotly(request: Request) -> Response:
        return FileResponse(
            js,
            media_type="text/javascript",
            headers={**_headers(), "Cache-Control": "max-age=86400"},
        )

    def runs(request: Request) -> Response:  # sync: Starlette runs it in a worker thread
        with lock:
            body = {"time": time.time(), "runs": [reader.read(d) for d in dirs]}
        return JSONResponse(body, headers={**_headers(), "Cache-Control": "no-store"})

    middleware = []
    if viewers is not None:
        middleware.append(Middleware(_ViewerOnly, check=access.ViewerCheck(viewers)))
    return Starlette(
        routes=[
            Route("/", index),
            Route("/static/dashboard.js", script),
            Route("/static/plotly.min.js", plotly),
            Route("/api/runs", runs),
        ],
        middleware=middleware,
    )
