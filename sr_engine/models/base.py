"""Shared building blocks: an LR-grid body plus sub-pixel shuffle over an interpolated base."""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn


def factors_for(mode: str, scale: int) -> tuple[int, int]:
    """Upsampling factors ``(along H, along W)`` of the 2-D planes a model sees.

    Parameters
    ----------
    mode
        ``slice`` (in-plane, both axes) or ``volume`` (H is the slice axis).
    scale
        Integer factor.

    Returns
    -------
    tuple of int
        ``(scale, scale)`` in slice mode, ``(scale, 1)`` in volume mode.
    """
    return (scale, scale) if mode == "slice" else (scale, 1)


def shuffle(x: torch.Tensor, fy: int, fx: int) -> torch.Tensor:
    """Rearrange ``(B, fy*fx, H, W)`` into ``(B, 1, H*fy, W*fx)`` (sub-pixel convolution)."""
    b, _, h, w = x.shape
    x = x.reshape(b, fy, fx, h, w).permute(0, 3, 1, 4, 2)
    return x.reshape(b, 1, h * fy, w * fx)


def interpolate(x: torch.Tensor, fy: int, fx: int, kind: str = "cubic") -> torch.Tensor:
    """Pixel-centre aligned cubic or linear interpolation of ``(B, 1, H, W)``."""
    mode = "bicubic" if kind == "cubic" else "bilinear"
    return F.interpolate(x, scale_factor=(fy, fx), mode=mode, align_corners=False)


def conv(cin: int, cout: int, k: int = 3, same: bool = False) -> nn.Conv2d:
    """Convolution: ``valid`` (input replicate-padded once) or zero-padded ``same`` size."""
    return nn.Conv2d(cin, cout, k, padding=k // 2 if same else 0)


class SRNet(nn.Module):
    """Base class: ``output = interpolate(x) + shuffle(crop(body(replicate_pad(x))))``.

    Subclasses set ``self.body`` producing ``fy*fx`` channels on the LR grid and ``self.pad``:
    the input is replicate-padded once by ``pad`` pixels (cheaper than padding every layer) and
    the body output is centre-cropped back to the input size.  ``residual_scale`` (default 1)
    multiplies the learned residual: ``interpolate(x) + alpha * shuffle(...)``, a shrinkage
    towards the interpolation baseline (``sr_engine.models.split_group``).

    Parameters
    ----------
    fy, fx
        Upsampling factors along H and W.
    """

    base_kind: str = "cubic"

    def __init__(self, fy: int, fx: int) -> None:
        super().__init__()
        self.fy, self.fx = fy, fx
        self.pad = 0
        self.residual_scale = 1.0
        self.body: nn.Module = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Upsample ``(B, 1, H, W)`` to ``(B, 1, H*fy, W*fx)``."""
        base = interpolate(x, self.fy, self.fx, self.base_kind)
        h, w = x.shape[-2:]
        p = self.pad
        y = self.body(F.pad(x, (p, p, p, p), mode="replicate") if p else x)
        dy, dx = (y.shape[-2] - h) // 2, (y.shape[-1] - w) // 2
        y = y[..., dy:dy + h, dx:dx + w]
        if self.residual_scale != 1.0:
            y = y * self.residual_scale
        return base + shuffle(y, self.fy, self.fx)


class InterpolationNet(SRNet):
    """Parameter-free baseline: cubic or linear interpolation only.

    Parameters
    ----------
    fy, fx
        Upsampling factors.
    kind
        ``cubic`` or ``linear``.
    """

    def __init__(self, fy: int, fx: int, kind: str) -> None:
        super().__init__(fy, fx)
        self.base_kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Interpolate ``(B, 1, H, W)``."""
        return interpolate(x, self.fy, self.fx, self.base_kind)


def lr_convs(model: nn.Module) -> list[nn.Conv2d]:
    """All convolutions of a model's LR-grid body."""
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


def receptive_field(model: SRNet) -> int:
    """Receptive field of the learned body in LR pixels (edge of the square), >= 4 for cubic."""
    convs = [c for c in lr_convs(model) if c.kernel_size[0] > 1]
    rf = 1 + sum(c.kernel_size[0] - 1 for c in convs)
    return max(rf, 4 if model.base_kind == "cubic" else 2)


def flops_per_output_pixel(model: SRNet) -> float:
    """Multiply-adds x2 per output pixel (body convolutions plus the interpolated base)."""
    macs = sum(c.in_channels * c.out_channels * c.kernel_size[0] * c.kernel_size[1]
               for c in lr_convs(model))
    taps = 4 if model.base_kind == "cubic" else 2
    base = 2 * (taps * (model.fy > 1) + taps * (model.fx > 1))
    return 2.0 * macs / (model.fy * model.fx) + base


def parameter_count(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters())
