"""DICOM series → SimpleITK volume with the geometry SimpleITK's own DICOM reader gives, and
resampling to a model's grid and back onto the source grid.

Geometry follows ITK's ``ImageSeriesReader`` (with ``ForceOrthogonalDirection``): the origin is the
ImagePositionPatient of the first slice along the normal (row cosine x column cosine), the direction
columns are row cosine, column cosine and normal, the in-plane spacing is (PixelSpacing[1],
PixelSpacing[0]) and the slice spacing is the distance between the first and the last slice divided
by the number of gaps. All coordinates are DICOM patient coordinates (LPS), in millimetres.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pydicom
import SimpleITK
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from dicomnode.errors import DicomNodeError

__all__ = [
    "Interpolator",
    "Orientation",
    "SeriesVolume",
    "VolumeError",
    "load_series",
    "to_model_grid",
    "to_source_grid",
]

logger = logging.getLogger(__name__)
sitk: Any = SimpleITK  # untyped C++ bindings; Any keeps mypy --strict quiet

Orientation = Literal["LPS", "RAS", "none"]
Interpolator = Literal["linear", "nearest", "bspline"]

# Direction cosines are DS values (at most 16 characters); allow for their rounding.
_COSINE_TOLERANCE = 1e-3
# Pixel spacings and slice positions: absolute tolerance in millimetres.
_MM_TOLERANCE = 0.01
# Slice spacing: relative tolerance (uneven spacing, gaps).
_RELATIVE_TOLERANCE = 0.01
_MAX_REPORTED = 5

_INTERPOLATORS: dict[str, int] = {
    "linear": sitk.sitkLinear,
    "nearest": sitk.sitkNearestNeighbor,
    "bspline": sitk.sitkBSpline,
}


class VolumeError(DicomNodeError):
    """A series cannot be turned into a volume (inconsistent, incomplete or not an image)."""


@dataclass
class SeriesVolume:
    """One series as a float32 volume plus the source datasets in slice order.

    ``frames[k]`` is the dataset and, for a multi-frame instance, the 1-based frame number of
    slice ``k`` along the image's third axis. ``datasets`` is the same order without repeats:
    one dataset per slice for a classic series, the instance(s) for an enhanced multi-frame one.
    """

    image: Any  # SimpleITK.Image, float32, LPS geometry
    datasets: list[Dataset]
    frames: list[tuple[Dataset, int | None]]
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    modality: str
    slice_positions: list[tuple[float, float, float]] = field(default_factory=list)


@dataclass
class _Frame:
    """Geometry and pixel transform of one 2-D slice (a classic instance or one frame)."""

    ds: Dataset
    number: int | None  # 1-based frame number for multi-frame instances
    where: str  # for messages: "instance 3" or "instance 1 frame 7"
    position: NDArray[np.float64]
    row_cosine: NDArray[np.float64]
    column_cosine: NDArray[np.float64]
    pixel_spacing: tuple[float, float]  # (between rows, between columns) as in DICOM
    slice_thickness: float | None
    slope: float
    intercept: float
    distance: float = 0.0  # position along the normal, set once the normal is known


def _describe(ds: Dataset) -> str:
    """The series, named for messages without patient identifiers."""
    uid = str(ds.get("SeriesInstanceUID", "?"))
    number = ds.get("SeriesNumber")
    desc = str(ds.get("SeriesDescription", "") or "")[:64]
    parts = [f"series {uid}"]
    if number is not None:
        parts.append(f"number {number}")
    if desc:
        parts.append(f"'{desc}'")
    return " ".join(parts)


def _item(ds: Dataset, keyword: str) -> Dataset | None:
    seq = ds.get(keyword)
    if seq is None or len(seq) == 0:
        return None
    first: Dataset = seq[0]
    return first


def _group(per_frame: Dataset | None, shared: Dataset | None, keyword: str) -> Dataset | None:
    """A functional group macro's item: per-frame overrides shared."""
    for container in (per_frame, shared):
        if container is not None:
            found = _item(container, keyword)
            if found is not None:
                return found
    return None


