"""``residual``: EDSR-style residual blocks without batch normalisation.

Head conv, ``blocks`` x (conv-ReLU-conv, scaled local skip), body conv with a long skip, sub-pixel
tail, plus the global skip over the cubic-interpolated base.  Default 24 features, 4 blocks:
receptive field 1 + 2*(2 + 2*4) = 21 LR pixels.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import SRNet, conv


class ResBlock(nn.Module):
    """conv-ReLU-conv with a scaled identity skip.

    Parameters
    ----------
    features
        Channels.
    res_scale
        Multiplier of the residual branch.
    """

    def __init__(self, features: int, res_scale: float = 0.2) -> None:
        super().__init__()
        self.branch = nn.Sequential(conv(features, features, same=True), nn.ReLU(inplace=True),
                                    conv(features, features, same=True))
        self.res_scale = res_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block."""
        return x + self.res_scale * self.branch(x)


class ResidualBody(nn.Module):
    """Head, residual blocks with a long skip, and a sub-pixel tail.

    Parameters
    ----------
    out_channels
        ``fy*fx`` sub-pixel channels.
    features, blocks
        Width and depth.
    """

    def __init__(self, out_channels: int, features: int = 24, blocks: int = 4) -> None:
        super().__init__()
        self.head = conv(1, features, same=True)
        self.blocks = nn.Sequential(*[ResBlock(features) for _ in range(blocks)])
        self.mid = conv(features, features, same=True)
        self.tail = conv(features, out_channels, same=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the body."""
        h = self.head(x)
        return self.tail(h + self.mid(self.blocks(h)))


class ResidualNet(SRNet):
    """EDSR-style network on the LR grid.

    Parameters
    ----------
    fy, fx
        Upsampling factors along H and W.
    features, blocks
        Width and depth.
    """

    def __init__(self, fy: int, fx: int, features: int = 24, blocks: int = 4) -> None:
        super().__init__(fy, fx)
        self.body = ResidualBody(fy * fx, features, blocks)
        self.pad = 4
