"""Retention: purge received series and derived output that the node no longer needs.

What may go
-----------
A **received series** (its instance files and instance rows) when no job of it is ``queued``,
``running``, ``held`` or ``failed`` (a failed job has not delivered to every destination and may
still be retried), it has been quiet since ``settled_before`` (so the completeness check has had
its chance to queue it), and one of: it is older than ``received_max_age_s``; it has a ``done``
job and ``delete_received_after_done`` is set; or the store is over ``max_storage_bytes``.

The **derived output** of a ``done`` job (its folder) when the job finished more than
``derived_max_age_s`` ago, or the store is over ``max_storage_bytes``.  A ``done`` job has been
delivered to every destination of its rule (the worker completes a job only then).

Over the budget, the oldest finished items (by last reception / job end) go first until the
stored bytes are at most the budget.  The series row and the job rows stay (a few hundred bytes
each): ``srnode jobs`` keeps its history and the index-derived metrics never go backwards.

Crash-safe order (a ``kill -9`` anywhere leaves nothing the next run cannot finish)
-----------------------------------------------------------------------------------
1. An intent file ``<root>/.purge/<kind>-<key>.json`` listing exactly what goes (instance row
   ids, paths and reception times, or the derived folder) is written atomically.
2. The files are deleted (a missing file counts as deleted).
3. The instance rows are deleted in one transaction (only rows whose reception time is still
   the recorded one: an instance re-sent meanwhile keeps its new row and file).
4. Empty series and study folders are removed, the ``series_purged`` audit callback runs.
5. The intent file is removed.

Every run first finishes the intents it finds (whatever the policy now says), so a kill between
1 and 5 leaves at worst index rows pointing at deleted files of a series already chosen for
purging, which the next run removes; files without rows are never left behind.  The audit
entry is written at least once (twice if the kill falls between steps 4 and 5).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import delete, exists, func, select

from storage.db import Database
from storage.filestore import FileStore
from storage.job_types import JobState
from storage.models import Instance, Job, Series, Study, utcnow

LOGGER = logging.getLogger(__name__)

#: Folder under the storage root that holds purge intents (see the module docstring).
INTENT_DIR = ".purge"
#: Job states that keep a series: work pending, waiting for a human, or not delivered.
KEEP_STATES = (JobState.QUEUED, JobState.RUNNING, JobState.HELD, JobState.FAILED)

#: ``on_purged(item)`` is called once an item is gone (the caller writes the audit entry).
PurgedCallback = Callable[["PurgeItem"], None]


@dataclass(frozen=True)
class RetentionPolicy:
    """What may be purged; ``0`` switches a limit off.

    Attributes
    ----------
    received_max_age_s
        Purge received series quiet for longer than this (seconds).
    derived_max_age_s
        Purge derived output of jobs finished longer ago than this (seconds).
    delete_received_after_done
        Purge a received series as soon as its jobs are done (delivered everywhere).
    max_storage_bytes
        Above this many stored bytes, purge the oldest finished items first.
    """

    received_max_age_s: float = 0.0
    derived_max_age_s: float = 0.0
    delete_received_after_done: bool = False
    max_storage_bytes: int = 0


@dataclass
class PurgeItem:
    """One thing a purge removes: a received series or a job's derived output."""

    kind: str  # "received" or "derived"
    series_instance_uid: str
    study_instance_uid: str
    reason: str  # "age", "done", "storage_budget" or "interrupted"
    bytes: int
    instances: int
    since: str  # ISO time of the last reception (received) or job end (derived)
    series_id: int | None = None
    job_id: int | None = None
    folder: str = ""
    rows: list[tuple[int, str, str]] = field(default_factory=list)  # (row id, path, received_at)

    @property
    def key(self) -> str:
        """Name of the intent file of this item."""
        return f"{self.kind}-{self.series_id if self.kind == 'received' else self.job_id}"

    def describe(self) -> dict[str, Any]:
        """A JSON-serialisable summary (UIDs and sizes only, no patient identifiers)."""
        d = asdict(self)
        d.pop("rows")
        return d


@dataclass
class PurgeReport:
    """What a purge run removed (or, with ``dry_run``, would remove)."""

    dry_run: bool
    stored_bytes: int
    items: list[PurgeItem] = field(default_factory=list)

    @property
    def purged_bytes(self) -> int:
        """Bytes the items hold."""
        return sum(i.bytes for i in self.items)

    def describe(self) -> dict[str, Any]:
        """A JSON-serialisable summary (``srnode purge --json``)."""
        return {"dry_run": self.dry_run, "stored_bytes": self.stored_bytes,
                "purged_bytes": self.purged_bytes, "items": [i.describe() for i in self.items]}


def _folder_bytes(folder: Path) -> int:
    """Total size of the files under ``folder`` (0 when it does not exist)."""
    total = 0
    for dirpath, _dirs, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def _job_folders(derived_root: Path) -> dict[int, Path]:
    """Derived output folders by job id (``job-<id>`` under ``derived_root``)."""
    out: dict[int, Path] = {}
    if not derived_root.is_dir():
        return out
    for entry in derived_root.iterdir():
        if entry.is_dir() and entry.name.startswith("job-") and entry.name[4:].isdigit():
            out[int(entry.name[4:])] = entry
    return out