def _floats(value: Any, count: int, name: str, where: str, series: str) -> list[float]:
    try:
        values = [float(v) for v in value]
    except (TypeError, ValueError) as exc:
        raise VolumeError(f"{series}: {where} has an unreadable {name} ({value!r})") from exc
    if len(values) != count or not all(np.isfinite(values)):
        raise VolumeError(f"{series}: {where} has {name} {values}, expected {count} numbers")
    return values


def _make_frame(
    ds: Dataset,
    number: int | None,
    where: str,
    series: str,
    position_item: Dataset | None,
    orientation_item: Dataset | None,
    measures_item: Dataset | None,
    transform_item: Dataset | None,
) -> _Frame:
    missing = [
        name
        for name, item in (
            ("ImagePositionPatient", position_item),
            ("ImageOrientationPatient", orientation_item),
            ("PixelSpacing", measures_item),
        )
        if item is None or item.get(name) is None
    ]
    if missing:
        raise VolumeError(
            f"{series}: {where} lacks {', '.join(missing)}; "
            "a volume needs the position, orientation and pixel spacing of every slice"
        )
    assert position_item is not None and orientation_item is not None
    assert measures_item is not None
    position = _floats(position_item.ImagePositionPatient, 3, "ImagePositionPatient", where, series)
    cosines = _floats(
        orientation_item.ImageOrientationPatient, 6, "ImageOrientationPatient", where, series
    )
    spacing = _floats(measures_item.PixelSpacing, 2, "PixelSpacing", where, series)
    if min(spacing) <= 0:
        raise VolumeError(f"{series}: {where} has PixelSpacing {spacing}, must be positive")
    row, column = np.array(cosines[:3]), np.array(cosines[3:])
    if (
        abs(np.linalg.norm(row) - 1) > _COSINE_TOLERANCE
        or abs(np.linalg.norm(column) - 1) > _COSINE_TOLERANCE
        or abs(float(row @ column)) > _COSINE_TOLERANCE
    ):
        raise VolumeError(
            f"{series}: {where} has ImageOrientationPatient {cosines}, "
            "which are not two orthogonal unit vectors"
        )
    thickness = measures_item.get("SliceThickness")
    slope, intercept = 1.0, 0.0
    if transform_item is not None:
        if transform_item.get("RescaleSlope") is not None:
            slope = float(transform_item.RescaleSlope)
        if transform_item.get("RescaleIntercept") is not None:
            intercept = float(transform_item.RescaleIntercept)
    return _Frame(
        ds=ds,
        number=number,
        where=where,
        position=np.array(position),
        row_cosine=row,
        column_cosine=column,
        pixel_spacing=(spacing[0], spacing[1]),
        slice_thickness=float(thickness) if thickness not in (None, "") else None,
        slope=slope,
        intercept=intercept,
    )


def _frames_of(ds: Dataset, index: int, series: str) -> list[_Frame]:
    """The slices one instance holds: itself, or each frame of an enhanced multi-frame."""
    label = f"instance {ds.get('InstanceNumber', index + 1)} ({ds.get('SOPInstanceUID', '?')})"
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    per_frame_seq = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame_seq is None:
        if n_frames > 1:
            raise VolumeError(
                f"{series}: {label} has {n_frames} frames but no per-frame functional groups, "
                "so the frames have no position; only enhanced multi-frame images are supported"
            )
        return [_make_frame(ds, None, label, series, ds, ds, ds, ds)]
    shared = _item(ds, "SharedFunctionalGroupsSequence")
    if len(per_frame_seq) != n_frames:
        raise VolumeError(
            f"{series}: {label} has NumberOfFrames {n_frames} "
            f"but {len(per_frame_seq)} per-frame functional group items"
        )
    frames = []
    for number, per_frame in enumerate(per_frame_seq, start=1):
        frames.append(
            _make_frame(
                ds,
                number,
                f"{label} frame {number}",
                series,
                _group(per_frame, shared, "PlanePositionSequence"),
                _group(per_frame, shared, "PlaneOrientationSequence"),
                _group(per_frame, shared, "PixelMeasuresSequence"),
                _group(per_frame, shared, "PixelValueTransformationSequence"),
            )
        )
    return frames


