"""Shared building blocks: an LR-grid body plus sub-pixel shuffle over an interpolated base."""

from __future__ import annotations

import functools

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


#: Interpolation kernels of :func:`interpolate` and their taps along one axis: torch's cubic
#: (Keys, a = -0.75) and linear, and Lanczos windowed sinc of 3 and 6 lobes (``lanczos3``,
#: ``lanczos6``: the longer window is closer to the ideal sinc interpolation of a band-limited
#: input, e.g. an MR image truncated in k-space).
KERNEL_TAPS: dict[str, int] = {"cubic": 4, "linear": 2, "lanczos3": 6, "lanczos6": 12}
INTERPOLATION_KINDS: tuple[str, ...] = tuple(KERNEL_TAPS)


@functools.lru_cache(maxsize=16)
def lanczos_taps(scale: int, lobes: int) -> tuple[torch.Tensor, int]:
    """Lanczos taps of every output phase of a pixel-centre aligned ``scale``-fold upsampling.

    Output pixel ``i`` lies at input coordinate ``(i + 0.5) / scale - 0.5`` (as torch's
    ``align_corners=False``); phase ``p = i mod scale`` weighs the input pixels ``i // scale +
    k``, ``k = -lobes .. lobes``, with ``sinc(t) sinc(t / lobes)`` normalised to sum 1 (so a
    constant stays constant).

    Returns
    -------
    tuple
        ``(taps (scale, 2 * lobes + 1) float32, lobes)``: row ``p`` holds the weights of the
        input offsets ``-lobes .. lobes``.
    """
    offsets = torch.arange(-lobes, lobes + 1, dtype=torch.float64)
    rows = []
    for p in range(scale):
        t = offsets - ((p + 0.5) / scale - 0.5)
        w = torch.sinc(t) * torch.sinc(t / lobes) * (t.abs() < lobes)
        rows.append(w / w.sum())
    return torch.stack(rows).float(), lobes


def _lanczos_axis(x: torch.Tensor, scale: int, lobes: int, axis: int) -> torch.Tensor:
    """Upsample ``(B, 1, H, W)`` along H (``axis=2``) or W (``axis=3``) by ``scale``."""
    if scale == 1:
        return x
    taps, r = lanczos_taps(scale, lobes)
    taps = taps.to(dtype=x.dtype, device=x.device)
    if axis == 2:
        y = F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), taps[:, None, :, None])
        b, _, h, w = y.shape  # (B, scale, H, W): phase p of output row i * scale + p
        return y.permute(0, 2, 1, 3).reshape(b, 1, h * scale, w)
    y = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), taps[:, None, None, :])
    b, _, h, w = y.shape
    return y.permute(0, 2, 3, 1).reshape(b, 1, h, w * scale)


def interpolate(x: torch.Tensor, fy: int, fx: int, kind: str = "cubic") -> torch.Tensor:
    """Pixel-centre aligned interpolation of ``(B, 1, H, W)`` (:data:`INTERPOLATION_KINDS`).

    Raises
    ------
    ValueError
        Unknown ``kind``.
    """
    if kind.startswith("lanczos") and kind in KERNEL_TAPS:
        lobes = KERNEL_TAPS[kind] // 2
        return _lanczos_axis(_lanczos_axis(x, fy, lobes, 2), fx, lobes, 3)
    if kind not in INTERPOLATION_KINDS:
        raise ValueError(f"unknown interpolation {kind!r}; known: {', '.join(INTERPOLATION_KINDS)}")
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
        One of :data:`INTERPOLATION_KINDS`.
    """

    def __init__(self, fy: int, fx: int, kind: str) -> None:
        super().__init__(fy, fx)
        self.base_kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Interpolate ``(B, 1, H, W)``.

        With ``residual_scale`` alpha != 1 (a kernel other than cubic):
        ``cubic + alpha * (kernel - cubic)``, a blend towards the cubic baseline.
        """
        out = interpolate(x, self.fy, self.fx, self.base_kind)
        if self.residual_scale != 1.0 and self.base_kind != "cubic":
            cubic = interpolate(x, self.fy, self.fx, "cubic")
            out = cubic + self.residual_scale * (out - cubic)
        return out


def lr_convs(model: nn.Module) -> list[nn.Conv2d]:
    """All convolutions of a model's LR-grid body."""
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


def receptive_field(model: SRNet) -> int:
    """Receptive field of the learned body in LR pixels (edge of the square), >= 4 for cubic."""
    convs = [c for c in lr_convs(model) if c.kernel_size[0] > 1]
    rf = 1 + sum(c.kernel_size[0] - 1 for c in convs)
    return max(rf, KERNEL_TAPS[model.base_kind])


def flops_per_output_pixel(model: SRNet) -> float:
    """Multiply-adds x2 per output pixel (body convolutions plus the interpolated base)."""
    macs = sum(c.in_channels * c.out_channels * c.kernel_size[0] * c.kernel_size[1]
               for c in lr_convs(model))
    taps = KERNEL_TAPS[model.base_kind]
    base = 2 * (taps * (model.fy > 1) + taps * (model.fx > 1))
    return 2.0 * macs / (model.fy * model.fx) + base


def parameter_count(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters())
