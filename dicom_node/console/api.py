"""The REST API under ``/api/``: jobs, series, status, rule tests, the audit log and pictures.

Every error is a JSON body ``{"error": <code>, "detail": <sentence>}``: ``bad_request`` (400:
malformed id, UID, state or paging), ``unauthorized`` (401), ``forbidden`` (403: a request a
page of another site made), ``not_found`` (404), ``conflict`` (409: the job's state does not
allow the action), ``render_failed`` (500: the stored files could not be made into a picture).
A refused request changes nothing.  The OpenAPI document is served at ``/api/openapi.json``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from dicom_node.audit import AuditLog
from dicom_node.config import Config
from dicom_node.console.pictures import (
    KINDS,
    PictureService,
    PictureUnavailableError,
    RenderError,
)
from dicom_node.console.views import (
    SeriesNotFoundError,
    audit_entries,
    job_detail,
    job_source_paths,
    list_series,
    rule_test,
)
from dicom_node.health import Health
from storage.db import Database
from storage.errors import InvalidJobStateError, JobNotFoundError
from storage.job_types import JobState
from storage.jobs import JobQueue


@dataclass
class Console:
    """What the console and the API read and change: the running node's services.

    Attributes
    ----------
    config
        The node configuration.
    db
        The node's index.
    audit
        The audit log (operator actions are recorded there).
    health
        Runs the health checks (as ``/healthz``).
    pictures
        Renders and caches before/after pictures.
    """

    config: Config
    db: Database
    audit: AuditLog
    health: Callable[[], Health]
    pictures: PictureService = field(init=False)

    def __post_init__(self) -> None:
        self.pictures = PictureService(Path(self.config.node.storage_dir) / "console-cache")

    @property
    def queue(self) -> JobQueue:
        """The job queue (with the worker's backoff policy)."""
        from dicom_node.worker import job_queue

        return job_queue(self.config, self.db)

    def derived_paths(self, job_id: int) -> list[Path]:
        """The derived files a finished attempt of the job wrote (empty if none)."""
        import json

        from dicom_node.worker import MANIFEST, job_output_dir

        folder = job_output_dir(self.config, job_id)
        try:
            files = json.loads((folder / MANIFEST).read_text())["files"]
        except (OSError, ValueError, KeyError):
            return []
        return [folder / name for name in files]

    def picture_inputs(self, job: dict[str, Any]) -> tuple[list[Path], list[Path], bool]:
        """Source files, derived files and whether reformats are shown, for one job."""
        source = [p for p in job_source_paths(self.db, job["id"]) if p.exists()]
        return source, self.derived_paths(job["id"]), job["params"].get("mode") == "volume"

    def close(self) -> None:
        """Stop the picture renderer."""
        self.pictures.close()


class ApiError(Exception):
    """An API request refused with a 4xx status and a JSON body."""

    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.error = error
        self.detail = detail


class ErrorBody(BaseModel):
    """The body of every 4xx answer."""

    error: str
    detail: str


class _Open(BaseModel):
    """A JSON object whose documented fields are the main ones (more may follow)."""

    model_config = ConfigDict(extra="allow")


class JobSummary(_Open):
    """A job as ``srnode jobs --json`` lists it."""

    id: int
    series_instance_uid: str
    state: str
    stage: str | None = None
    attempts: int
    max_attempts: int
    rule: str
    error: str | None = None
    created_at: str | None = None
    finished_at: str | None = None


class JobList(BaseModel):
    """One page of jobs, newest first."""

    jobs: list[JobSummary]
    total: int
    limit: int
    offset: int


class JobDetail(JobSummary):
    """One job: stages with times, safety-gate and self-check figures, destinations, errors."""

    stages: list[dict[str, Any]]
    safety: dict[str, Any]
    destinations: list[dict[str, Any]]
    errors: list[dict[str, Any]]
    actions: dict[str, bool]
    pictures: dict[str, str]


class ActionResult(BaseModel):
    """The outcome of retry or cancel."""

    id: int
    previous_state: str
    state: str


class SeriesList(BaseModel):
    """One page of received series, most recently received first."""

    series: list[dict[str, Any]]
    total: int
    limit: int
    offset: int


class NodeStatus(_Open):
    """What ``srnode status --json`` shows."""

    health: dict[str, Any]


class RuleTest(_Open):
    """Which rule selects a series, and why each rule does or does not."""

    series_instance_uid: str
    matching_rules: list[str]
    rule: str | None
    explanation: str
    rules: list[dict[str, Any]]


class AuditList(BaseModel):
    """Audit entries, newest first."""

    entries: list[dict[str, Any]]


ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "malformed input"},
    401: {"model": ErrorBody, "description": "missing or wrong bearer token"},
    404: {"model": ErrorBody, "description": "no such job or series"},
    403: {"model": ErrorBody, "description": "a request from another site or Host"},
}
CONFLICT: dict[int | str, dict[str, Any]] = {
    **ERRORS, 409: {"model": ErrorBody, "description": "the job's state does not allow it"}}

