"""Sliding-window inference over a 3D volume with Gaussian or constant blending.

Windows are placed, weighted and stitched as MONAI's ``sliding_window_inference`` places,
weights and stitches them (same window starts, same Gaussian importance map with
``sigma = sigma_scale * patch``, the same padding of volumes smaller than the patch), so a model
gives the same output through either. The differences are in the bookkeeping: the weight map
and the sum of weights per voxel are computed once per volume shape, windows are gathered into
one preallocated batch buffer, and everything runs under ``torch.inference_mode``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Literal

import torch
import torch.nn.functional as F

__all__ = ["gaussian_importance_map", "sliding_window", "window_starts"]

Predictor = Callable[[torch.Tensor], torch.Tensor]


def window_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Start indices of windows of ``patch`` voxels covering ``size`` voxels (``size >= patch``).

    The step is ``int(patch * (1 - overlap))`` (at least 1); the last window is shifted back so
    it ends at the volume's edge.
    """
    if patch >= size:
        return [0]
    step = max(int(patch * (1 - overlap)), 1)
    count = next(d for d in range(math.ceil(size / step)) if d * step + patch >= size) + 1
    return [min(d * step, size - patch) for d in range(count)]


def gaussian_importance_map(
    patch_size: Sequence[int], sigma_scale: float = 0.125, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Separable Gaussian weights over a patch (sigma = ``sigma_scale`` * side, in voxels),
    floored at ``max(min, 1e-3)`` so that corner voxels keep a non-zero weight."""
    weights: torch.Tensor | None = None
    for side in patch_size:
        sigma = side * sigma_scale
        x = torch.arange(-(side - 1) / 2.0, (side - 1) / 2.0 + 1, dtype=torch.float, device=device)
        g = torch.exp(x**2 / (-2 * sigma**2))
        weights = g if weights is None else weights.unsqueeze(-1) * g
    assert weights is not None
    floor = max(float(weights.min()), 1e-3)
    return weights.clamp_(min=floor)


@lru_cache(maxsize=8)
def _weights(
    patch: tuple[int, ...],
    padded: tuple[int, ...],
    overlap: float,
    blending: str,
    sigma_scale: float,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, list[tuple[slice, ...]]]:
    """Window slices, the per-window weight map and the per-voxel sum of weights.

    Cached: a worker sees the same patch and volume shapes over and over.
    """
    starts = [window_starts(s, p, overlap) for s, p in zip(padded, patch, strict=True)]
    windows = [
        tuple(slice(s, s + p) for s, p in zip(corner, patch, strict=True))
        for corner in itertools.product(*starts)
    ]
    if blending == "gaussian":
        weight = gaussian_importance_map(patch, sigma_scale, device)
    else:
        weight = torch.ones(patch, dtype=torch.float, device=device)
    total = torch.zeros(padded, dtype=torch.float, device=device)
    for window in windows:
        total[window] += weight
    return weight, total, windows


def sliding_window(
    volume: torch.Tensor,
    predictor: Predictor,
    patch_size: Sequence[int],
    overlap: float = 0.5,
    blending: Literal["gaussian", "constant"] = "gaussian",
    batch_size: int = 1,
    device: torch.device | str | None = None,
    *,
    output_device: torch.device | str | None = None,
    sigma_scale: float = 0.125,
) -> torch.Tensor:
    """Run ``predictor`` over overlapping windows of ``volume`` and blend the outputs.

    ``volume`` is ``(N, C, D, H, W)``; the result is ``(N, K, D, H, W)`` float32 where ``K`` is
    the predictor's channel count. ``patch_size`` and ``overlap`` (a fraction of the patch,
    ``0 <= overlap < 1``) are in voxels per spatial axis; a volume smaller than the patch along
    an axis is zero-padded symmetrically and the output cropped back. ``batch_size`` windows go
    to the predictor at once, on ``device`` (default: the volume's device); the blended output
    accumulates on ``output_device`` (default: the volume's device). The predictor must return
    one tensor with the window's spatial size.
    """
    if volume.ndim != 5:
        raise ValueError(f"volume must be (N, C, D, H, W), got shape {tuple(volume.shape)}")
    patch = tuple(int(p) for p in patch_size)
    if len(patch) != 3 or min(patch) < 1:
        raise ValueError(f"patch_size must be three positive sizes, got {tuple(patch_size)}")
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if blending not in ("gaussian", "constant"):
        raise ValueError(f"blending must be gaussian or constant, got {blending!r}")
    run_device = torch.device(device) if device is not None else volume.device
    out_device = torch.device(output_device) if output_device is not None else volume.device

    with torch.inference_mode():
        return _sliding_window(
            volume, predictor, patch, overlap, blending, batch_size, run_device, out_device,
            sigma_scale,
        )  # fmt: skip


def _sliding_window(
    volume: torch.Tensor,
    predictor: Predictor,
    patch: tuple[int, ...],
    overlap: float,
    blending: str,
    batch_size: int,
    run_device: torch.device,
    out_device: torch.device,
    sigma_scale: float,
) -> torch.Tensor:
    n, channels, *size = volume.shape
    volume = volume.float()
    # Pad (last axis first, as F.pad wants) so that every axis holds at least one patch.
    pad: list[int] = []
    for s, p in zip(reversed(size), reversed(patch), strict=True):
        diff = max(p - s, 0)
        pad += [diff // 2, diff - diff // 2]
    if any(pad):
        volume = F.pad(volume, pad)
    padded = tuple(volume.shape[2:])

    weight, total, windows = _weights(patch, padded, overlap, blending, sigma_scale, out_device)
    weight_run = weight.to(run_device)
    jobs = [(b, w) for b in range(n) for w in windows]
    buffer = torch.empty((min(batch_size, len(jobs)), channels, *patch), device=run_device)
    output: torch.Tensor | None = None
    for first in range(0, len(jobs), batch_size):
        chunk = jobs[first : first + batch_size]
        batch = buffer[: len(chunk)]
        for i, (b, window) in enumerate(chunk):
            batch[i].copy_(volume[b][(slice(None), *window)])
        pred = predictor(batch)
        if pred.ndim != 5 or pred.shape[0] != len(chunk) or tuple(pred.shape[2:]) != patch:
            raise ValueError(
                f"predictor returned shape {tuple(pred.shape)} for windows of shape "
                f"{tuple(batch.shape)}; it must keep the batch and spatial sizes"
            )
        # Multiply, then add, as MONAI does (a fused multiply-add would round differently).
        pred = pred.float()
        if output is None:
            output = torch.zeros((n, pred.shape[1], *padded), device=out_device)
            product = torch.empty((buffer.shape[0], *pred.shape[1:]), device=run_device)
        weighted = torch.mul(pred, weight_run, out=product[: len(chunk)]).to(out_device)
        for i, (b, window) in enumerate(chunk):
            output[b][(slice(None), *window)] += weighted[i]
    assert output is not None
    output /= total
    if any(pad):
        crop = [slice(None), slice(None)]
        for axis, s in enumerate(size):
            before = pad[2 * (2 - axis)]
            crop.append(slice(before, before + s))
        output = output[tuple(crop)].contiguous()
    return output
