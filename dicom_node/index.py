"""Opening the index: the one place that turns ``[node] database_url`` into a database.

Commands that change the index (``serve``, ``worker``, ``retry``, ``enhance`` into a node) open
it with ``migrate=True``; read-only commands (``status``, ``jobs``) never run migrations: they
read an index at the current schema, treat one that was never created as empty, and refuse
one at another schema version with a clear message.
"""

from __future__ import annotations

from dicom_node.config import Config, ConfigError
from storage.db import Database


class IndexNotReadyError(ConfigError):
    """The index exists at another schema version than this srnode expects."""


def connect_index(config: Config) -> Database:
    """A connection pool to the index of ``config``, without touching its schema.

    For probes that must report an unreachable or outdated index rather than fail on it (the
    health checks); everything else uses :func:`open_index`.
    """
    return Database(config.node.database_url, config.node.index_busy_timeout_seconds)


def open_index(config: Config, *, migrate: bool) -> Database:
    """Open the index database of ``config``.

    Parameters
    ----------
    config
        The node configuration (``[node] database_url``, ``index_busy_timeout_seconds``).
    migrate
        Apply the shipped migrations (writers); ``False`` only checks the schema version.

    Returns
    -------
    Database
        The open database (call :meth:`Database.dispose` when done).

    Raises
    ------
    IndexNotReadyError
        Read-only open of an index at another schema version.
    storage.errors.DatabaseUnavailableError
        If the database cannot be reached.
    """
    db = connect_index(config)
    if migrate:
        db.upgrade()
        return db
    current, head = db.current_revision(), db.head_revision()
    if current is not None and current != head:
        db.dispose()
        raise IndexNotReadyError(
            f"the index {redact_url(config.node.database_url)} is at schema {current}, this "
            f"srnode expects {head}: start `srnode serve` once to migrate it"
        )
    return db


def index_created(db: Database) -> bool:
    """Whether the index has its tables (a read-only open of a new database has none)."""
    return db.current_revision() is not None


def redact_url(url: str) -> str:
    """Hide a password in a database URL (for logs and ``srnode status``)."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        user = creds.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}"
    return url