def _read(path: Path) -> Dataset:
    try:
        return pydicom.dcmread(path)
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        raise VolumeError(f"{path}: not a readable DICOM file ({exc})") from exc


def _check_same(datasets: Sequence[Dataset], keyword: str, series: str) -> str:
    values = {str(ds.get(keyword, "") or "") for ds in datasets}
    if "" in values:
        raise VolumeError(f"{series}: an instance lacks {keyword}")
    if len(values) > 1:
        raise VolumeError(
            f"{series}: instances differ in {keyword} ({', '.join(sorted(values))}); "
            "send one series with one frame of reference"
        )
    return values.pop()


def _check_image(ds: Dataset, index: int, series: str) -> None:
    where = f"instance {ds.get('InstanceNumber', index + 1)} ({ds.get('SOPInstanceUID', '?')})"
    if "PixelData" not in ds:
        raise VolumeError(
            f"{series}: {where} is not an image (no Pixel Data; SOP class "
            f"{ds.get('SOPClassUID', '?')}, modality {ds.get('Modality', '?')})"
        )
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples != 1:
        raise VolumeError(
            f"{series}: {where} has {samples} samples per pixel "
            f"({ds.get('PhotometricInterpretation', '?')}); only greyscale images make a volume"
        )


def _check_consistent(frames: Sequence[_Frame], series: str) -> None:
    first = frames[0]
    sizes = {(int(f.ds.Rows), int(f.ds.Columns)) for f in frames}
    if len(sizes) > 1:
        raise VolumeError(
            f"{series}: slices differ in size (rows x columns: "
            f"{', '.join(f'{r}x{c}' for r, c in sorted(sizes))})"
        )
    for f in frames[1:]:
        if (
            np.abs(f.row_cosine - first.row_cosine).max() > _COSINE_TOLERANCE
            or np.abs(f.column_cosine - first.column_cosine).max() > _COSINE_TOLERANCE
        ):
            raise VolumeError(
                f"{series}: orientation varies: {first.where} has ImageOrientationPatient "
                f"{[*first.row_cosine, *first.column_cosine]}, {f.where} has "
                f"{[*f.row_cosine, *f.column_cosine]}"
            )
        if np.abs(np.subtract(f.pixel_spacing, first.pixel_spacing)).max() > _MM_TOLERANCE * 0.1:
            raise VolumeError(
                f"{series}: pixel spacing varies: {first.where} has {list(first.pixel_spacing)}, "
                f"{f.where} has {list(f.pixel_spacing)}"
            )


def _slice_spacing(frames: Sequence[_Frame], normal: NDArray[np.float64], series: str) -> float:
    """Check the sorted slices form one evenly spaced stack along the normal; the spacing (mm)."""
    if len(frames) == 1:
        thickness = frames[0].slice_thickness
        return thickness if thickness is not None and thickness > 0 else 1.0
    gaps = np.diff([f.distance for f in frames])
    duplicates = [i for i, g in enumerate(gaps) if g < _MM_TOLERANCE]
    if duplicates:
        shown = "; ".join(
            f"{frames[i].where} and {frames[i + 1].where} at {frames[i].distance:.3f} mm"
            for i in duplicates[:_MAX_REPORTED]
        )
        raise VolumeError(
            f"{series}: {len(duplicates)} duplicate slice position(s) along the normal: {shown}. "
            "The series holds several stacks (repeats, echoes, phases or time points)"
        )
    origin = frames[0].position
    for f in frames[1:]:
        offset = f.position - origin
        off_axis = offset - (offset @ normal) * normal
        if np.linalg.norm(off_axis) > max(_MM_TOLERANCE, _RELATIVE_TOLERANCE * abs(f.distance)):
            raise VolumeError(
                f"{series}: slices are not stacked along their normal ({f.where} is "
                f"{np.linalg.norm(off_axis):.3f} mm off the axis through the first slice); "
                "gantry tilt or sheared stacks are not supported"
            )
    spacing = float(frames[-1].distance - frames[0].distance) / (len(frames) - 1)
    reference = float(np.median(gaps))
    tolerance = max(_MM_TOLERANCE, _RELATIVE_TOLERANCE * reference)
    uneven = [i for i, g in enumerate(gaps) if abs(g - reference) > tolerance]
    if uneven:
        shown = "; ".join(
            f"{gaps[i]:.3f} mm between {frames[i].distance:.3f} and {frames[i + 1].distance:.3f}"
            for i in uneven[:_MAX_REPORTED]
        )
        kind = "gap(s)" if any(gaps[i] > 1.5 * reference for i in uneven) else "uneven spacing"
        raise VolumeError(
            f"{series}: slice {kind} along the normal: typical spacing {reference:.3f} mm but "
            f"{shown} (positions along the normal, mm; {len(uneven)} of {len(gaps)} steps "
            "off). Missing slices? Send the complete series"
        )
    return spacing


