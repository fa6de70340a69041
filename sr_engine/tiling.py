"""Run a 2-D upsampling network over planes of any size within a memory budget.

Large planes are cut into overlapping LR tiles of at most ``tile_size`` pixels.  Each tile's
outputs are weighted by a ramp that is exactly zero within ``margin`` LR pixels of an inner tile
edge (where the network's receptive field would see padding) and rises linearly over the rest
of the overlap, so the blended result equals a single full pass up to float rounding whenever
``margin`` covers the receptive-field radius.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start indices of tiles covering ``[0, length)`` (last tile flush with the end)."""
    if length <= tile:
        return [0]
    step = max(1, tile - overlap)
    starts = list(range(0, length - tile, step))
    starts.append(length - tile)
    return starts


def ramp(start: int, size: int, length: int, overlap: int, margin: int) -> np.ndarray:
    """Blend weights of one tile along one axis (LR pixels)."""
    w = np.ones(size, dtype=np.float64)
    width = max(overlap - 2 * margin, 1)
    u = np.arange(size, dtype=np.float64)
    if start > 0:
        w = np.minimum(w, np.clip((u - margin + 1) / width, 0.0, 1.0))
    if start + size < length:
        v = size - 1 - u
        w = np.minimum(w, np.clip((v - margin + 1) / width, 0.0, 1.0))
    return w


#: Reduced-precision dtype of the mixed-precision path per device type: float16 on CUDA (the
#: production path); bfloat16 on the CPU, where autocast has no float16 kernels. The CPU entry is
#: the stand-in that lets the tests run the same mixed-precision code path on a GPU-less machine.
AMP_DTYPE: dict[str, torch.dtype] = {"cuda": torch.float16, "cpu": torch.bfloat16}


def amp_context(device: str, amp: bool) -> contextlib.AbstractContextManager[object]:
    """Autocast for ``device`` when ``amp`` is set, else a no-op context.

    Parameters
    ----------
    device
        ``cpu`` or ``cuda`` (a ``cuda:N`` index is accepted).
    amp
        Whether to run the network in reduced precision.

    Returns
    -------
    contextlib.AbstractContextManager
        The context to run the forward pass in.
    """
    kind = torch.device(device).type
    if not amp or kind not in AMP_DTYPE:
        return contextlib.nullcontext()
    return torch.autocast(kind, dtype=AMP_DTYPE[kind])


def _chunks(n: int, size: int) -> Iterator[slice]:
    for i in range(0, n, max(1, size)):
        yield slice(i, min(n, i + max(1, size)))


def upsample_planes(model: nn.Module, planes: np.ndarray, fy: int, fx: int, *, device: str,
                    batch_size: int, tile_size: int, tile_overlap: int, margin: int,
                    amp: bool = False) -> tuple[np.ndarray, int]:
    """Upsample ``(P, H, W)`` float32 planes to ``(P, H*fy, W*fx)``.

    Parameters
    ----------
    model
        Network mapping ``(B, 1, h, w)`` to ``(B, 1, h*fy, w*fx)``, already on ``device``.
    planes
        LR planes in network units.
    fy, fx
        Upsampling factors.
    device
        ``cpu`` or ``cuda``.
    batch_size
        Tiles per forward pass.
    tile_size, tile_overlap
        Largest LR tile edge and overlap between tiles; the overlap is raised to
        ``2 * margin + 2`` where it is smaller, so that every output pixel has a tile whose
        receptive field saw no padding (tiled output equals a single pass).
    margin
        LR pixels next to inner tile edges that get zero weight (the receptive-field radius).
    amp
        Run the network under autocast (:data:`AMP_DTYPE`: float16 on CUDA); the output is
        accumulated in float32.

    Returns
    -------
    tuple
        ``(output planes, number of tiles per plane)``.
    """
    p, h, w = planes.shape
    margin = max(0, margin)
    tile_overlap = max(tile_overlap, 2 * margin + 2)
    tile_size = max(tile_size, 2 * tile_overlap + 1, 8)
    ys = tile_starts(h, tile_size, tile_overlap)
    xs = tile_starts(w, tile_size, tile_overlap)
    th, tw = min(h, tile_size), min(w, tile_size)
    out = np.zeros((p, h * fy, w * fx), dtype=np.float32)
    norm = np.zeros((h * fy, w * fx), dtype=np.float64)
    tiles = [(y0, x0) for y0 in ys for x0 in xs]
    weights = []
    for y0, x0 in tiles:
        wy = np.repeat(ramp(y0, th, h, tile_overlap, margin), fy)
        wx = np.repeat(ramp(x0, tw, w, tile_overlap, margin), fx)
        wt = np.outer(wy, wx)
        norm[y0 * fy:(y0 + th) * fy, x0 * fx:(x0 + tw) * fx] += wt
        weights.append(wt.astype(np.float32))
    single = len(tiles) == 1
    jobs = [(i, t) for i in range(p) for t in range(len(tiles))]
    with torch.inference_mode():
        for chunk in _chunks(len(jobs), batch_size):
            batch = np.stack([planes[i, y0:y0 + th, x0:x0 + tw]
                              for i, t in jobs[chunk] for y0, x0 in [tiles[t]]])
            x = torch.from_numpy(np.ascontiguousarray(batch)).unsqueeze(1).to(device)
            x = x.contiguous(memory_format=torch.channels_last)
            with amp_context(device, amp):
                y = model(x)
            y = y.float().squeeze(1).cpu().numpy()
            for (i, t), tile in zip(jobs[chunk], y, strict=True):
                y0, x0 = tiles[t]
                sl = (i, slice(y0 * fy, (y0 + th) * fy), slice(x0 * fx, (x0 + tw) * fx))
                if single:
                    out[sl] = tile
                else:
                    out[sl] += tile * weights[t]
    if not single:
        out /= norm.astype(np.float32)[None]
    return out, len(tiles)
