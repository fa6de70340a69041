"""Fresh, throw-away databases for tests: SQLite files and PostgreSQL databases.

``db_url`` is a pytest fixture parametrised over ``sqlite`` and ``postgresql`` and ``database``
gives an upgraded :class:`storage.db.Database` on it; bind them in a test module with
``from tests.support import db as db_support`` and ``db_url = db_support.db_url`` (and
``database = db_support.database``). For PostgreSQL a
uniquely named database is created on 127.0.0.1:5432 (user postgres, trust auth; override the
server with ``SRNODE_TEST_PG_ADMIN_URL``) and dropped afterwards, even if connections are left
open. If the server is unreachable the PostgreSQL cases are skipped with the reason.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from storage.db import Database

PG_ADMIN_URL = os.environ.get(
    "SRNODE_TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
BACKENDS = ("sqlite", "postgresql")
TEST_DB_PREFIX = "srnode_test_"


def _pg_admin_connect():  # noqa: ANN202 - psycopg connection
    import psycopg

    return psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5)


def postgres_unavailable_reason() -> str | None:
    """Return why PostgreSQL cannot be used for tests, or None when it can."""
    try:
        with _pg_admin_connect() as conn:
            conn.execute("SELECT 1")
    except Exception as exc:  # noqa: BLE001 - any failure means "skip"
        return f"PostgreSQL at {PG_ADMIN_URL.split('@')[-1]} is unreachable: {exc}"
    return None


@contextmanager
def fresh_database_url(backend: str, tmp_dir: Path) -> Iterator[str]:
    """Yield the URL of a new empty database and remove it afterwards.

    Parameters
    ----------
    backend
        ``"sqlite"`` or ``"postgresql"``.
    tmp_dir
        Folder for the SQLite file.
    """
    if backend == "sqlite":
        yield f"sqlite:///{tmp_dir / f'srnode-{uuid.uuid4().hex[:8]}.db'}"
        return
    if backend != "postgresql":
        raise ValueError(f"unknown backend {backend!r}")
    reason = postgres_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    name = f"{TEST_DB_PREFIX}{uuid.uuid4().hex[:16]}"
    with _pg_admin_connect() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        with _pg_admin_connect() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def database_exists(name: str) -> bool:
    """Return whether a PostgreSQL database with this name exists."""
    with _pg_admin_connect() as conn:
        row = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
    return row is not None


@pytest.fixture(
    params=[pytest.param("sqlite"), pytest.param("postgresql", marks=pytest.mark.postgres)]
)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database URL for each backend (SQLite file, PostgreSQL database)."""
    with fresh_database_url(request.param, tmp_path) as url:
        yield url


def synthetic_instance(
    study_uid: str,
    series_uid: str,
    sop_uid: str,
    *,
    modality: str = "CT",
    body_part: str = "CHEST",
    series_description: str = "Thorax 5mm",
    instance_number: int = 1,
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    pixel_value: int = 0,
    patient_id: str = "PAT-0001",
    patient_name: str = "Doe^Jane",
) -> bytes:
    """Return a small synthetic CT/MR Image Storage Part 10 file (8x8 pixels) as bytes."""
    import io

    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage

    sop_class = CTImageStorage if modality == "CT" else MRImageStorage
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.PatientID = patient_id
    ds.PatientName = patient_name
    ds.PatientBirthDate = "19700101"
    ds.StudyDate = "20260101"
    ds.AccessionNumber = "ACC1"
    ds.StudyDescription = "Synthetic"
    ds.Modality = modality
    ds.BodyPartExamined = body_part
    ds.SeriesDescription = series_description
    ds.SeriesNumber = 3
    ds.InstanceNumber = instance_number
    ds.ImageType = list(image_type)
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.PixelData = np.full((8, 8), pixel_value, dtype=np.int16).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.fixture
def database(db_url: str) -> Iterator[Database]:
    """An upgraded :class:`storage.db.Database` on each backend (disposed afterwards)."""
    db = Database(db_url)
    db.upgrade()
    try:
        yield db
    finally:
        db.dispose()
