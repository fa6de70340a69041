"""Ingest: store a received instance's file and index its header record.

The file is written atomically first, then Patient/Study/Series/Instance rows are upserted in
one transaction. Concurrent associations storing the same new series race on the unique
constraints; the loser rolls back and retries, and then finds the winner's rows.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import BinaryIO

from sqlalchemy import bindparam, case, insert, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from storage.db import Database
from storage.errors import (
    DatabaseUnavailableError,
    StorageError,
)
from storage.filestore import FileStore, PendingWrite, validate_uid
from storage.models import (
    Instance,
    Patient,
    ProducedSeries,
    Series,
    Study,
    UTCDateTime,
    utcnow,
)
from storage.records import TEXT_LIMITS, InstanceHeader

LOGGER = logging.getLogger(__name__)

_MAX_UPSERT_ATTEMPTS = 8


@dataclass(frozen=True)
class StoreOutcome:
    """Result of :func:`store_instance`."""

    path: Path
    replaced: bool


def _get_or_create_patient(session: Session, h: InstanceHeader) -> Patient:
    """Return the patient row for the header, creating or refreshing it."""
    patient = session.scalars(select(Patient).where(Patient.patient_id == h.patient_id)).first()
    if patient is None:
        patient = Patient(
            patient_id=h.patient_id,
            patient_name=h.patient_name,
            patient_birth_date=h.patient_birth_date,
        )
        session.add(patient)
        session.flush()
    else:
        if h.patient_name and patient.patient_name != h.patient_name:
            patient.patient_name = h.patient_name
        if h.patient_birth_date and patient.patient_birth_date != h.patient_birth_date:
            patient.patient_birth_date = h.patient_birth_date
    return patient


def _get_or_create_study(session: Session, h: InstanceHeader, patient: Patient) -> Study:
    """Return the study row for the header, creating it when new."""
    study = session.scalars(
        select(Study).where(Study.study_instance_uid == h.study_instance_uid)
    ).first()
    if study is None:
        study = Study(
            study_instance_uid=h.study_instance_uid,
            patient_fk=patient.id,
            study_date=h.study_date,
            accession_number=h.accession_number,
            study_description=h.study_description,
        )
        session.add(study)
        session.flush()
    return study


def _get_or_create_series(
    session: Session, h: InstanceHeader, study: Study, received_at: datetime, ae: str
) -> Series:
    """Return the series row for the header, creating it (with zero instances) when new."""
    series = session.scalars(
        select(Series).where(Series.series_instance_uid == h.series_instance_uid)
    ).first()
    if series is None:
        produced = session.get(ProducedSeries, h.series_instance_uid) is not None
        series = Series(
            series_instance_uid=h.series_instance_uid,
            study_fk=study.id,
            modality=h.modality,
            body_part_examined=h.body_part_examined,
            series_description=h.series_description,
            series_number=h.series_number,
            image_type="\\".join(h.image_type)[: TEXT_LIMITS["image_type"]],
            is_derived=h.is_derived,
            produced_by_node=produced or h.produced_by_node,
            enhanceable=h.enhanceable,
            num_instances=0,
            first_received_at=received_at,
            last_received_at=received_at,
            calling_ae_title=ae,
        )
        session.add(series)
        session.flush()
    return series


def _bump_series(
    session: Session, series_id: int, added: int, ae: str, received_at: datetime
) -> None:
    """Count a stored instance on its series and mark the series for the completeness check."""
    session.execute(
        update(Series)
        .where(Series.id == series_id)
        .values(
            num_instances=Series.num_instances + added,
            last_received_at=case(
                (Series.last_received_at < received_at, received_at),
                else_=Series.last_received_at,
            ),
            calling_ae_title=ae,
            completeness_checked_at=None,
        )
        .execution_options(synchronize_session=False)
    )


# Prebuilt statements of the known-series fast path: built once, compiled once per dialect, so
# a received instance costs a few cached executions instead of building Core expressions.
_AT = bindparam("b_at", type_=UTCDateTime())
# series id plus the instance row (if any, in whatever series) in one round trip
_SELECT_SERIES_AND_INSTANCE = (
    select(Series.id, Instance.id, Instance.series_fk)
    .select_from(Series)
    .outerjoin(Instance, Instance.sop_instance_uid == bindparam("b_sop"))
    .where(Series.series_instance_uid == bindparam("b_series"))
)
_INSTANCE_VALUES = {
    "sop_class_uid": bindparam("b_class"),
    "transfer_syntax_uid": bindparam("b_ts"),
    "instance_number": bindparam("b_number"),
    "path": bindparam("b_path"),
    "size": bindparam("b_size"),
    "received_at": _AT,
    "calling_ae_title": bindparam("b_ae"),
}
_INSERT_INSTANCE = insert(Instance).values(
    sop_instance_uid=bindparam("b_sop"), series_fk=bindparam("b_series_id"), **_INSTANCE_VALUES
)
_UPDATE_INSTANCE = (
    update(Instance).where(Instance.id == bindparam("b_row_id")).values(**_INSTANCE_VALUES)
)
_BUMP_SERIES = (
    update(Series)
    .where(Series.id == bindparam("b_series_id"))
    .values(
        num_instances=Series.num_instances + bindparam("b_added"),
        last_received_at=case((Series.last_received_at < _AT, _AT), else_=Series.last_received_at),
        calling_ae_title=bindparam("b_ae"),
        completeness_checked_at=None,
    )
)


def _upsert_known_series(
    conn: Connection,
    h: InstanceHeader,
    path: Path,
    size: int,
    ae: str,
    received_at: datetime,
) -> bool | None:
    """Fast path for the common case (the series is already indexed): three cached statements.

    Returns whether the instance was replaced, or ``None`` (nothing written) when the general
    path is needed (new series, or a SOP Instance UID moving between series).
    """
    found = conn.execute(
        _SELECT_SERIES_AND_INSTANCE,
        {"b_series": h.series_instance_uid, "b_sop": h.sop_instance_uid},
    ).first()
    if found is None:
        return None
    series_id, row_id, row_series = found
    params = {
        "b_sop": h.sop_instance_uid,
        "b_series_id": series_id,
        "b_class": h.sop_class_uid,
        "b_ts": h.transfer_syntax_uid,
        "b_number": h.instance_number,
        "b_path": str(path),
        "b_size": size,
        "b_at": received_at,
        "b_ae": ae,
    }
    if row_id is None:
        conn.execute(_INSERT_INSTANCE, params)
        added = 1
    elif row_series != series_id:
        return None
    else:
        conn.execute(_UPDATE_INSTANCE, {**params, "b_row_id": row_id})
        added = 0
    conn.execute(_BUMP_SERIES, {**params, "b_added": added})
    return row_id is not None


def _upsert(
    session: Session,
    h: InstanceHeader,
    path: Path,
    size: int,
    ae: str,
    received_at: datetime,
) -> bool:
    """Upsert the rows of one instance; return whether the SOP Instance was already indexed."""
    patient = _get_or_create_patient(session, h)
    study = _get_or_create_study(session, h, patient)
    series = _get_or_create_series(session, h, study, received_at, ae)
    instance = session.scalars(
        select(Instance).where(Instance.sop_instance_uid == h.sop_instance_uid)
    ).first()
    replaced = instance is not None
    if instance is None:
        session.add(
            Instance(
                sop_instance_uid=h.sop_instance_uid,
                series_fk=series.id,
                sop_class_uid=h.sop_class_uid,
                transfer_syntax_uid=h.transfer_syntax_uid,
                instance_number=h.instance_number,
                path=str(path),
                size=size,
                received_at=received_at,
                calling_ae_title=ae,
            )
        )
        added = 1
    else:
        added = 0
        if instance.series_fk != series.id:
            # The same SOP Instance UID re-sent in another series: move it.
            session.execute(
                update(Series)
                .where(Series.id == instance.series_fk)
                .values(num_instances=Series.num_instances - 1)
            )
            old_path = Path(instance.path)
            if old_path != path:
                old_path.unlink(missing_ok=True)
            instance.series_fk = series.id
            added = 1
        instance.sop_class_uid = h.sop_class_uid
        instance.transfer_syntax_uid = h.transfer_syntax_uid
        instance.instance_number = h.instance_number
        instance.path = str(path)
        instance.size = size
        instance.received_at = received_at
        instance.calling_ae_title = ae
    session.flush()
    _bump_series(session, series.id, added, ae, received_at)
    return replaced


def store_instance(
    db: Database,
    store: FileStore,
    header: InstanceHeader,
    data: bytes | Callable[[BinaryIO], None] | PendingWrite,
    calling_ae_title: str,
    received_at: datetime | None = None,
) -> StoreOutcome:
    """Write one received instance to the file store and index it.

    Parameters
    ----------
    db
        The database.
    store
        The file store.
    header
        The instance's header (validated UIDs).
    data
        The Part 10 file bytes, a callable writing them, or a write started with
        :meth:`FileStore.begin_write` (committed or discarded here in every case).
    calling_ae_title
        AE title of the sender.
    received_at
        Reception time (aware); now when omitted.

    Returns
    -------
    StoreOutcome
        Where the file is and whether an instance with this SOP Instance UID was replaced.

    Raises
    ------
    InvalidUIDError
        If a UID in ``header`` is invalid.
    StorageError
        If the file cannot be written.
    DatabaseUnavailableError
        If the index cannot be updated (the file may stay on disk).
    """
    if received_at is None:
        received_at = utcnow()
    elif received_at.tzinfo is None:
        raise ValueError("received_at must be timezone-aware")
    path = store.instance_path(
        header.study_instance_uid, header.series_instance_uid, header.sop_instance_uid
    )
    if isinstance(data, bytes | bytearray | memoryview):
        data = store.begin_write(data)
    pending = data if isinstance(data, PendingWrite) else None
    try:
        if pending is None:
            size = store.write_atomic(path, data)  # type: ignore[arg-type]
        else:
            # The file is being written and fsynced in a helper thread while the index rows are
            # prepared here; it gets its final name just before the index commits, and is
            # removed if indexing fails (nothing is left behind).
            size = pending.size
            replaced: bool | None = None
            try:
                with db.transaction() as conn:
                    replaced = _upsert_known_series(
                        conn, header, path, size, calling_ae_title, received_at
                    )
                    if replaced is not None:
                        pending.commit(path)
            except IntegrityError:
                replaced = None  # a concurrent association indexed it first: general path
            if replaced is not None:
                return StoreOutcome(path=path, replaced=replaced)
        return _store_general(db, header, path, size, pending, calling_ae_title, received_at)
    finally:
        if pending is not None:
            pending.discard()  # no-op once committed


def _store_general(
    db: Database,
    header: InstanceHeader,
    path: Path,
    size: int,
    pending: PendingWrite | None,
    calling_ae_title: str,
    received_at: datetime,
) -> StoreOutcome:
    """Index an instance with the ORM (new patient/study/series), retrying lost races."""
    last_exc: Exception | None = None
    for attempt in range(_MAX_UPSERT_ATTEMPTS):
        try:
            with db.session() as session:
                replaced = _upsert(session, header, path, size, calling_ae_title, received_at)
                if pending is not None and not pending.committed:
                    pending.commit(path)
            return StoreOutcome(path=path, replaced=replaced)
        except IntegrityError as exc:
            # Another association created the same patient/study/series/instance first.
            last_exc = exc
            LOGGER.debug(
                "unique-constraint race indexing series %s, retrying", header.series_instance_uid
            )
        except DatabaseUnavailableError as exc:
            # Retry only transient conflicts (deadlock, serialisation failure); a database that
            # is down or stays locked past the busy timeout is reported at once.
            if not _is_transient_conflict(exc) or attempt >= 2:
                raise
            last_exc = exc
            LOGGER.warning(
                "transaction conflict indexing series %s (attempt %d), retrying",
                header.series_instance_uid,
                attempt + 1,
            )
        time.sleep(min(0.5, 0.01 * 2**attempt))
    raise StorageError(
        f"cannot index instance {header.sop_instance_uid} after "
        f"{_MAX_UPSERT_ATTEMPTS} attempts: {last_exc}"
    ) from last_exc


def _is_transient_conflict(exc: BaseException) -> bool:
    """Return whether a database error is a deadlock or serialisation failure (retryable)."""
    cause = exc.__cause__
    orig = getattr(cause, "orig", None)
    return getattr(orig, "sqlstate", None) in ("40001", "40P01")


def mark_produced_series(db: Database, series_instance_uid: str) -> None:
    """Record a Series Instance UID this node generated, so it is never queued.

    Parameters
    ----------
    db
        The database.
    series_instance_uid
        UID of a derived series we created (recorded before it is sent).

    Raises
    ------
    InvalidUIDError
        If the UID is invalid.
    """
    validate_uid(series_instance_uid)
    for _ in range(_MAX_UPSERT_ATTEMPTS):
        try:
            with db.session() as session:
                if session.get(ProducedSeries, series_instance_uid) is None:
                    session.add(ProducedSeries(series_instance_uid=series_instance_uid))
                session.execute(
                    update(Series)
                    .where(Series.series_instance_uid == series_instance_uid)
                    .values(produced_by_node=True)
                )
            return
        except IntegrityError:
            continue
    raise StorageError(f"cannot record produced series {series_instance_uid}")
