"""Video quality metrics in numpy: PSNR, SSIM, temporal flicker. No torch, no scipy.

SSIM follows Wang et al. (2004): an 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03,
on 8-bit values (data range 255), averaged over channels and frames.
"""

from __future__ import annotations

import math

import numpy as np


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    mse = float(((a - b) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(data_range**2 / mse)


def _gaussian(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    x = np.arange(size) - (size - 1) / 2
    g = np.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def _filter(img: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Separable 'valid' filtering over the last two axes."""
    k = len(w)
    h = img.shape[-2] - k + 1
    v = img.shape[-1] - k + 1
    rows = sum(w[i] * img[..., i : i + h, :] for i in range(k))
    return sum(w[j] * rows[..., :, j : j + v] for j in range(k))


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> float:
    """Mean SSIM of two images or videos with channels last: [..., H, W, C] (C may be absent)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"SSIM needs equal shapes, got {a.shape} and {b.shape}")
    if a.ndim >= 3 and a.shape[-1] in (1, 3, 4):
        a = np.moveaxis(a, -1, -3)
        b = np.moveaxis(b, -1, -3)
    w = _gaussian()
    if min(a.shape[-2:]) < len(w):
        w = _gaussian(size=min(a.shape[-2:]) | 1, sigma=1.5)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = _filter(a, w), _filter(b, w)
    saa = _filter(a * a, w) - mu_a**2
    sbb = _filter(b * b, w) - mu_b**2
    sab = _filter(a * b, w) - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * sab + c2)
    den = (mu_a**2 + mu_b**2 + c1) * (saa + sbb + c2)
    return float((num / den).mean())


def video_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of two uint8 videos [F, H, W, 3], averaged over frames."""
    return float(np.mean([ssim(x, y) for x, y in zip(a, b)]))


def flicker(video: np.ndarray) -> float:
    """Temporal flicker: mean absolute change between consecutive frames, in 8-bit levels.

    Lower is steadier. A smooth moving object scores low; frames that jump or shimmer high.
    """
    v = np.asarray(video, dtype=np.float64)
    if len(v) < 2:
        return 0.0
    return float(np.abs(np.diff(v, axis=0)).mean())
