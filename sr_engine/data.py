"""Training data: scikit-image's bundled natural images and our own synthetic phantoms.

Nothing here reads medical images shipped by any package (pydicom, pydicom-data, nilearn):
those are evaluation data only.  All images are returned in network units (roughly [0, 1]):
CT phantoms through the fixed HU mapping of :mod:`sr_engine.normalise`.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from .normalise import CT_OFFSET_HU, CT_SCALE_HU

# Natural / synthetic images only (CC0 or public domain per skimage.data docstrings); the
# biomedical skimage images (retina, cell, ihc, microaneurysms) are deliberately left out.
NATURAL_IMAGES = ("astronaut", "brick", "camera", "chelsea", "clock", "coffee", "coins", "grass",
                  "gravel", "horse", "hubble_deep_field", "moon", "page", "rocket", "text")


def natural_images() -> list[np.ndarray]:
    """Grey natural images from ``skimage.data`` as float32 in [0, 1]."""
    import skimage.data
    from skimage.color import rgb2gray

    out = []
    for name in NATURAL_IMAGES:
        img = np.asarray(getattr(skimage.data, name)())
        if img.ndim == 3:
            img = rgb2gray(img[..., :3])
        img = img.astype(np.float32)
        if img.max() > 1.5:
            img = img / 255.0
        out.append(img.astype(np.float32))
    return out


def _ellipse(shape: tuple[int, int], cy: float, cx: float, ry: float, rx: float,
             angle: float) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(np.float32)
    c, s = np.cos(angle), np.sin(angle)
    u = ((xx - cx) * c + (yy - cy) * s) / rx
    v = (-(xx - cx) * s + (yy - cy) * c) / ry
    return u * u + v * v <= 1.0


def _texture(shape: tuple[int, int], rng: np.random.Generator, scale: float) -> np.ndarray:
    t = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), scale)
    return t / (t.std() + 1e-6)


def ct_phantom(size: int, rng: np.random.Generator) -> np.ndarray:
    """CT-like slice in HU.

    Air, fat/soft tissue body with texture, lungs with vessels, bones, small calcifications,
    noise.

    Parameters
    ----------
    size
        Edge length in pixels.
    rng
        Random generator.

    Returns
    -------
    numpy.ndarray
        float32 ``(size, size)`` in HU.
    """
    shape = (size, size)
    img = np.full(shape, -1000.0, dtype=np.float32)
    c = size / 2
    ry, rx = size * rng.uniform(0.3, 0.45), size * rng.uniform(0.35, 0.48)
    body = _ellipse(shape, c, c, ry, rx, rng.uniform(-0.2, 0.2))
    img[body] = -100 + 10 * rng.standard_normal()
    inner = _ellipse(shape, c, c, ry * 0.85, rx * 0.85, 0.0)
    img[inner] = 40 + 15 * _texture(shape, rng, rng.uniform(1, 4))[inner]
    if rng.random() < 0.6:
        for side in (-1, 1):
            lung = _ellipse(shape, c - 0.05 * size, c + side * rx * 0.45, ry * 0.6, rx * 0.3,
                            rng.uniform(-0.3, 0.3))
            vessels = np.clip(_texture(shape, rng, 1.5), 1.2, None) - 1.2
            img[lung] = (-850 + 600 * vessels)[lung]
    for _ in range(rng.integers(3, 12)):
        e = _ellipse(shape, rng.uniform(0.25, 0.75) * size, rng.uniform(0.25, 0.75) * size,
                     rng.uniform(2, size * 0.12), rng.uniform(2, size * 0.12),
                     rng.uniform(0, np.pi))
        val = rng.choice([rng.uniform(-120, 120), rng.uniform(300, 1800)])
        if val > 250 and rng.random() < 0.5:
            ring = e & ~ndimage.binary_erosion(e, iterations=int(rng.integers(1, 4)))
            img[ring] = val
            img[e & ~ring] = rng.uniform(100, 400)
        else:
            img[e] = val
    for _ in range(rng.integers(0, 15)):
        y, x = rng.integers(0, size, 2)
        img[y, x] = rng.uniform(200, 1500)
    img = ndimage.gaussian_filter(img, rng.uniform(0.0, 0.8))
    img += rng.uniform(0, 20) * rng.standard_normal(shape).astype(np.float32)
    return img.astype(np.float32)


def mr_phantom(size: int, rng: np.random.Generator) -> np.ndarray:
    """MR-like slice in [0, ~1]: head-like ellipses, grey/white texture, bias field, noise.

    Parameters
    ----------
    size
        Edge length in pixels.
    rng
        Random generator.

    Returns
    -------
    numpy.ndarray
        float32 ``(size, size)``.
    """
    shape = (size, size)
    img = np.zeros(shape, dtype=np.float32)
    c = size / 2
    ry, rx = size * rng.uniform(0.35, 0.46), size * rng.uniform(0.3, 0.42)
    img[_ellipse(shape, c, c, ry, rx, 0.0)] = rng.uniform(0.5, 0.9)
    brain = _ellipse(shape, c, c, ry * 0.88, rx * 0.88, 0.0)
    folds = _texture(shape, rng, rng.uniform(1.5, 3.5))
    img[brain] = np.where(folds > 0, 0.45, 0.7)[brain] + 0.03 * folds[brain]
    for _ in range(rng.integers(2, 8)):
        e = _ellipse(shape, rng.uniform(0.3, 0.7) * size, rng.uniform(0.3, 0.7) * size,
                     rng.uniform(2, size * 0.1), rng.uniform(2, size * 0.1), rng.uniform(0, np.pi))
        img[e] = rng.uniform(0.05, 1.0)
    yy, xx = np.mgrid[: size, : size] / size
    bias = 1 + 0.2 * (rng.uniform(-1, 1) * yy + rng.uniform(-1, 1) * xx)
    img = ndimage.gaussian_filter(img * bias, rng.uniform(0.0, 0.8)).astype(np.float32)
    noise = rng.uniform(0, 0.02)
    re = img + noise * rng.standard_normal(shape)
    im = noise * rng.standard_normal(shape)
    return np.sqrt(re * re + im * im).astype(np.float32)


def training_pool(seed: int, phantoms: int = 24, size: int = 192) -> list[np.ndarray]:
    """All HR training images in network units.

    Parameters
    ----------
    seed
        Seed of the phantom generator.
    phantoms
        Number of CT and of MR phantoms.
    size
        Phantom edge length.

    Returns
    -------
    list of numpy.ndarray
        Natural images (random gain applied later) then CT and MR phantoms.
    """
    rng = np.random.default_rng(seed)
    pool = natural_images()
    for _ in range(phantoms):
        pool.append((ct_phantom(size, rng) + CT_OFFSET_HU) / CT_SCALE_HU)
        pool.append(mr_phantom(size, rng))
    return [p.astype(np.float32) for p in pool]


class PatchSampler:
    """Random HR patches with flips, 90-degree rotations and (natural images) random gain.

    Parameters
    ----------
    pool
        HR images in network units.
    patch_hw
        HR patch ``(height, width)``.
    seed
        Seed of the sampler.
    natural_count
        How many leading images of ``pool`` are natural images (get a random gain/offset).
    hr_blur
        Probability of blurring a HR patch with a Gaussian (sigma 0.3-1.2 px) first: real
        scans are band-limited, so the model must not sharpen beyond what the LR supports.
    hr_bandlimit
        When set, every HR patch is band-limited to this fraction of its Nyquist frequency
        (zero-filled spectrum, no window), e.g. ``1 / scale``: the LR then holds all of it.
    hr_smooth
        Probability of making a HR patch smooth at its own resolution instead
        (:func:`sr_engine.degrade.random_smooth_hr`: zero-filled spectra with or without a
        window, soft kernels, acquisition noise), so that a model sees "smooth HR + sharp
        degradation" as well as "sharp HR + blur".
    """

    def __init__(self, pool: list[np.ndarray], patch_hw: tuple[int, int], seed: int,
                 natural_count: int = len(NATURAL_IMAGES), hr_blur: float = 0.0,
                 hr_smooth: float = 0.0, hr_bandlimit: float | None = None) -> None:
        self.pool = [p for p in pool if p.shape[0] >= max(patch_hw) and p.shape[1] >= max(patch_hw)]
        self.patch_hw = patch_hw
        self.rng = np.random.default_rng(seed)
        self.natural_count = natural_count
        self.hr_blur = hr_blur
        self.hr_smooth = hr_smooth
        self.hr_bandlimit = hr_bandlimit

    def sample(self, batch: int) -> torch.Tensor:
        """Return ``(batch, 1, H, W)`` float32 HR patches."""
        ph, pw = self.patch_hw
        out = np.empty((batch, 1, ph, pw), dtype=np.float32)
        for b in range(batch):
            k = int(self.rng.integers(len(self.pool)))
            img = self.pool[k]
            if ph != pw and self.rng.random() < 0.5:
                img = img.T
            y = int(self.rng.integers(0, img.shape[0] - ph + 1))
            x = int(self.rng.integers(0, img.shape[1] - pw + 1))
            p = img[y:y + ph, x:x + pw]
            if ph == pw:
                p = np.rot90(p, int(self.rng.integers(4)))
            if self.rng.random() < 0.5:
                p = p[:, ::-1]
            if self.rng.random() < 0.5:
                p = p[::-1]
            if k < self.natural_count:
                p = p * self.rng.uniform(0.3, 1.0) + self.rng.uniform(0.0, 0.3)
            if self.hr_bandlimit:
                from .degrade import smooth_hr

                p = smooth_hr(np.ascontiguousarray(p), "zerofill", self.hr_bandlimit)
            elif self.hr_smooth and self.rng.random() < self.hr_smooth:
                from .degrade import random_smooth_hr

                p = random_smooth_hr(np.ascontiguousarray(p), self.rng)
            elif self.hr_blur and self.rng.random() < self.hr_blur:
                p = ndimage.gaussian_filter(p, self.rng.uniform(0.3, 1.2), mode="reflect")
            out[b, 0] = p
        return torch.from_numpy(out)


# --- 3-D phantoms: held-out validation volumes (never used by training) ----------------------

def _ellipsoid(shape: tuple[int, int, int], centre: tuple[float, float, float],
               radii: tuple[float, float, float], angle: float = 0.0) -> np.ndarray:
    """Boolean ellipsoid in a ``(z, y, x)`` grid, rotated by ``angle`` about the z axis."""
    zz, yy, xx = (np.arange(n, dtype=np.float32) for n in shape)
    zz, yy, xx = zz[:, None, None], yy[None, :, None], xx[None, None, :]
    c, s = np.cos(angle), np.sin(angle)
    u = ((xx - centre[2]) * c + (yy - centre[1]) * s) / radii[2]
    v = (-(xx - centre[2]) * s + (yy - centre[1]) * c) / radii[1]
    w = (zz - centre[0]) / radii[0]
    return u * u + v * v + w * w <= 1.0


def _texture3d(shape: tuple[int, int, int], rng: np.random.Generator,
               scale: float) -> np.ndarray:
    t = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), scale)
    return t / (t.std() + 1e-6)


def ct_phantom_volume(shape: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    """CT-like 3-D volume in HU (isotropic voxels), for validation.

    A body whose cross-section varies along z, textured soft tissue, lungs with branching
    vessel-like structures, a spine-like bone column, rib-like bone rings, organs as rotated
    ellipsoids, calcifications, a mild scanner blur and noise.

    Parameters
    ----------
    shape
        ``(z, y, x)`` in voxels.
    rng
        Random generator.

    Returns
    -------
    numpy.ndarray
        float32 ``shape`` in HU.
    """
    nz, ny, nx = shape
    img = np.full(shape, -1000.0, dtype=np.float32)
    zz = np.arange(nz, dtype=np.float32)[:, None, None] / max(nz - 1, 1)
    yy = np.arange(ny, dtype=np.float32)[None, :, None]
    xx = np.arange(nx, dtype=np.float32)[None, None, :]
    ry = ny * (rng.uniform(0.3, 0.42) + 0.04 * np.sin(2 * np.pi * zz * rng.uniform(0.5, 1.5)))
    rx = nx * (rng.uniform(0.36, 0.46) + 0.03 * np.cos(2 * np.pi * zz * rng.uniform(0.5, 1.5)))
    cy, cx = ny / 2, nx / 2
    r2 = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
    body = r2 <= 1.0
    inner = r2 <= 0.85**2
    img[body] = -100 + 10 * rng.standard_normal()
    tissue = 40 + 15 * _texture3d(shape, rng, rng.uniform(1.0, 3.0))
    img[inner] = tissue[inner]
    if rng.random() < 0.7:
        vessels = np.clip(_texture3d(shape, rng, rng.uniform(1.2, 2.0)), 1.3, None) - 1.3
        for side in (-1, 1):
            lung = (((yy - (cy - 0.05 * ny)) / (0.6 * ry)) ** 2
                    + ((xx - (cx + side * 0.45 * rx)) / (0.3 * rx)) ** 2
                    + ((zz - 0.5) / rng.uniform(0.5, 0.8)) ** 2) <= 1.0
            img[lung] = (-850 + 700 * vessels)[lung]
    spine = ((yy - (cy + 0.7 * ry)) ** 2 + (xx - cx) ** 2) <= (0.12 * ry) ** 2
    spine = spine & inner
    img[spine] = rng.uniform(300, 700)
    for _ in range(int(rng.integers(4, 10))):
        centre = (rng.uniform(0.2, 0.8) * nz, rng.uniform(0.3, 0.7) * ny,
                  rng.uniform(0.3, 0.7) * nx)
        radii = (rng.uniform(2, nz * 0.3), rng.uniform(2, ny * 0.12), rng.uniform(2, nx * 0.12))
        e = _ellipsoid(shape, centre, radii, rng.uniform(0, np.pi))
        val = rng.choice([rng.uniform(-120, 120), rng.uniform(300, 1800)])
        if val > 250 and rng.random() < 0.5:
            ring = e & ~ndimage.binary_erosion(e, iterations=int(rng.integers(1, 3)))
            img[ring] = val
            img[e & ~ring] = rng.uniform(100, 400)
        else:
            img[e] = val
    for _ in range(int(rng.integers(0, 20))):
        z, y, x = (int(rng.integers(0, n)) for n in shape)
        img[z, y, x] = rng.uniform(200, 1500)
    img = ndimage.gaussian_filter(img, rng.uniform(0.4, 1.0))
    img += rng.uniform(0, 15) * rng.standard_normal(shape).astype(np.float32)
    return img.astype(np.float32)


def mr_phantom_volume(shape: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    """MR-like 3-D head volume (T1-like contrast, isotropic voxels), for validation.

    Scalp and skull shells, a brain with folded grey/white texture, ventricles, a few lesions,
    a smooth bias field, a mild blur and Rician noise.

    Parameters
    ----------
    shape
        ``(z, y, x)`` in voxels.
    rng
        Random generator.

    Returns
    -------
    numpy.ndarray
        float32 ``shape``, roughly in [0, 1].
    """
    nz, ny, nx = shape
    centre = (nz / 2, ny / 2, nx / 2)
    radii = (nz * rng.uniform(0.4, 0.47), ny * rng.uniform(0.38, 0.46), nx * rng.uniform(0.32, 0.4))
    img = np.zeros(shape, dtype=np.float32)
    img[_ellipsoid(shape, centre, radii)] = rng.uniform(0.5, 0.9)  # scalp
    img[_ellipsoid(shape, centre, tuple(r * 0.93 for r in radii))] = rng.uniform(0.05, 0.15)
    brain = _ellipsoid(shape, centre, tuple(r * 0.86 for r in radii))
    folds = _texture3d(shape, rng, rng.uniform(1.5, 3.0))
    img[brain] = np.where(folds > rng.uniform(-0.3, 0.3), 0.45, 0.72)[brain] + 0.03 * folds[brain]
    for side in (-1, 1):
        vent = _ellipsoid(shape, (centre[0], centre[1] - 0.05 * ny, centre[2] + side * 0.06 * nx),
                          (radii[0] * 0.25, radii[1] * 0.35, radii[2] * 0.08),
                          rng.uniform(-0.2, 0.2))
        img[vent] = rng.uniform(0.05, 0.2)
    for _ in range(int(rng.integers(2, 8))):
        c = (rng.uniform(0.3, 0.7) * nz, rng.uniform(0.3, 0.7) * ny, rng.uniform(0.3, 0.7) * nx)
        r = (rng.uniform(1.5, nz * 0.08), rng.uniform(1.5, ny * 0.08), rng.uniform(1.5, nx * 0.08))
        img[_ellipsoid(shape, c, r, rng.uniform(0, np.pi))] = rng.uniform(0.05, 1.0)
    g = [np.linspace(-1, 1, n, dtype=np.float32) for n in shape]
    bias = (1 + 0.15 * (rng.uniform(-1, 1) * g[0][:, None, None] + rng.uniform(-1, 1)
                        * g[1][None, :, None] + rng.uniform(-1, 1) * g[2][None, None, :]))
    img = ndimage.gaussian_filter(img * bias, rng.uniform(0.5, 1.0)).astype(np.float32)
    noise = rng.uniform(0.0, 0.015)
    re = img + noise * rng.standard_normal(shape).astype(np.float32)
    im = noise * rng.standard_normal(shape).astype(np.float32)
    return np.sqrt(re * re + im * im).astype(np.float32)


VALIDATION_SEED = 20261125  # disjoint from the training seeds (0, 1, 2, ...) and their streams


def validation_volumes(count: int = 3, shape: tuple[int, int, int] = (96, 128, 128),
                       seed: int = VALIDATION_SEED
                       ) -> list[tuple[str, np.ndarray, tuple[float, float, float], str]]:
    """Held-out 3-D validation cases: ``count`` CT-like and ``count`` MR-like phantom volumes.

    Training never uses 3-D phantoms (it samples 2-D images from :func:`training_pool`), and
    the seed is disjoint from the training seeds, so these volumes are unseen.  They are used
    to take training and inference decisions without looking at the public benchmark.

    Parameters
    ----------
    count
        Number of CT and of MR volumes.
    shape
        ``(z, y, x)`` voxels (1 mm isotropic).
    seed
        Generator seed.

    Returns
    -------
    list of tuple
        ``(name, volume (z, y, x) in modality units, spacing (1, 1, 1), modality)``.
    """
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(count):
        cases.append((f"val_ct_{i}", ct_phantom_volume(shape, rng), (1.0, 1.0, 1.0), "CT"))
        cases.append((f"val_mr_{i}", 1000.0 * mr_phantom_volume(shape, rng), (1.0, 1.0, 1.0),
                      "MR"))
    return cases
