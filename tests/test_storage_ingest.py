from __future__ import annotations

import io
import logging
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import BinaryIO

import pydicom
import pytest
from sqlalchemy import func, select

from dicom_node.receive.header import header_from_dataset
from storage.db import Database
from storage.errors import DatabaseUnavailableError, InvalidInstanceError, InvalidUIDError
from storage.filestore import FileStore
from storage.ingest import mark_produced_series, store_instance
from storage.models import Instance, Patient, ProducedSeries, Series, Study
from tests.support import db as db_support
from tests.support.db import synthetic_instance
from tests.support.headers import read_header

db_url = db_support.db_url
database = db_support.database

STUDY, SERIES = "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.1.2"


def _sop(i: int) -> str:
    return f"{SERIES}.{i}"


def test_read_header_part10_and_bare_dataset(tmp_path: Path) -> None:
    data = synthetic_instance(STUDY, SERIES, _sop(1), instance_number=7,
                              image_type=("DERIVED", "SECONDARY", "SRNODE"))
    h = read_header(data)
    assert (h.study_instance_uid, h.series_instance_uid, h.sop_instance_uid) == (
        STUDY, SERIES, _sop(1))
    assert h.sop_class_uid == pydicom.uid.CTImageStorage
    assert h.transfer_syntax_uid == pydicom.uid.ExplicitVRLittleEndian
    assert (h.modality, h.body_part_examined, h.instance_number, h.series_number) == (
        "CT", "CHEST", 7, 3)
    assert h.image_type == ("DERIVED", "SECONDARY", "SRNODE")
    assert h.is_derived and h.produced_by_node
    assert "Doe" not in repr(h) and "PAT-0001" not in repr(h)

    path = tmp_path / "x.dcm"
    path.write_bytes(data)
    assert read_header(path) == h

    # A bare dataset (as on the wire) in implicit VR little endian, without meta.
    ds = pydicom.dcmread(io.BytesIO(data))
    del ds.file_meta
    buf = io.BytesIO()
    ds.save_as(buf, implicit_vr=True, little_endian=True)
    bare = read_header(buf.getvalue())
    assert bare.sop_instance_uid == _sop(1)
    assert bare.transfer_syntax_uid == pydicom.uid.ImplicitVRLittleEndian


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
@pytest.mark.parametrize(
    ("keyword", "value", "error"),
    [
        ("SeriesInstanceUID", "../../etc", InvalidUIDError),
        ("SOPInstanceUID", "1.2.03", InvalidUIDError),
        ("StudyInstanceUID", None, InvalidInstanceError),
        ("SOPClassUID", None, InvalidInstanceError),
    ],
)
def test_from_dataset_rejects_bad_uids(keyword: str, value: str | None, error: type) -> None:
    ds = pydicom.dcmread(io.BytesIO(synthetic_instance(STUDY, SERIES, _sop(1))))
    if value is None:
        delattr(ds, keyword)
        if keyword == "SOPClassUID":
            del ds.file_meta.MediaStorageSOPClassUID
    else:
        setattr(ds, keyword, value)
    with pytest.raises(error, match=keyword):
        header_from_dataset(ds)


def test_read_header_garbage() -> None:
    with pytest.raises(InvalidInstanceError):
        read_header(b"\x00" * 10)


