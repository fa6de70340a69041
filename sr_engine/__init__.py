"""SR engine: tensors in, tensors out (no DICOM, nothing else of ours)."""

from .api import ConsistencyReport, DegradationEstimate, EnhanceRequest, EnhanceResult, Mode
from .errors import EngineError, UnknownModelError, UnsupportedRequestError, WeightsNotFoundError
from .inference import check_consistency, enhance_volume
from .models import available_models

__all__ = [
    "ConsistencyReport", "DegradationEstimate", "EngineError", "EnhanceRequest", "EnhanceResult",
    "Mode",
    "UnknownModelError", "UnsupportedRequestError", "WeightsNotFoundError", "available_models",
    "check_consistency", "enhance_volume",
]
