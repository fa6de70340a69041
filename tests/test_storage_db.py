from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, select, text

from storage.db import Database, normalise_url
from storage.errors import DatabaseUnavailableError
from storage.models import Base, Job
from tests.support import db as db_support
from tests.support.db import (
    PG_ADMIN_URL,
    database_exists,
    fresh_database_url,
    postgres_unavailable_reason,
    synthetic_instance,
)

db_url = db_support.db_url
database = db_support.database

TABLES = {"patients", "studies", "series", "instances", "jobs", "sent_instances",
          "produced_series", "alembic_version"}


def test_upgrade_fresh_then_again(db_url: str) -> None:
    db = Database(db_url)
    try:
        assert db.current_revision() is None
        db.upgrade()
        head = db.current_revision()
        assert head is not None
        assert TABLES <= set(inspect(db.engine).get_table_names())
        db.upgrade()  # already at head: no-op, no error
        assert db.current_revision() == head
    finally:
        db.dispose()


def test_concurrent_upgrades_of_fresh_database(db_url: str) -> None:
    import threading

    errors: list[BaseException] = []
    barrier = threading.Barrier(3)

    def start_node() -> None:
        db = Database(db_url)
        try:
            barrier.wait()
            db.upgrade()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
        finally:
            db.dispose()

    threads = [threading.Thread(target=start_node) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    db = Database(db_url)
    try:
        assert db.current_revision() is not None
        assert TABLES <= set(inspect(db.engine).get_table_names())
    finally:
        db.dispose()


def test_migrations_match_models(database: Database) -> None:
    with database.engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(ctx, Base.metadata) == []


def test_session_commits_and_rolls_back(database: Database) -> None:
    with pytest.raises(RuntimeError):
        with database.session() as s:
            s.execute(text("INSERT INTO produced_series (series_instance_uid, created_at) "
                           "VALUES ('1.2.3', CURRENT_TIMESTAMP)"))
            raise RuntimeError("boom")
    with database.session() as s:
        assert s.execute(text("SELECT count(*) FROM produced_series")).scalar() == 0
        s.execute(text("INSERT INTO produced_series (series_instance_uid, created_at) "
                       "VALUES ('1.2.3', CURRENT_TIMESTAMP)"))
    with database.session() as s:
        assert s.execute(text("SELECT count(*) FROM produced_series")).scalar() == 1


def test_timestamps_are_aware_utc(database: Database) -> None:
    import tempfile

    from storage.filestore import FileStore
    from storage.ingest import store_instance
    from storage.job_types import JobParams
    from storage.jobs import JobQueue
    from tests.support.headers import read_header

    with tempfile.TemporaryDirectory() as tmp:
        data = synthetic_instance("1.2.3", "1.2.3.4", "1.2.3.4.1")
        store_instance(database, FileStore(Path(tmp)), read_header(data), data, "MODALITY")
        job_id = JobQueue(database).enqueue("1.2.3.4", "r", JobParams())
    with database.session() as s:
        job = s.scalars(select(Job).where(Job.id == job_id)).one()
        assert job.created_at.utcoffset() is not None
        assert job.created_at.utcoffset().total_seconds() == 0
    assert JobQueue(database).get(job_id)["created_at"].endswith("+00:00")


def test_sqlite_pragmas(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'sub' / 'x.db'}")
    try:
        with db.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 1000
    finally:
        db.dispose()


def test_plain_postgresql_url_rewritten() -> None:
    assert normalise_url("postgresql://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalise_url("postgresql+psycopg://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalise_url("sqlite:///x.db") == "sqlite:///x.db"
    if postgres_unavailable_reason() is None:
        db = Database(PG_ADMIN_URL)
        try:
            assert db.engine.dialect.driver == "psycopg"
            db.check()
        finally:
            db.dispose()


def test_unreachable_postgresql_raises_typed_error() -> None:
    db = Database("postgresql://postgres@127.0.0.1:1/nothing")
    try:
        with pytest.raises(DatabaseUnavailableError):
            db.check()
        with pytest.raises(DatabaseUnavailableError):
            db.upgrade()
        with pytest.raises(DatabaseUnavailableError):
            with db.session() as s:
                s.execute(text("SELECT 1"))
    finally:
        db.dispose()


def test_locked_sqlite_raises_typed_error(tmp_path: Path) -> None:
    import sqlite3


    url = f"sqlite:///{tmp_path / 'locked.db'}"
    Database(url).upgrade()
    holder = sqlite3.connect(tmp_path / "locked.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    db = Database(url, busy_timeout=0.2)
    try:
        with pytest.raises(DatabaseUnavailableError):
            with db.session() as s:
                s.execute(text("SELECT 1"))
    finally:
        holder.rollback()
        holder.close()
        db.dispose()


def test_postgres_fixture_drops_its_database(tmp_path: Path) -> None:
    reason = postgres_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    with fresh_database_url("postgresql", tmp_path) as url:
        name = url.rsplit("/", 1)[1]
        assert database_exists(name)
        db = Database(url)
        db.upgrade()
        with db.session() as s:  # an open pooled connection must not block the drop
            s.execute(text("SELECT 1"))
    assert not database_exists(name)
    db.dispose()
