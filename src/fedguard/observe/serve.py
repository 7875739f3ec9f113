"""Serving the dashboard with uvicorn: in the foreground (``fedguard dashboard``) or on a
background thread beside a deployment server (``fedguard server --dashboard``).

Loopback addresses serve anyone on this machine; any other address needs a viewers file
(viewer tokens, :mod:`fedguard.observe.access`), and with a certificate and key the page is
served over HTTPS (without them a token crosses the network in plain text: a warning says so).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from fedguard.observe import access, webapp

log = logging.getLogger("fedguard.dashboard")


class DashboardConfigError(ValueError):
    """Dashboard options that cannot be served (a public address without viewer tokens)."""


@dataclass(frozen=True)
class DashboardOptions:
    """Where and for whom the dashboard is served."""

    address: str = "127.0.0.1:8050"
    viewers: Path | None = None  # viewers.json of `fedguard tokens DIR --viewer NAME`
    tls_cert: Path | None = None
    tls_key: Path | None = None
    poll_ms: int = webapp.DEFAULT_POLL_MS


def _server(run_dirs: Sequence[Path], options: DashboardOptions) -> uvicorn.Server:
    try:
        host, port = access.split_address(options.address)
    except ValueError as exc:
        raise DashboardConfigError(str(exc)) from None
    if not access.is_loopback(host) and options.viewers is None:
        raise DashboardConfigError(
            f"The dashboard at {options.address} would be reachable from other machines: give "
            "--viewer-tokens DIR/viewers.json (made by `fedguard tokens DIR --viewer NAME`), or "
            "serve it on 127.0.0.1"
        )
    if (options.tls_cert is None) != (options.tls_key is None):
        raise DashboardConfigError("The dashboard's TLS certificate and key go together.")
    if options.viewers is not None:
        try:
            access.read_viewers(options.viewers)
        except ValueError as exc:
            raise DashboardConfigError(str(exc)) from None
    if not access.is_loopback(host) and options.tls_cert is None:
        log.warning(
            "dashboard on %s without TLS: viewer tokens cross the network in plain text",
            options.address,
        )
    app = webapp.build_app(run_dirs, viewers=options.viewers, poll_ms=options.poll_ms)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        ssl_certfile=None if options.tls_cert is None else str(options.tls_cert),
        ssl_keyfile=None if options.tls_key is None else str(options.tls_key),
    )
    return uvicorn.Server(config)


def serve_forever(run_dirs: Sequence[Path], options: DashboardOptions) -> None:
    """Serve until Ctrl-C (``fedguard dashboard``)."""
    _server(run_dirs, options).run()


class Background:
    """A dashboard served on a daemon thread; :meth:`stop` ends it."""

    def __init__(self, run_dirs: Sequence[Path], options: DashboardOptions) -> None:
        self._server = _server(run_dirs, options)
        self._thread = threading.Thread(target=self._run, name="dashboard", daemon=True)

    def _run(self) -> None:
        try:
            self._server.run()
        except SystemExit:  # uvicorn's way of saying it could not start; start() reports it
            pass

    def start(self, wait_s: float = 10.0) -> None:
        """Start serving; returns once the socket listens (or after ``wait_s``)."""
        self._thread.start()
        deadline = time.monotonic() + wait_s
        while not self._server.started and self._thread.is_alive():
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if not self._server.started:
            raise DashboardConfigError(
                f"The dashboard could not listen on {self._server.config.host}:"
                f"{self._server.config.port} (in use?)"
            )

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=5.0)
