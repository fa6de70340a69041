"""The HTTP endpoint of ``srnode serve``: /healthz, /metrics, the REST API and the console.

A FastAPI application served by uvicorn in a daemon thread of the node process; the REST API
(``/api/``, :mod:`dicom_node.console.api`) and the console pages (``/console/``,
:mod:`dicom_node.console.pages`) are mounted on it.  Bound to 127.0.0.1 by default; any other
address needs ``[http] token``, and when a token is set every request must carry
``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import socket
import threading
from collections.abc import Callable

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from dicom_node import __version__
from dicom_node.config import ConfigError, HttpConfig
from dicom_node.console.api import Console, build_api, install_error_handlers
from dicom_node.console.pages import (
    PUBLIC_PREFIXES,
    SESSION_COOKIE,
    STATIC_DIR,
    build_pages,
    session_value,
)
from dicom_node.health import Health

LOGGER = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(config: HttpConfig) -> None:
    """Refuse a non-loopback bind without a token.

    Raises
    ------
    ConfigError
        ``[http] host`` is not a loopback address and ``[http] token`` is empty.
    """
    if not is_loopback(config.host) and not config.token:
        raise ConfigError(
            f"[http] host = {config.host!r} exposes /healthz, /metrics, the console and the API "
            "beyond this machine: "
            "set [http] token (clients then send 'Authorization: Bearer <token>') or bind "
            "to 127.0.0.1"
        )


#: Methods that change nothing (no cross-site check).
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def _host_name(host_header: str) -> str:
    """The host name of a ``Host`` or ``Origin`` authority (``[::1]:8080`` -> ``::1``)."""
    if host_header.startswith("["):
        return host_header[1:].split("]", 1)[0]
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header


def _foreign_request(request: Request, token: str) -> str:
    """Why a request that a web page on another site made the browser send is refused ("" = not).

    Without a token the server is reachable from this machine only, but any web page this
    machine's browser opens could still send it requests: a ``Host`` that is not a loopback
    name is refused (a DNS-rebinding page), and so is a state-changing request that the
    browser marks as coming from another origin (``Origin``, ``Sec-Fetch-Site``).
    """
    host = request.headers.get("host", "")
    if not token and host and not is_loopback(_host_name(host)):
        return f"Host {host[:80]!r} is not this machine (without [http] token only loopback)"
    if request.method in SAFE_METHODS:
        return ""
    if request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
        return "a state-changing request from another site"
    origin = request.headers.get("origin")
    if origin is not None and origin.split("://", 1)[-1] != host:
        return f"a state-changing request from another origin ({origin[:80]})"
    return ""


def build_app(health: Callable[[], Health], registry: CollectorRegistry,
              token: str = "", console: Console | None = None) -> FastAPI:
    """The ASGI application.

    Parameters
    ----------
    health
        Runs the health checks.
    registry
        The metrics to expose.
    token
        Bearer token every request must carry ("" = none required).  A browser may carry
        the console's session cookie instead (set by ``POST /console/login``).
    console
        The node's services for the REST API (``/api/``) and the console pages
        (``/console/``); ``None`` serves /healthz and /metrics only.
    """
    app = FastAPI(title="srnode", version=__version__, docs_url=None, redoc_url=None,
                  openapi_url="/api/openapi.json" if console is not None else None,
                  description="REST API of the srnode DICOM super-resolution node.")
    expected = f"Bearer {token}".encode()
    session = session_value(token).encode() if token else b""

    @app.middleware("http")
    async def _authorise(request: Request, call_next: Callable) -> Response:
        request.state.token_required = bool(token)
        request.state.patient_data = False
        refused = _foreign_request(request, token)
        if refused:
            return JSONResponse({"error": "forbidden", "detail": refused}, status_code=403)
        if token:
            path = request.url.path
            given = request.headers.get("authorization", "").encode()
            cookie = request.cookies.get(SESSION_COOKIE, "").encode()
            passed = (hmac.compare_digest(given, expected)
                      or (console is not None and hmac.compare_digest(cookie, session)))
            if not passed:
                if console is not None and path.startswith(PUBLIC_PREFIXES):
                    return await call_next(request)
                if console is not None and (path == "/" or path.startswith("/console/")):
                    return RedirectResponse("/console/login", status_code=303)
                return JSONResponse({"error": "unauthorized",
                                     "detail": "missing or wrong bearer token"},
                                    status_code=401, headers={"WWW-Authenticate": "Bearer"})
            # patient names and IDs only for a request that passed the token check
            request.state.patient_data = True
        return await call_next(request)

    @app.get("/healthz", include_in_schema=console is not None,
             summary="Health checks (503 when one fails)")
    async def healthz() -> JSONResponse:
        result = await asyncio.to_thread(health)
        return JSONResponse(result.as_dict(), status_code=200 if result.ok else 503)

    @app.get("/metrics", include_in_schema=console is not None,
             summary="Prometheus metrics", response_class=PlainTextResponse)
    async def metrics() -> Response:
        body = await asyncio.to_thread(generate_latest, registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    if console is not None:
        install_error_handlers(app)
        app.include_router(build_api(console))
        app.include_router(build_pages(console, token))
        app.mount("/console/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


class HttpServer:
    """uvicorn serving :func:`build_app` in a daemon thread.

    Parameters
    ----------
    config
        ``[http]``; ``port = 0`` binds a free port (see :attr:`port`).
    app
        The ASGI application.
    """

    def __init__(self, config: HttpConfig, app: FastAPI) -> None:
        check_exposure(config)
        self.config = config
        self._server = uvicorn.Server(uvicorn.Config(
            app, log_level="warning", access_log=False, lifespan="off", loop="asyncio",
            timeout_graceful_shutdown=2,
        ))
        self._socket: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Bind (raising ``OSError`` at once if the port is taken) and serve in a thread."""
        family = socket.AF_INET6 if ":" in self.config.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.config.host, self.config.port))
            sock.listen(64)
        except OSError:
            sock.close()
            raise
        self._socket = sock
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]},
                                        name="srnode-http", daemon=True)
        self._thread.start()
        LOGGER.info("HTTP console, API, /healthz and /metrics on http://%s:%d/%s",
                    self.config.host, self.port,
                    " (bearer token required)" if self.config.token else "")

    @property
    def port(self) -> int:
        """The port actually bound."""
        if self._socket is None:
            return self.config.port
        return int(self._socket.getsockname()[1])

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._socket is not None:
            self._socket.close()
            self._socket = None
