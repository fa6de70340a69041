"""The HTTP endpoint of ``srnode serve``: ``GET /healthz`` and ``GET /metrics``.

A FastAPI application served by uvicorn in a daemon thread of the node process (the web
console will be mounted on the same application).  Bound to 127.0.0.1 by default; any other
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
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from dicom_node.config import ConfigError, HttpConfig
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
            f"[http] host = {config.host!r} exposes /healthz and /metrics beyond this machine: "
            "set [http] token (clients then send 'Authorization: Bearer <token>') or bind "
            "to 127.0.0.1"
        )


def build_app(health: Callable[[], Health], registry: CollectorRegistry,
              token: str = "") -> FastAPI:
    """The ASGI application.

    Parameters
    ----------
    health
        Runs the health checks.
    registry
        The metrics to expose.
    token
        Bearer token every request must carry ("" = none required).
    """
    app = FastAPI(title="srnode", docs_url=None, redoc_url=None, openapi_url=None)
    expected = f"Bearer {token}".encode()

    @app.middleware("http")
    async def _authorise(request: Request, call_next: Callable) -> Response:
        if token:
            given = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                return JSONResponse({"detail": "missing or wrong bearer token"}, status_code=401,
                                    headers={"WWW-Authenticate": "Bearer"})
        return await call_next(request)

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        result = await asyncio.to_thread(health)
        return JSONResponse(result.as_dict(), status_code=200 if result.ok else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        body = await asyncio.to_thread(generate_latest, registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

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
        LOGGER.info("HTTP /healthz and /metrics on http://%s:%d/%s", self.config.host, self.port,
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
