"""Database.read_session: reading never waits for (or takes) SQLite's write lock."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import func, select

from storage.db import Database
from storage.errors import DatabaseUnavailableError
from storage.jobs import JobQueue
from storage.models import Series


def test_read_session_reads_while_a_writer_holds_the_lock(tmp_path: Path) -> None:
    path = tmp_path / "index.db"
    db = Database(f"sqlite:///{path}", busy_timeout=0.3)
    db.upgrade()
    writer = sqlite3.connect(path, isolation_level=None, timeout=0.3)
    try:
        writer.execute("BEGIN IMMEDIATE")  # e.g. the SCP indexing an instance
        with db.read_session() as s:
            assert s.scalar(select(func.count()).select_from(Series)) == 0
        assert JobQueue(db).list_jobs() == [] and JobQueue(db).count() == 0
        # an ordinary session starts with BEGIN IMMEDIATE and has to wait for the writer
        with pytest.raises(DatabaseUnavailableError), db.session() as s:
            s.scalar(select(func.count()).select_from(Series))
    finally:
        writer.execute("ROLLBACK")
        writer.close()
        db.dispose()