def test_store_and_replace_instance(database: Database, tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    t0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    first = synthetic_instance(STUDY, SERIES, _sop(1), pixel_value=1)
    out = store_instance(database, store, read_header(first), first, "MODALITY1", t0)
    assert not out.replaced
    assert out.path == store.instance_path(STUDY, SERIES, _sop(1))
    assert out.path.read_bytes() == first

    second = synthetic_instance(STUDY, SERIES, _sop(1), pixel_value=2)
    assert second != first
    out2 = store_instance(database, store, read_header(second), second, "MODALITY2",
                          t0 + timedelta(seconds=5))
    assert out2.replaced and out2.path == out.path
    assert out.path.read_bytes() == second

    other = synthetic_instance(STUDY, SERIES, _sop(2), instance_number=2)
    store_instance(database, store, read_header(other), lambda fh: fh.write(other),
                   "MODALITY1", t0 + timedelta(seconds=3))

    with database.session() as s:
        rows = s.scalars(select(Instance).where(Instance.sop_instance_uid == _sop(1))).all()
        assert len(rows) == 1
        assert rows[0].size == len(second) and rows[0].calling_ae_title == "MODALITY2"
        series = s.scalars(select(Series)).one()
        assert series.num_instances == 2
        assert series.first_received_at == t0
        assert series.last_received_at == t0 + timedelta(seconds=5)  # never moves backwards
        assert (series.modality, series.body_part_examined) == ("CT", "CHEST")
        assert not series.is_derived and not series.produced_by_node
        assert s.scalar(select(func.count()).select_from(Study)) == 1
        patient = s.scalars(select(Patient)).one()
        assert (patient.patient_id, patient.patient_name) == ("PAT-0001", "Doe^Jane")


def test_naive_received_at_rejected(database: Database, tmp_path: Path) -> None:
    data = synthetic_instance(STUDY, SERIES, _sop(1))
    with pytest.raises(ValueError, match="timezone"):
        store_instance(database, FileStore(tmp_path), read_header(data), data, "A",
                       datetime(2026, 1, 1, 12, 0))


def test_failed_file_write_indexes_nothing(database: Database, tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    data = synthetic_instance(STUDY, SERIES, _sop(1))

    def broken(fh: BinaryIO) -> None:
        fh.write(data[:100])
        raise OSError("disk full")

    with pytest.raises(Exception, match="disk full"):
        store_instance(database, store, read_header(data), broken, "A")
    assert not store.instance_path(STUDY, SERIES, _sop(1)).exists()
    with database.session() as s:
        assert s.scalar(select(func.count()).select_from(Instance)) == 0


def test_concurrent_associations_same_new_series(database: Database, tmp_path: Path) -> None:
    """Several threads, each with its own Database, store one new series at once."""
    store = FileStore(tmp_path)
    n_threads, per_thread = 4, 6
    errors: list[BaseException] = []
    barrier = threading.Barrier(n_threads)

    def association(k: int) -> None:
        db = Database(database.url)
        try:
            barrier.wait()
            for j in range(per_thread):
                i = k * per_thread + j + 1
                data = synthetic_instance(STUDY, SERIES, _sop(i), instance_number=i)
                store_instance(db, store, read_header(data), data, f"AE{k}")
            # A re-send of a shared instance from every association.
            data = synthetic_instance(STUDY, SERIES, _sop(1000))
            store_instance(db, store, read_header(data), data, f"AE{k}")
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
        finally:
            db.dispose()

    threads = [threading.Thread(target=association, args=(k,)) for k in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with database.session() as s:
        assert s.scalar(select(func.count()).select_from(Series)) == 1
        assert s.scalar(select(func.count()).select_from(Instance)) == n_threads * per_thread + 1
        assert s.scalars(select(Series.num_instances)).one() == n_threads * per_thread + 1


def test_mark_produced_series(database: Database, tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    produced = "1.2.3.999"
    mark_produced_series(database, produced)
    mark_produced_series(database, produced)  # idempotent
    with database.session() as session:
        assert session.get(ProducedSeries, produced) is not None
    # ImageType altered by a PACS: ORIGINAL, no SRNODE token.
    data = synthetic_instance(STUDY, produced, produced + ".1")
    store_instance(database, store, read_header(data), data, "PACS")
    # Marked after the series was already received.
    data2 = synthetic_instance(STUDY, SERIES, _sop(1))
    store_instance(database, store, read_header(data2), data2, "PACS")
    mark_produced_series(database, SERIES)
    with database.session() as s:
        flags = dict(s.execute(select(Series.series_instance_uid, Series.produced_by_node)).all())
    assert flags == {produced: True, SERIES: True}
    with pytest.raises(InvalidUIDError):
        mark_produced_series(database, "1.2.x")


def test_no_phi_in_logs(database: Database, tmp_path: Path, caplog: pytest.LogCaptureFixture
                        ) -> None:
    caplog.set_level(logging.DEBUG)
    store = FileStore(tmp_path)
    data = synthetic_instance(STUDY, SERIES, _sop(1), patient_id="SECRETID",
                              patient_name="Secret^Name")
    store_instance(database, store, read_header(data), data, "A")
    store_instance(database, store, read_header(data), data, "A")
    text = caplog.text
    assert "SECRETID" not in text and "Secret" not in text and "19700101" not in text


def test_locked_database_reports_unavailable(tmp_path: Path) -> None:
    import sqlite3


    url = f"sqlite:///{tmp_path / 'idx.db'}"
    Database(url).upgrade()
    db = Database(url, busy_timeout=0.2)
    holder = sqlite3.connect(tmp_path / "idx.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    store = FileStore(tmp_path / "store")
    data = synthetic_instance(STUDY, SERIES, _sop(1))
    try:
        with pytest.raises(DatabaseUnavailableError):
            store_instance(db, store, read_header(data), data, "A")
        # Nothing was indexed and nothing is left on disk (not even a temporary file).
        assert not store.instance_path(STUDY, SERIES, _sop(1)).exists()
        assert [p for p in store.root.rglob("*") if p.is_file()] == []
    finally:
        holder.rollback()
        holder.close()
    with db.session() as s:
        assert s.scalar(select(func.count()).select_from(Instance)) == 0
    # Lock released: the re-sent instance is indexed.
    assert not store_instance(db, store, read_header(data), data, "A").replaced
    # The same on the fast path for a series already indexed.
    second = synthetic_instance(STUDY, SERIES, _sop(2))
    holder = sqlite3.connect(tmp_path / "idx.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(DatabaseUnavailableError):
            store_instance(db, store, read_header(second), second, "A")
        files = sorted(p.name for p in store.root.rglob("*") if p.is_file())
        assert files == [store.instance_path(STUDY, SERIES, _sop(1)).name]
    finally:
        holder.rollback()
        holder.close()
    db.dispose()
