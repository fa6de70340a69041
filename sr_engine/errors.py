"""Typed errors raised by the SR engine (the network edge maps them to DICOM statuses)."""

from __future__ import annotations


class EngineError(Exception):
    """Base class of every error the SR engine raises."""


class UnknownModelError(EngineError, KeyError):
    """The requested model name is not registered."""


class UnsupportedRequestError(EngineError, ValueError):
    """The request (mode, scale, spacing, shape) cannot be served."""


class WeightsNotFoundError(EngineError, FileNotFoundError):
    """No trained weights exist for this model, mode and scale."""
