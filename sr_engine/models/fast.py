"""``fast``: the smallest learned model that clearly beats cubic interpolation (CPU default).

Four 3x3 convolutions with 16 features on the LR grid, sub-pixel output over a cubic base.
Receptive field 9 LR pixels; about 9 k parameters (x2 slice); see
:func:`sr_engine.models.describe` for exact params and FLOPs per output pixel.
"""

from __future__ import annotations

from torch import nn

from .base import SRNet, conv


class FastNet(SRNet):
    """Four-layer residual-over-cubic network.

    Parameters
    ----------
    fy, fx
        Upsampling factors along H and W.
    features
        Feature channels.
    """

    def __init__(self, fy: int, fx: int, features: int = 16) -> None:
        super().__init__(fy, fx)
        self.body = nn.Sequential(
            conv(1, features), nn.ReLU(inplace=True),
            conv(features, features), nn.ReLU(inplace=True),
            conv(features, features), nn.ReLU(inplace=True),
            conv(features, fy * fx),
        )
        self.pad = 4