def _decode(f: _Frame, series: str) -> NDArray[Any]:
    try:
        pixels: NDArray[Any] = f.ds.pixel_array
    except Exception as exc:  # decoders raise many types; name the instance and the syntax
        syntax = f.ds.file_meta.get("TransferSyntaxUID", "?")
        raise VolumeError(
            f"{series}: cannot decode the pixel data of {f.where} (transfer syntax {syntax}): {exc}"
        ) from exc
    return pixels


def _voxels(frames: Sequence[_Frame], series: str) -> NDArray[np.float32]:
    """The rescaled float32 array (slice, row, column) of the sorted frames."""
    ds = frames[0].ds
    volume = np.empty((len(frames), int(ds.Rows), int(ds.Columns)), np.float32)
    multi_frame: dict[int, NDArray[Any]] = {}  # one decode per multi-frame instance
    for k, f in enumerate(frames):
        if f.number is None:
            pixels = _decode(f, series)
        else:
            if id(f.ds) not in multi_frame:
                decoded = _decode(f, series)
                multi_frame[id(f.ds)] = decoded.reshape(-1, *decoded.shape[-2:])
            pixels = multi_frame[id(f.ds)][f.number - 1]
        volume[k] = pixels
        volume[k] *= np.float32(f.slope)
        volume[k] += np.float32(f.intercept)
    return volume


def load_series(paths: Sequence[Path]) -> SeriesVolume:
    """Read the instances of one image series into a float32 volume (rescaled values, e.g. HU).

    Slices are ordered by position along the normal. Raises :class:`VolumeError` naming the
    series and the problem when the files are not one complete, evenly spaced image series.
    """
    if not paths:
        raise VolumeError("no files given: a series needs at least one instance")
    datasets = [_read(Path(p)) for p in paths]
    series = _describe(datasets[0])
    series_uid = _check_same(datasets, "SeriesInstanceUID", series)
    study_uid = _check_same(datasets, "StudyInstanceUID", series)
    for i, ds in enumerate(datasets):
        _check_image(ds, i, series)
    frame_uid = _check_same(datasets, "FrameOfReferenceUID", series)
    frames = [f for i, ds in enumerate(datasets) for f in _frames_of(ds, i, series)]
    _check_consistent(frames, series)

    row, column = frames[0].row_cosine, frames[0].column_cosine
    normal = np.cross(row, column)
    normal /= np.linalg.norm(normal)
    for f in frames:
        f.distance = float(f.position @ normal)
    frames.sort(key=lambda f: f.distance)
    z_spacing = _slice_spacing(frames, normal, series)

    volume = _voxels(frames, series)

    image = sitk.GetImageFromArray(volume)
    image.SetOrigin(tuple(float(v) for v in frames[0].position))
    row_spacing, column_spacing = frames[0].pixel_spacing
    image.SetSpacing((column_spacing, row_spacing, z_spacing))
    image.SetDirection(tuple(float(v) for v in np.column_stack([row, column, normal]).ravel()))

    unique = list({id(f.ds): f.ds for f in frames}.values())  # slice order, no repeats
    return SeriesVolume(
        image=image,
        datasets=unique,
        frames=[(f.ds, f.number) for f in frames],
        study_instance_uid=study_uid,
        series_instance_uid=series_uid,
        frame_of_reference_uid=frame_uid,
        modality=str(datasets[0].get("Modality", "") or ""),
        slice_positions=[
            (float(a), float(b), float(c)) for a, b, c in (f.position for f in frames)
        ],
    )


