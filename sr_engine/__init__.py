"""SR engine: tensors in, tensors out (no DICOM, nothing else of ours).

The torch-backed parts (:func:`enhance_volume`, :func:`check_consistency`,
:func:`available_models`) load on first use, so ``sr_engine.tasks`` and ``sr_engine.api`` stay
cheap to import (config validation, the CLI's choices).
"""

from importlib import import_module
from typing import Any

from .api import ConsistencyReport, DegradationEstimate, EnhanceRequest, EnhanceResult, Mode
from .errors import EngineError, UnknownModelError, UnsupportedRequestError, WeightsNotFoundError

_LAZY = {
    "check_consistency": ".inference",
    "enhance_volume": ".inference",
    "available_models": ".models",
}

__all__ = [
    "ConsistencyReport", "DegradationEstimate", "EngineError", "EnhanceRequest", "EnhanceResult",
    "Mode",
    "UnknownModelError", "UnsupportedRequestError", "WeightsNotFoundError", "available_models",
    "check_consistency", "enhance_volume",
]


def __getattr__(name: str) -> Any:
    """Load the torch-backed members on first access."""
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