JobId = Annotated[int, PathParam(ge=1, description="job id")]


def error_response(status: int, error: str, detail: str) -> JSONResponse:
    """The JSON answer of a refused request."""
    return JSONResponse({"error": error, "detail": detail}, status_code=status)


def install_error_handlers(app: FastAPI) -> None:
    """Answer bad input, unknown paths and refused actions with ``{"error", "detail"}``."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.error, exc.detail)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            where = ".".join(str(x) for x in err.get("loc", ()) if x not in ("query", "path"))
            parts.append(f"{where or 'request'}: {err.get('msg', 'invalid')}")
        return error_response(400, "bad_request", "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        names = {404: "not_found", 405: "method_not_allowed"}
        return error_response(exc.status_code, names.get(exc.status_code, "error"),
                              str(exc.detail))


def job_with_pictures(console: Console, job_id: int) -> dict[str, Any]:
    """:func:`~dicom_node.console.views.job_detail` plus the URLs of the job's pictures.

    Raises
    ------
    ApiError
        404 if there is no such job.
    """
    try:
        detail = job_detail(console.config, console.queue, job_id)
    except JobNotFoundError as exc:
        raise ApiError(404, "not_found", str(exc)) from exc
    source, derived, volume = console.picture_inputs(detail)
    detail["pictures"] = {k: f"/api/jobs/{job_id}/pictures/{k}.png"
                          for k in console.pictures.available(source, derived, volume)}
    return detail


def build_api(console: Console) -> APIRouter:
    """The ``/api/`` routes over ``console``."""
    router = APIRouter(prefix="/api", tags=["api"])

    @router.get("/jobs", response_model=JobList, responses=ERRORS,
                summary="Jobs, newest first (the fields of `srnode jobs --json`)")
    async def jobs(
        state: Annotated[list[str] | None, Query(description="only jobs in these states")] = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        offset: Annotated[int, Query(ge=0)] = 0,
    ) -> dict[str, Any]:
        states = state or None
        if states is not None:
            unknown = sorted(set(states) - {str(s) for s in JobState})
            if unknown:
                raise ApiError(400, "bad_request",
                               f"unknown job state(s) {unknown}; states are "
                               f"{', '.join(str(s) for s in JobState)}")
        queue = console.queue

        def read() -> dict[str, Any]:
            return {"jobs": queue.list_jobs(states=states, limit=limit, offset=offset),
                    "total": queue.count(states), "limit": limit, "offset": offset}

        return await asyncio.to_thread(read)

    @router.get("/jobs/{job_id}", response_model=JobDetail, responses=ERRORS,
                summary="One job: stages, safety figures, destinations and errors")
    async def job(job_id: JobId) -> dict[str, Any]:
        return await asyncio.to_thread(job_with_pictures, console, job_id)

    def act(job_id: int, action: str) -> dict[str, Any]:
        queue = console.queue
        try:
            before = queue.get(job_id)["state"]
            if action == "retry":
                queue.retry(job_id)
            else:
                before = queue.cancel(job_id)
        except JobNotFoundError as exc:
            raise ApiError(404, "not_found", str(exc)) from exc
        except InvalidJobStateError as exc:
            raise ApiError(409, "conflict", str(exc)) from exc
        after = queue.get(job_id)
        console.audit.record(f"job_{'retried' if action == 'retry' else 'cancelled'}",
                             job_id=job_id, series_instance_uid=after["series_instance_uid"],
                             previous_state=before, by="http")
        return {"id": job_id, "previous_state": before, "state": after["state"]}

    @router.post("/jobs/{job_id}/retry", response_model=ActionResult, responses=CONFLICT,
                 summary="Re-queue a failed or held job")
    async def retry(job_id: JobId) -> dict[str, Any]:
        return await asyncio.to_thread(act, job_id, "retry")

    @router.post("/jobs/{job_id}/cancel", response_model=ActionResult, responses=CONFLICT,
                 summary="Cancel a queued, held or running job (a running one is stopped)")
    async def cancel(job_id: JobId) -> dict[str, Any]:
        return await asyncio.to_thread(act, job_id, "cancel")

    @router.get("/jobs/{job_id}/pictures/{kind}.png", responses={
        **ERRORS, 200: {"content": {"image/png": {}}, "description": "an 8-bit grey PNG"}},
        response_class=FileResponse, summary="A before/after picture of a job")
    async def picture(job_id: JobId, kind: str) -> FileResponse:
        if kind not in KINDS:
            raise ApiError(400, "bad_request",
                           f"unknown picture {kind[:40]!r}; pictures are {', '.join(KINDS)}")

        def make() -> Path:
            try:
                job = console.queue.get(job_id)
                source, derived, volume = console.picture_inputs(job)
                return console.pictures.picture(job_id, kind, source, derived, volume)
            except (JobNotFoundError, PictureUnavailableError) as exc:
                raise ApiError(404, "not_found", str(exc)) from exc
            except RenderError as exc:
                raise ApiError(500, "render_failed", str(exc)) from exc

        path = await asyncio.to_thread(make)
        return FileResponse(path, media_type="image/png",
                            headers={"Cache-Control": "private, no-cache"})

    @router.get("/series", response_model=SeriesList, responses=ERRORS,
                summary="Received series with counts, skip reasons and their jobs")
    async def series(
        request: Request,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        offset: Annotated[int, Query(ge=0)] = 0,
        skipped: Annotated[bool | None, Query(description="only skipped (or not)")] = None,
    ) -> dict[str, Any]:
        show = bool(getattr(request.state, "patient_data", False))
        return await asyncio.to_thread(list_series, console.db, limit, offset, skipped, show)

    @router.get("/status", response_model=NodeStatus, responses=ERRORS,
                summary="What `srnode status --json` shows")
    async def status() -> dict[str, Any]:
        from dicom_node.status import node_report

        return await asyncio.to_thread(node_report, console.config, console.db, console.health)

    @router.get("/rules/test", response_model=RuleTest, responses=ERRORS,
                summary="Which rule would select a received series, and why")
    async def rules_test(
        series: Annotated[str, Query(description="Series Instance UID", max_length=200)],
    ) -> dict[str, Any]:
        def run() -> dict[str, Any]:
            try:
                return rule_test(console.config, console.db, series)
            except ValueError as exc:
                raise ApiError(400, "bad_request", str(exc)) from exc
            except SeriesNotFoundError as exc:
                raise ApiError(404, "not_found", str(exc)) from exc

        return await asyncio.to_thread(run)

    @router.get("/audit", response_model=AuditList, responses=ERRORS,
                summary="Audit log entries, newest first")
    async def audit(
        event: Annotated[str, Query(max_length=64)] = "",
        q: Annotated[str, Query(max_length=200, description="text to search")] = "",
        job_id: Annotated[int | None, Query(ge=1)] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 200,
    ) -> dict[str, Any]:
        entries = await asyncio.to_thread(audit_entries, console.config.node.audit_log or None,
                                          event, q, job_id, limit)
        return {"entries": entries}

    return router