def to_model_grid(
    image: Any,
    orientation: Orientation = "none",
    spacing: Sequence[float] | None = None,
    interpolator: Interpolator = "linear",
) -> Any:
    """Reorient ``image`` to an axis convention and resample it to ``spacing`` (mm).

    ``orientation`` is "LPS" (x to the patient's left, y posterior, z superior: DICOM), "RAS"
    (NIfTI-style) or "none"; it permutes and flips axes only (SimpleITK's ``DICOMOrient``), so an
    oblique image stays oblique. ``spacing`` applies to the reoriented axes; the new grid covers
    the same physical extent, centred on the old one. ``None`` keeps the spacing.
    """
    if orientation not in ("LPS", "RAS", "none"):
        raise VolumeError(f"unknown orientation {orientation!r}: use 'LPS', 'RAS' or 'none'")
    if interpolator not in _INTERPOLATORS:
        raise VolumeError(
            f"unknown interpolator {interpolator!r}: use one of {', '.join(_INTERPOLATORS)}"
        )
    out = image if orientation == "none" else sitk.DICOMOrient(image, orientation)
    if spacing is None:
        return out
    new_spacing = np.array([float(s) for s in spacing])
    dimension = out.GetDimension()
    if new_spacing.shape != (dimension,) or (new_spacing <= 0).any():
        raise VolumeError(
            f"model spacing {list(spacing)} must be {dimension} positive numbers (mm)"
        )
    old_spacing = np.array(out.GetSpacing())
    old_size = np.array(out.GetSize())
    new_size = np.maximum(1, np.round(old_size * old_spacing / new_spacing)).astype(int)
    direction = np.array(out.GetDirection()).reshape(dimension, dimension)
    centre = np.array(out.GetOrigin()) + direction @ ((old_size - 1) * old_spacing / 2)
    new_origin = centre - direction @ ((new_size - 1) * new_spacing / 2)
    return sitk.Resample(
        out,
        [int(s) for s in new_size],
        sitk.Transform(),
        _INTERPOLATORS[interpolator],
        [float(v) for v in new_origin],
        [float(v) for v in new_spacing],
        [float(v) for v in direction.ravel()],
        0.0,
        out.GetPixelID(),
        True,  # nearest-neighbour extrapolation at the rim, not zeros
    )


def to_source_grid(label: Any, source: Any) -> Any:
    """Resample a label map (nearest neighbour) onto the exact grid of ``source``.

    Label values must be whole numbers in 0..65535; the result is uint8 when the label is uint8
    or all values fit, else uint16, so it aligns voxel for voxel with the source series.
    """
    if label.GetNumberOfComponentsPerPixel() != 1:
        raise VolumeError("a label map must have one value per voxel")
    values = sitk.GetArrayViewFromImage(label)
    if values.size and (
        values.min() < 0 or values.max() > 65535 or not np.array_equal(values, np.round(values))
    ):
        raise VolumeError(
            "label values must be whole numbers from 0 to 65535, got "
            f"{values.min()}..{values.max()} ({label.GetPixelIDTypeAsString()})"
        )
    if label.GetPixelID() in (sitk.sitkUInt8, sitk.sitkUInt16):
        pixel_id = label.GetPixelID()
    else:
        pixel_id = sitk.sitkUInt8 if values.size == 0 or values.max() <= 255 else sitk.sitkUInt16
        label = sitk.Cast(label, pixel_id)
    return sitk.Resample(
        label, source, sitk.Transform(), sitk.sitkNearestNeighbor, 0, pixel_id, True
    )
