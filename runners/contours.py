"""Planar contours of label slices, image-plane geometry and even-odd rasterisation.

The geometry follows PS3.3 C.7.6.2.1.1: the patient position of the pixel in row ``i`` and column
``j`` is ``ImagePositionPatient + j * PixelSpacing[1] * X + i * PixelSpacing[0] * Y``, with ``X``
the first three values of ImageOrientationPatient (the direction of increasing column index) and
``Y`` the last three (increasing row index). Nothing assumes an axial slice, so sagittal, coronal
and oblique series work the same way.

Contours are traced with marching squares at level 0.5 on the slice's binary mask, padded by one
pixel of background so every contour closes, and so pass halfway between a foreground and a
background pixel centre. Holes and islands inside holes come out as further closed contours on
the same slice; filling all contours of a slice with the even-odd rule (XOR) gives back the mask
exactly, because no pixel centre lies within 0.35 pixel of a contour.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from skimage import draw, measure

__all__ = ["SlicePlane", "fill_even_odd", "mask_contours", "slice_plane"]

FloatArray = npt.NDArray[np.float64]

# scikit-image has no type annotations; these are the two functions used, typed.
_find_contours: Callable[..., list[FloatArray]] = measure.find_contours
_fill_polygon: Callable[..., tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]] = draw.polygon


@dataclass(frozen=True)
class SlicePlane:
    """The plane of one image: origin and unit vectors in patient coordinates (millimetres)."""

    origin: FloatArray  # centre of the first transmitted pixel (ImagePositionPatient)
    row_dir: FloatArray  # direction of increasing column index (IOP[0:3])
    col_dir: FloatArray  # direction of increasing row index (IOP[3:6])
    row_spacing: float  # millimetres between row centres (PixelSpacing[0])
    col_spacing: float  # millimetres between column centres (PixelSpacing[1])
    rows: int
    columns: int

    @property
    def normal(self) -> FloatArray:
        """Unit normal of the plane (row direction x column direction)."""
        n = np.cross(self.row_dir, self.col_dir)
        return np.asarray(n / np.linalg.norm(n), dtype=np.float64)

    def to_patient(self, row: FloatArray, col: FloatArray) -> FloatArray:
        """Pixel coordinates (fractional rows and columns) → (n, 3) patient points in mm."""
        return (
            self.origin
            + np.outer(col * self.col_spacing, self.row_dir)
            + np.outer(row * self.row_spacing, self.col_dir)
        )

    def to_pixel(self, points: FloatArray) -> tuple[FloatArray, FloatArray, FloatArray]:
        """(n, 3) patient points in mm → (rows, columns, distance from the plane in mm)."""
        rel = points - self.origin
        return (
            rel @ self.col_dir / self.row_spacing,
            rel @ self.row_dir / self.col_spacing,
            rel @ self.normal,
        )


def slice_plane(ds: Dataset) -> SlicePlane:
    """The image plane of a single-frame image; ``ValueError`` if its geometry is missing or bad."""
    try:
        ipp = np.asarray([float(v) for v in ds.ImagePositionPatient], dtype=np.float64)
        iop = np.asarray([float(v) for v in ds.ImageOrientationPatient], dtype=np.float64)
        spacing = [float(v) for v in ds.PixelSpacing]
        rows, columns = int(ds.Rows), int(ds.Columns)
    except (AttributeError, TypeError, ValueError) as exc:
        uid = ds.get("SOPInstanceUID", "?")
        raise ValueError(
            f"image {uid} lacks usable ImagePositionPatient, ImageOrientationPatient, "
            f"PixelSpacing, Rows or Columns ({exc})"
        ) from None
    if ipp.shape != (3,) or iop.shape != (6,) or len(spacing) != 2 or min(spacing) <= 0:
        raise ValueError(f"image {ds.get('SOPInstanceUID', '?')} has malformed geometry")
    row_dir, col_dir = iop[:3], iop[3:]
    norms = np.linalg.norm(row_dir), np.linalg.norm(col_dir)
    if min(norms) < 1e-6 or abs(float(row_dir @ col_dir)) > 1e-3 * norms[0] * norms[1]:
        raise ValueError(
            f"image {ds.get('SOPInstanceUID', '?')} has ImageOrientationPatient {iop.tolist()} "
            "whose row and column directions are not orthogonal unit vectors"
        )
    return SlicePlane(
        origin=ipp,
        row_dir=row_dir / norms[0],
        col_dir=col_dir / norms[1],
        row_spacing=spacing[0],
        col_spacing=spacing[1],
        rows=rows,
        columns=columns,
    )


def _drop_collinear(points: FloatArray) -> FloatArray:
    """Remove repeated and collinear vertices of a closed polygon (rows of ``points``).

    Marching squares on a binary mask puts every vertex on a half-pixel grid, so the cross
    products are exact and no vertex that shapes the outline is removed.
    """
    prev = points - np.roll(points, 1, axis=0)
    nxt = np.roll(points, -1, axis=0) - points
    cross = prev[:, 0] * nxt[:, 1] - prev[:, 1] * nxt[:, 0]
    kept: FloatArray = points[cross != 0.0]
    return kept


def mask_contours(mask: npt.NDArray[np.bool_]) -> Iterator[FloatArray]:
    """Closed contours of a 2-D boolean mask as (n, 2) arrays of (row, column), n ≥ 3.

    The first point is not repeated at the end (closure is implied). Contours around holes are
    returned like any other; fill with the even-odd rule to get the mask back.
    """
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return
    cols = np.flatnonzero(mask.any(axis=0))
    r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    # One pixel of background all round: contours touching the crop or image edge close too.
    padded = np.zeros((r1 - r0 + 2, c1 - c0 + 2), dtype=np.float64)
    padded[1:-1, 1:-1] = mask[r0:r1, c0:c1]
    offset = np.array([r0 - 1, c0 - 1], dtype=np.float64)
    for contour in _find_contours(padded, 0.5):
        points = _drop_collinear(np.asarray(contour[:-1], dtype=np.float64))
        if len(points) >= 3:  # a closed outline of positive area has at least 3 corners
            yield points + offset


def fill_even_odd(
    polygons: Sequence[tuple[FloatArray, FloatArray]], shape: tuple[int, int]
) -> npt.NDArray[np.bool_]:
    """Rasterise (rows, columns) polygons into a mask of ``shape`` with the even-odd rule.

    A pixel is set when its centre lies inside an odd number of polygons, so a contour inside
    another cuts a hole, and an island inside that hole is filled again.
    """
    out = np.zeros(shape, dtype=np.bool_)
    for rows, cols in polygons:
        rr, cc = _fill_polygon(rows, cols, shape)
        out[rr, cc] ^= True
    return out
