"""Shared pytest configuration."""

from __future__ import annotations

import logging

import pytest

from tests.support.console import console_site  # noqa: F401 - session fixture of the console tests


@pytest.fixture(autouse=True)
def _restore_logging() -> object:
    """Restore the root logger's handlers and level after each test."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def refused_port() -> object:
    """A loopback port that refuses every connection for the whole test (held bound, no listen)."""
    from tests.support.dcmtk import refusing_port

    with refusing_port() as port:
        yield port
