"""``srcnn``: the three-layer SRCNN family.

Patch extraction, non-linear mapping and reconstruction, run on the LR grid with a
sub-pixel (pixel-shuffle) output over a cubic base.

Kernels 5-3-3, 48 and 24 features: receptive field 9 LR pixels.
"""

from __future__ import annotations

from torch import nn

from .base import SRNet, conv


class SRCNN(SRNet):
    """Three-layer network.

    Parameters
    ----------
    fy, fx
        Upsampling factors along H and W.
    f1, f2
        Feature channels of the first and second layers.
    """

    def __init__(self, fy: int, fx: int, f1: int = 48, f2: int = 24) -> None:
        super().__init__(fy, fx)
        self.body = nn.Sequential(
            conv(1, f1, 5), nn.ReLU(inplace=True),
            conv(f1, f2, 3), nn.ReLU(inplace=True),
            conv(f2, fy * fx, 3),
        )
        self.pad = 4
