"""``srgan``: residual generator (same architecture as ``residual``) fine-tuned adversarially.

Training: L1 pre-training (the generator starts from the ``residual`` weights of the same mode and
scale), then relativistic-average GAN fine-tuning against :class:`Discriminator` with an L1
content loss (no pretrained perceptual network: nothing is downloaded).
"""

from __future__ import annotations

import torch
from torch import nn

from .residual import ResidualNet


class SRGANGenerator(ResidualNet):
    """Generator: identical to :class:`~sr_engine.models.residual.ResidualNet`."""


class Discriminator(nn.Module):
    """Small patch discriminator (strided convolutions, LeakyReLU, global average logit).

    Parameters
    ----------
    features
        Channels of the first layer (doubled at each stride).
    """

    def __init__(self, features: int = 16) -> None:
        super().__init__()
        f = features
        self.net = nn.Sequential(
            nn.Conv2d(1, f, 3, 1, 1), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(f, f, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(f, 2 * f, 3, 1, 1), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(2 * f, 2 * f, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(2 * f, 4 * f, 3, 1, 1), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(4 * f, 1, 3, 1, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return one logit per image ``(B,)``."""
        return self.net(x).mean(dim=(1, 2, 3))
