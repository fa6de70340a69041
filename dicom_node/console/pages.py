"""The console pages: server-rendered HTML (Jinja2) with one small script of our own.

``/console/`` dashboard, ``/console/jobs/{id}`` a job with its before/after pictures,
``/console/series`` received series, ``/console/audit`` the audit log, ``/console/login`` a
form that turns the bearer token into a session cookie for browsers.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape

from dicom_node import __version__
from dicom_node.console.api import ApiError, Console, job_with_pictures
from dicom_node.console.views import audit_entries, dashboard, list_series, series_patient

HERE = Path(__file__).parent
STATIC_DIR = HERE / "static"
#: Name of the browser session cookie (its value is derived from the token, never the token).
SESSION_COOKIE = "srnode_session"
#: Paths a browser reaches without the token (the login form and its script/style).
PUBLIC_PREFIXES = ("/console/login", "/console/static/")

_ENV = Environment(loader=FileSystemLoader(HERE / "templates"),
                   autoescape=select_autoescape(["html"]), trim_blocks=True, lstrip_blocks=True)


def session_value(token: str) -> str:
    """The cookie value that stands for ``token`` (an HMAC, so the cookie never holds it)."""
    return hmac.new(token.encode(), b"srnode console session", hashlib.sha256).hexdigest()


def _seconds(value: float | None) -> str:
    """``1.23 s`` (or ``-``)."""
    return "-" if value is None else f"{value:.2f} s"


_ENV.filters["seconds"] = _seconds


def render(name: str, request: Request, status_code: int = 200, **context: Any) -> HTMLResponse:
    """Render a template with the values every page uses."""
    html = _ENV.get_template(name).render(
        version=__version__, path=request.url.path,
        patient_data=bool(getattr(request.state, "patient_data", False)),
        token_required=bool(getattr(request.state, "token_required", False)), **context)
    return HTMLResponse(html, status_code=status_code)


def build_pages(console: Console, token: str) -> APIRouter:
    """The console routes (HTML; not in the OpenAPI document)."""
    router = APIRouter(include_in_schema=False)

    @router.get("/")
    async def root() -> Response:
        return RedirectResponse("/console/", status_code=303)

    @router.get("/console/")
    async def dashboard_page(request: Request) -> HTMLResponse:
        from dicom_node.status import node_report

        def read() -> dict[str, Any]:
            return {"status": node_report(console.config, console.db, console.health),
                    **dashboard(console.queue)}

        data = await asyncio.to_thread(read)
        return render("dashboard.html", request, **data)

    @router.get("/console/jobs/{job_id}")
    async def job_page(request: Request, job_id: int) -> HTMLResponse:
        try:
            job = await asyncio.to_thread(job_with_pictures, console, job_id)
        except ApiError as exc:
            return render("error.html", request, status_code=exc.status, message=exc.detail)
        patient = None
        if getattr(request.state, "patient_data", False):
            patient = await asyncio.to_thread(series_patient, console.db,
                                              job["series_instance_uid"])
        return render("job.html", request, job=job, patient=patient)

    @router.get("/console/series")
    async def series_page(request: Request, offset: int = 0, skipped: str = "") -> HTMLResponse:
        only = {"yes": True, "no": False}.get(skipped)
        show = bool(getattr(request.state, "patient_data", False))
        data = await asyncio.to_thread(list_series, console.db, 100, max(0, offset), only, show)
        return render("series.html", request, skipped=skipped, **data)

    @router.get("/console/audit")
    async def audit_page(request: Request, event: str = "", q: str = "",
                         job_id: str = "") -> HTMLResponse:
        job = int(job_id) if job_id.isdigit() else None
        entries = await asyncio.to_thread(audit_entries, console.config.node.audit_log or None,
                                          event[:64], q[:200], job, 300)
        return render("audit.html", request, entries=entries, event=event, q=q, job_id=job_id,
                      kept=bool(console.config.node.audit_log))

    @router.get("/console/login")
    async def login_form(request: Request) -> HTMLResponse:
        return render("login.html", request, failed=False, needed=bool(token))

    @router.post("/console/login")
    async def login(request: Request) -> Response:
        form = parse_qs((await request.body()).decode("utf-8", "replace"))
        given = (form.get("token") or [""])[0]
        if not token or not hmac.compare_digest(given.encode(), token.encode()):
            return render("login.html", request, status_code=401, failed=bool(token),
                          needed=bool(token))
        response = RedirectResponse("/console/", status_code=303)
        response.set_cookie(SESSION_COOKIE, session_value(token), httponly=True,
                            samesite="strict", path="/")
        return response

    @router.post("/console/logout")
    async def logout() -> Response:
        response = RedirectResponse("/console/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    return router
