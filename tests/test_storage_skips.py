"""Which series are queued and why the others are not (issue 12, item 13)."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import select, update

from dicom_node.status import format_skipped, skipped_series
from storage.completeness import check_completeness
from storage.db import Database
from storage.filestore import FileStore
from storage.ingest import store_instance
from storage.jobs import JobQueue
from storage.models import Series
from storage.records import InstanceHeader
from storage.rules import Rule
from tests.support import db as db_support
from tests.support.db import synthetic_instance
from tests.support.headers import read_header

db_url = db_support.db_url
database = db_support.database

STUDY = "1.2.826.0.1.3680043.8.498.12"


def _add(db: Database, store: FileStore, series: str, *, enhanceable: bool = True,
         **kw: object) -> None:
    data = synthetic_instance(STUDY, series, f"{series}.1", **kw)  # type: ignore[arg-type]
    header = read_header(data)
    if not enhanceable:  # e.g. a dose report forwarded with the study
        header = dataclasses.replace(header, enhanceable=False,
                                     sop_class_uid="1.2.840.10008.5.1.4.1.1.88.67")
    store_instance(db, store, header, data, "MOD", datetime.now(UTC) - timedelta(hours=1))


@pytest.fixture
def store(tmp_path: Path) -> FileStore:
    return FileStore(tmp_path / "store")


@pytest.mark.parametrize(
    ("image_type", "derived"),
    [
        (("ORIGINAL", "PRIMARY", "AXIAL"), False),
        (("DERIVED", "PRIMARY", "AXIAL"), False),  # reconstructed axial images: an acquisition
        (("DERIVED", "PRIMARY", "AXIAL", "CT_SOM5 SPI"), False),
        (("DERIVED", "SECONDARY", "AXIAL"), True),
        (("DERIVED", "PRIMARY", "MPR"), True),
        (("DERIVED", "PRIMARY", "PROJECTION IMAGE", "MIP"), True),
        (("DERIVED",), True),
    ],
)
def test_secondary_derived_is_decided_by_image_type(
    image_type: tuple[str, ...], derived: bool
) -> None:
    header = read_header(synthetic_instance(STUDY, f"{STUDY}.9", f"{STUDY}.9.1",
                                            image_type=image_type))
    assert isinstance(header, InstanceHeader)
    assert header.is_derived is derived


def test_derived_primary_is_queued_and_every_skip_has_a_reason(
    database: Database, store: FileStore
) -> None:
    s = [f"{STUDY}.{i}" for i in range(6)]
    _add(database, store, s[0], image_type=("DERIVED", "PRIMARY", "AXIAL"))
    _add(database, store, s[1], image_type=("DERIVED", "SECONDARY", "MPR"))
    _add(database, store, s[2], image_type=("DERIVED", "SECONDARY", "AXIAL", "SRNODE"))
    _add(database, store, s[3], enhanceable=False)
    _add(database, store, s[4], modality="MR")  # no rule for MR
    _add(database, store, s[5])
    created = check_completeness(database, [Rule(name="ct", modalities=("CT",))], 1, 60)
    queued = {JobQueue(database).get(j)["series_instance_uid"] for j in created}
    assert queued == {s[0], s[5]}
    reasons = {r["series_instance_uid"]: r["reason"] for r in skipped_series(database, 20)}
    assert set(reasons) == {s[1], s[2], s[3], s[4]}
    assert "secondary derived" in reasons[s[1]]
    assert "own output" in reasons[s[2]]
    assert "not a CT/MR image" in reasons[s[3]]
    assert "no rule matches (modality MR" in reasons[s[4]]
    lines = format_skipped(skipped_series(database))
    assert len(lines) == 4 and all(line.startswith("skipped") for line in lines)
    assert not any("Doe" in line or "PAT-0001" in line for line in lines)  # no PHI
    # checking again neither queues them nor repeats anything
    assert check_completeness(database, [Rule(name="ct", modalities=("CT",))], 1, 60) == []


def test_status_and_jobs_commands_show_the_skips(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from dicom_node.cli import main
    from dicom_node.index import open_index
    from dicom_node.status import format_status, node_status

    cfg_path = tmp_path / "config.toml"
    cfg_path.write_text(
        f'[node]\nstorage_dir = "{tmp_path / "storage"}"\n'
        f'database_url = "sqlite:///{tmp_path / "srnode.db"}"\n'
        '[[rules]]\nname = "ct"\nmodalities = ["CT"]\n'
    )
    from dicom_node.config import load_config

    cfg = load_config(cfg_path)
    db = open_index(cfg, migrate=True)
    try:
        store = FileStore(tmp_path / "storage")
        _add(db, store, f"{STUDY}.1", image_type=("DERIVED", "SECONDARY", "MPR"))
        _add(db, store, f"{STUDY}.2", image_type=("DERIVED", "PRIMARY", "AXIAL"))
        check_completeness(db, cfg.rules, 1, 60)
    finally:
        db.dispose()
    status = node_status(cfg)
    assert [s["series_instance_uid"] for s in status["skipped_series"]] == [f"{STUDY}.1"]
    assert "secondary derived" in format_status(status)
    assert main(["jobs", "--config", str(cfg_path)]) == 0
    out = capsys.readouterr().out
    assert f"series {STUDY}.1" in out and "secondary derived" in out
    assert "queued" in out  # the DERIVED\PRIMARY series got its job


def test_upgrade_relabels_derived_primary_series_without_queueing_them(
    db_url: str, tmp_path: Path
) -> None:
    db = Database(db_url)
    try:
        db.upgrade()
        store = FileStore(tmp_path / "store")
        _add(db, store, f"{STUDY}.1", image_type=("DERIVED", "PRIMARY", "AXIAL"))
        _add(db, store, f"{STUDY}.2", image_type=("DERIVED", "SECONDARY", "MPR"))
        with db.engine.begin() as conn:  # back to 0001 with its meaning of is_derived
            conn.execute(update(Series).values(is_derived=True))
            cfg = db.alembic_config()
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, "0001")
        db.upgrade()
        with db.session() as s:
            flags = {r.series_instance_uid: r.is_derived for r in s.scalars(select(Series))}
        assert flags == {f"{STUDY}.1": False, f"{STUDY}.2": True}
    finally:
        db.dispose()