class Retention:
    """Plans and performs purges of one storage root and its index.

    Parameters
    ----------
    db
        The index and job store.
    store
        The file store holding received instances.
    derived_root
        Folder holding ``job-<id>`` folders of derived output.
    """

    def __init__(self, db: Database, store: FileStore, derived_root: Path) -> None:
        self.db = db
        self.store = store
        self.derived_root = Path(derived_root)
        self.intent_dir = store.root / INTENT_DIR

    # -- planning -----------------------------------------------------------------------------
    def stored_bytes(self) -> int:
        """Bytes held by indexed received instances plus all derived output."""
        with self.db.session() as s:
            received = int(s.scalar(select(func.coalesce(func.sum(Instance.size), 0))) or 0)
        return received + _folder_bytes(self.derived_root)

    def _received_candidates(self, settled_before: datetime) -> list[PurgeItem]:
        """Received series no job holds on to, quiet since ``settled_before``, oldest first."""
        kept = exists().where(Job.series_fk == Series.id, Job.state.in_(KEEP_STATES))
        has_done = exists().where(Job.series_fk == Series.id, Job.state == JobState.DONE)
        with self.db.session() as s:
            rows = s.execute(
                select(Series.id, Series.series_instance_uid, Study.study_instance_uid,
                       Series.last_received_at, has_done.label("done"),
                       func.count(Instance.id), func.coalesce(func.sum(Instance.size), 0))
                .join(Study, Study.id == Series.study_fk)
                .join(Instance, Instance.series_fk == Series.id)
                .where(~kept, Series.last_received_at <= settled_before)
                .group_by(Series.id, Series.series_instance_uid, Study.study_instance_uid,
                          Series.last_received_at)
                .order_by(Series.last_received_at, Series.id)
            ).all()
        return [
            PurgeItem(kind="received", series_instance_uid=uid, study_instance_uid=study_uid,
                      reason="done" if done else "", bytes=int(size), instances=int(count),
                      since=last.isoformat(), series_id=sid)
            for sid, uid, study_uid, last, done, count, size in rows
        ]

    def _load_rows(self, item: PurgeItem) -> None:
        """Record the instance rows (id, path, reception time) a received item removes.

        Leaves ``rows`` empty when the series changed since planning (a new instance, a new
        job holding on to it) or another process purged it meanwhile.
        """
        kept = exists().where(Job.series_fk == Series.id, Job.state.in_(KEEP_STATES))
        with self.db.session() as s:
            still = s.execute(
                select(Series.last_received_at).where(Series.id == item.series_id, ~kept)
            ).scalar_one_or_none()
            if still is None or still.isoformat() != item.since:
                item.rows = []
                return
            item.rows = [
                (int(i), str(p), at.isoformat()) for i, p, at in s.execute(
                    select(Instance.id, Instance.path, Instance.received_at)
                    .where(Instance.series_fk == item.series_id)
                ).all()
            ]
        item.instances = len(item.rows)

    def _derived_candidates(self) -> list[PurgeItem]:
        """Derived output folders of done jobs, oldest job end first."""
        folders = _job_folders(self.derived_root)
        if not folders:
            return []
        with self.db.session() as s:
            rows = s.execute(
                select(Job.id, Job.series_instance_uid, Study.study_instance_uid, Job.finished_at)
                .join(Series, Series.id == Job.series_fk)
                .join(Study, Study.id == Series.study_fk)
                .where(Job.state == JobState.DONE)
                .order_by(Job.finished_at, Job.id)
            ).all()
        rows = [r for r in rows if r[0] in folders]
        return [
            PurgeItem(
                kind="derived", series_instance_uid=uid, study_instance_uid=study_uid, reason="",
                bytes=_folder_bytes(folders[jid]), instances=0,
                since=(finished or utcnow()).isoformat(), job_id=jid, folder=str(folders[jid]),
            )
            for jid, uid, study_uid, finished in rows
        ]

    def plan(self, policy: RetentionPolicy, settled_before: datetime,
             now: datetime | None = None) -> PurgeReport:
        """Decide what a purge removes now, without changing anything.

        Parameters
        ----------
        policy
            The limits.
        settled_before
            Only series quiet since this time are considered (the caller passes now minus the
            longest quiet period and a margin, so no series awaiting its job is touched).
        now
            The current time (aware UTC); the real time when omitted.

        Returns
        -------
        PurgeReport
            The items, oldest first, with ``dry_run`` set.
        """
        now = now or utcnow()
        report = PurgeReport(dry_run=True, stored_bytes=self.stored_bytes())
        if policy == RetentionPolicy():
            return report  # every limit off: nothing to look at
        received = self._received_candidates(settled_before)
        derived = self._derived_candidates()
        chosen: list[PurgeItem] = []
        rest: list[PurgeItem] = []
        for item in received:
            if (policy.received_max_age_s > 0 and datetime.fromisoformat(item.since)
                    <= now - timedelta(seconds=policy.received_max_age_s)):
                item.reason = "age"
            elif item.reason == "done" and policy.delete_received_after_done:
                pass
            else:
                item.reason = ""
            (chosen if item.reason else rest).append(item)
        for item in derived:
            if (policy.derived_max_age_s > 0 and datetime.fromisoformat(item.since)
                    <= now - timedelta(seconds=policy.derived_max_age_s)):
                item.reason = "age"
                chosen.append(item)
            else:
                rest.append(item)
        if policy.max_storage_bytes > 0:
            remaining = report.stored_bytes - sum(i.bytes for i in chosen)
            for item in sorted(rest, key=lambda i: i.since):
                if remaining <= policy.max_storage_bytes:
                    break
                item.reason = "storage_budget"
                chosen.append(item)
                remaining -= item.bytes
        report.items = sorted(chosen, key=lambda i: i.since)
        return report

    # -- performing ---------------------------------------------------------------------------
    def pending_intents(self) -> list[PurgeItem]:
        """Purges an earlier run chose but may not have finished (see the module docstring)."""
        items = []
        if not self.intent_dir.is_dir():
            return items
        for path in sorted(self.intent_dir.glob("*.json")):
            try:
                data = json.loads(path.read_text())
                data["rows"] = [tuple(r) for r in data.get("rows", [])]
                items.append(PurgeItem(**data))
            except (OSError, ValueError, TypeError) as exc:
                LOGGER.error("unreadable purge intent %s: %s", path.name, exc)
        return items

    def purge(self, policy: RetentionPolicy, settled_before: datetime, dry_run: bool = False,
              on_purged: PurgedCallback | None = None, now: datetime | None = None,
              ) -> PurgeReport:
        """Finish interrupted purges, then purge what the policy selects.

        Parameters
        ----------
        policy, settled_before, now
            See :meth:`plan`.
        dry_run
            Only report (interrupted purges are listed with reason ``interrupted``).
        on_purged
            Called with each item once it is gone (writes the ``series_purged`` audit entry).

        Returns
        -------
        PurgeReport
            What was (or would be) removed.
        """
        pending = self.pending_intents()
        for item in pending:
            item.reason = "interrupted"
            if not dry_run:
                self._execute(item, on_purged)
        report = self.plan(policy, settled_before, now)
        report.items = pending + report.items
        report.dry_run = dry_run
        if dry_run:
            return report
        done = list(pending)
        for item in report.items[len(pending):]:
            if item.kind == "received":
                self._load_rows(item)
                if not item.rows:
                    continue  # changed since planning, or purged by another process
            self._write_intent(item)
            self._execute(item, on_purged)
            done.append(item)
        report.items = done
        if report.items:
            LOGGER.info("retention purged %d item(s), %d bytes", len(report.items),
                     report.purged_bytes)
        return report

    def _write_intent(self, item: PurgeItem) -> None:
        self.intent_dir.mkdir(parents=True, exist_ok=True)
        self.store.write_atomic(self.intent_dir / f"{item.key}.json",
                                json.dumps(asdict(item)).encode())

    def _execute(self, item: PurgeItem, on_purged: PurgedCallback | None) -> None:
        """Steps 2-5 of the module docstring for one item whose intent is on disk."""
        if item.kind == "derived":
            shutil.rmtree(self.store.check_inside(Path(item.folder)), ignore_errors=True)
        else:
            for _row_id, path, _at in item.rows:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.store.check_inside(Path(path)))
            self._delete_rows(item.rows)
            self._remove_empty_parents(p for _i, p, _a in item.rows)
        if on_purged is not None:
            on_purged(item)
        with contextlib.suppress(FileNotFoundError):
            (self.intent_dir / f"{item.key}.json").unlink()

    def _delete_rows(self, rows: list[tuple[int, str, str]]) -> None:
        """Delete the recorded instance rows whose reception time is unchanged."""
        recorded = {row_id: datetime.fromisoformat(at) for row_id, _p, at in rows}
        ids = list(recorded)
        with self.db.session() as s:
            for start in range(0, len(ids), 500):
                chunk = ids[start:start + 500]
                current = s.execute(
                    select(Instance.id, Instance.received_at).where(Instance.id.in_(chunk))
                ).all()
                same = [i for i, at in current if at == recorded[i]]
                if same:
                    s.execute(delete(Instance).where(Instance.id.in_(same)))

    def _remove_empty_parents(self, paths: Iterable[str]) -> None:
        """Remove series and study folders left empty (never the root)."""
        folders = {Path(p).parent for p in paths}
        for folder in sorted(folders | {f.parent for f in folders}, key=lambda f: -len(f.parts)):
            if folder.resolve() != self.store.root and folder.resolve().is_relative_to(
                    self.store.root):
                with contextlib.suppress(OSError):
                    folder.rmdir()
