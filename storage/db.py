"""Database access: one :class:`Database` per process (or per worker thread in tests).

SQLite runs in WAL mode with a busy timeout and foreign keys on, and every transaction starts
with ``BEGIN IMMEDIATE`` so that writers queue on the lock instead of failing when a read
transaction tries to upgrade. PostgreSQL is reached through psycopg 3.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import Session, sessionmaker

from storage.errors import DatabaseUnavailableError, StorageError

LOGGER = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
#: Default seconds to wait for a locked index before giving up (DatabaseUnavailableError).
DEFAULT_BUSY_TIMEOUT = 5.0
#: Seconds :meth:`Database.upgrade` waits for a lock (several processes may start together).
UPGRADE_BUSY_TIMEOUT = 60.0
_UPGRADE_LOCK = 0x5352_4E4F_4445  # "SRNODE": advisory lock key held while migrating
#: Execution option that marks the connections of :meth:`Database.read_session`.
_READ_ONLY = "srnode_read_only"


def normalise_url(url: str) -> str:
    """Return ``url`` with a plain ``postgresql://`` rewritten to the psycopg 3 driver.

    Parameters
    ----------
    url
        An SQLAlchemy database URL.

    Returns
    -------
    str
        The URL to hand to :func:`sqlalchemy.create_engine`.
    """
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def _is_unavailable(exc: BaseException) -> bool:
    """Return whether an exception means the database cannot be used right now."""
    return isinstance(exc, OperationalError | PoolTimeoutError)


@contextmanager
def _unavailable_as_storage_error() -> Iterator[None]:
    """Re-raise driver errors that mean "cannot use the database now" as a typed error."""
    try:
        yield
    except BaseException as exc:
        if _is_unavailable(exc):
            raise DatabaseUnavailableError(f"database unavailable: {exc}") from exc
        raise


class Database:
    """A database holding the index and the job queue.

    Parameters
    ----------
    url
        SQLAlchemy URL: ``sqlite:///path.db`` or ``postgresql[+psycopg]://...``.
    busy_timeout
        Seconds to wait for a lock held by another connection before failing. Keep it below the
        DIMSE timeout of senders, so the SCP answers a failure status they can retry instead of
        letting them time out.
    """

    def __init__(self, url: str, busy_timeout: float = DEFAULT_BUSY_TIMEOUT) -> None:
        self.url = normalise_url(url)
        self.busy_timeout = float(busy_timeout)
        try:
            parsed = make_url(self.url)
        except Exception as exc:
            raise StorageError(f"invalid database URL: {exc}") from exc
        self.backend = parsed.get_backend_name()
        kwargs: dict[str, Any] = {"future": True}
        if self.backend == "sqlite":
            if parsed.database and parsed.database != ":memory:":
                Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {
                "timeout": self.busy_timeout,
                "check_same_thread": False,
            }
        elif self.backend == "postgresql":
            kwargs["pool_pre_ping"] = True
            lock_ms = int(self.busy_timeout * 1000)
            kwargs["connect_args"] = {
                "connect_timeout": 10,
                "options": f"-c lock_timeout={lock_ms}",
            }
        else:
            raise StorageError(f"unsupported database backend {self.backend!r}")
        self.engine: Engine = create_engine(self.url, **kwargs)
        if self.backend == "sqlite":
            busy_ms = int(self.busy_timeout * 1000)

            def _on_connect(dbapi_connection: Any, record: Any) -> None:
                _sqlite_on_connect(dbapi_connection, record, busy_ms)

            event.listen(self.engine, "connect", _on_connect)
            event.listen(self.engine, "begin", _sqlite_on_begin)
        self._sessionmaker = sessionmaker(self.engine, expire_on_commit=False)
        self._read_sessionmaker = sessionmaker(
            self.engine.execution_options(**{_READ_ONLY: True}), expire_on_commit=False)

    @property
    def is_postgresql(self) -> bool:
        """Whether the backend is PostgreSQL."""
        return self.backend == "postgresql"

    @contextmanager
    def session(self) -> Iterator[Session]:
        """Yield a session; commit when the block succeeds, roll back when it raises.

        Raises
        ------
        DatabaseUnavailableError
            If the driver reports an operational error (cannot connect, locked too long).
        """
        session = self._sessionmaker()
        try:
            with _unavailable_as_storage_error():
                try:
                    yield session
                    session.commit()
                except BaseException:
                    session.rollback()
                    raise
        finally:
            session.close()

    @contextmanager
    def read_session(self) -> Iterator[Session]:
        """Yield a session for reading only (the console, the API, status and job listings).

        On SQLite its transaction is a plain (deferred) ``BEGIN``: in WAL mode a reader sees a
        consistent snapshot and never takes the write lock, so reading never makes the SCP's
        index writes wait.  On PostgreSQL it is an ordinary session.  Do not write in it.

        Raises
        ------
        DatabaseUnavailableError
            If the driver reports an operational error (cannot connect, locked too long).
        """
        session = self._read_sessionmaker()
        try:
            with _unavailable_as_storage_error():
                try:
                    yield session
                finally:
                    # end the read transaction; objects read stay usable (detached, loaded)
                    session.expunge_all()
                    session.rollback()
        finally:
            session.close()

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """Yield a Core connection in a transaction; commit when the block succeeds.

        The hot receive path uses this instead of an ORM session (much less per-statement
        overhead); errors are mapped like :meth:`session`.

        Raises
        ------
        DatabaseUnavailableError
            If the driver reports an operational error (cannot connect, locked too long).
        """
        with _unavailable_as_storage_error(), self.engine.begin() as conn:
            yield conn

    def check(self) -> None:
        """Open a connection and run ``SELECT 1``.

        Raises
        ------
        DatabaseUnavailableError
            If the database cannot be reached.
        """
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except (OperationalError, PoolTimeoutError) as exc:
            raise DatabaseUnavailableError(f"database unavailable: {exc}") from exc

    def alembic_config(self) -> AlembicConfig:
        """Return an Alembic configuration pointing at the migrations shipped in the package."""
        cfg = AlembicConfig()
        cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
        cfg.set_main_option("sqlalchemy.url", self.url.replace("%", "%%"))
        return cfg

    def upgrade(self, revision: str = "head") -> None:
        """Apply the shipped migrations up to ``revision`` (idempotent, safe to run concurrently).

        Raises
        ------
        DatabaseUnavailableError
            If the database cannot be reached.
        """
        cfg = self.alembic_config()
        # Start-up, not the C-STORE path: wait long for other processes upgrading at the same time.
        upgrader = self if self.busy_timeout >= UPGRADE_BUSY_TIMEOUT else Database(
            self.url, busy_timeout=UPGRADE_BUSY_TIMEOUT)
        try:
            for attempt in range(8):
                try:
                    with upgrader.engine.begin() as conn:
                        if self.is_postgresql:
                            # Serialise concurrent upgrades (several processes starting at
                            # once); SQLite transactions hold the write lock (BEGIN IMMEDIATE).
                            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"),
                                         {"key": _UPGRADE_LOCK})
                        cfg.attributes["connection"] = conn
                        command.upgrade(cfg, revision)
                    return
                except OperationalError as exc:
                    # SQLite answers "locked" at once, without waiting, when several new
                    # connections switch a fresh file to WAL together: try again shortly.
                    if self.is_postgresql or "locked" not in str(exc) or attempt == 7:
                        raise
                    time.sleep(0.05 * 2**attempt)
        except (OperationalError, PoolTimeoutError) as exc:
            raise DatabaseUnavailableError(f"database unavailable: {exc}") from exc
        finally:
            if upgrader is not self:
                upgrader.dispose()

    def current_revision(self) -> str | None:
        """Return the Alembic revision the database is at (``None`` when never upgraded)."""
        from alembic.runtime.migration import MigrationContext

        with self.engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()

    def head_revision(self) -> str | None:
        """Return the newest revision of the shipped migrations."""
        from alembic.script import ScriptDirectory

        return ScriptDirectory.from_config(self.alembic_config()).get_current_head()

    def dispose(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()


def _sqlite_on_connect(dbapi_connection: Any, _record: Any, busy_ms: int) -> None:
    """Configure a new SQLite connection (WAL, busy timeout, foreign keys, manual BEGIN).

    ``synchronous=FULL``: a committed index row survives a power loss, not only a crash.
    """
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={busy_ms}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=FULL")
    finally:
        cursor.close()


def _sqlite_on_begin(conn: Connection) -> None:
    """Start every SQLite transaction as IMMEDIATE (take the write lock up front).

    Transactions of :meth:`Database.read_session` start as a deferred ``BEGIN`` (no lock).
    """
    read_only = conn.get_execution_options().get(_READ_ONLY, False)
    conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")
