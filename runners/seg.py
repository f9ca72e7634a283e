"""Label volume -> DICOM Segmentation (highdicom), aligned frame for frame with the source series.

Segment numbering: the structures are sorted by ``Structure.label`` and numbered 1..N in that
order, for BINARY and LABELMAP alike (BINARY requires consecutive numbers from 1). A model whose
labels are 1..N therefore gets segment numbers equal to its labels.

Every structure gets a segment, also one whose label does not occur in the volume: its frames
are all empty, so a reader can tell "the model looked and found nothing" from "the model does not
produce this structure", and the segment list is the same for every study a model runs on.
Empty frames are always kept (``omit_empty_frames=False``): every source slice has one frame per
segment (BINARY) or one frame (LABELMAP), which some viewers (OHIF) need to place segments.

Identification: each segment is AUTOMATIC with the model as algorithm (name, version, family
"Artificial Intelligence" from CID 7162: the family describes the algorithm, the structure's
category is already the segment's property category). Manufacturer and model name "dicomnode",
software version dicomnode's, device serial number the host name, ContentLabel the algorithm
name as a Code String, Content Creator's Name present and empty (no person made it).
"""

from __future__ import annotations

import re
import socket
import warnings
from collections.abc import Sequence
from typing import Literal, NoReturn, cast

import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicomnode import __version__
from runners.structures import Code, Structure

__all__ = ["SegType", "encode_seg", "segment_numbers"]

SegType = Literal["binary", "labelmap"]

_LO_MAX = 64  # Long String
_CS_MAX = 16  # Code String
_PERSON_NAME_WARNING = r'The string ".*" is unlikely to represent the intended person name'


def segment_numbers(structures: Sequence[Structure]) -> dict[int, int]:
    """The segment number :func:`encode_seg` gives each structure label (label -> number)."""
    return {s.label: i for i, s in enumerate(sorted(structures, key=lambda s: s.label), 1)}


def encode_seg(
    label: npt.NDArray[np.integer] | npt.NDArray[np.bool_],
    source_datasets: Sequence[Dataset],
    structures: Sequence[Structure],
    *,
    algorithm_name: str,
    algorithm_version: str,
    seg_type: SegType = "binary",
    series_number: int = 901,
    series_description: str | None = None,
    frames: Sequence[tuple[Dataset, int | None]] | None = None,
) -> Dataset:
    """Encode a label volume as a DICOM Segmentation of ``source_datasets``.

    ``label`` is a (slices, rows, columns) integer array aligned voxel for voxel with the source:
    ``label[k]`` belongs to ``source_datasets[k]`` for a single-frame series (sorted by the
    caller), or to frame ``frames[k][1]`` (1-based) of the one multi-frame dataset in
    ``source_datasets``; without ``frames`` slice k is frame k + 1. 0 is background; every other
    value must be the ``label`` of one of ``structures`` (ValueError naming the others).

    The result is a BINARY (default) or LABELMAP Segmentation in the source's study, in a new
    series, explicit VR little endian, with one segment per structure (see module docstring for
    numbering and empty structures), ready to be written with ``save_as``.
    """
    if seg_type not in ("binary", "labelmap"):
        raise ValueError(f"seg_type must be 'binary' or 'labelmap', not {seg_type!r}")
    if not structures:
        raise ValueError("at least one structure is needed to encode a segmentation")
    if not source_datasets:
        raise ValueError("no source datasets given")
    _check_names(algorithm_name, algorithm_version, structures)

    ordered = sorted(structures, key=lambda s: s.label)
    values = _segment_values(np.asarray(label), ordered)
    images, plane_positions = _source_frames(values, source_datasets, frames)

    algorithm = hd.AlgorithmIdentificationSequence(
        name=algorithm_name,
        family=codes.cid7162.ArtificialIntelligence,
        version=algorithm_version,
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=s.name,
            segmented_property_category=_code(s.category),
            segmented_property_type=_code(s.type),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            display_color=hd.color.CIELabColor.from_rgb(*s.color),
        )
        for number, s in enumerate(ordered, 1)
    ]
    description = f"{algorithm_name} {algorithm_version}"
    with warnings.catch_warnings():
        # highdicom warns about single-component patient names ("ANONYMOUS"), quoting the name:
        # legal DICOM, copied as is, and a patient identifier must not reach the logs. (The
        # filter is process-wide while it lasts; it only ever hides this one warning.)
        warnings.filterwarnings("ignore", _PERSON_NAME_WARNING, UserWarning)
        seg = hd.seg.Segmentation(
            source_images=images,
            pixel_array=values,
            segmentation_type=(
                hd.seg.SegmentationTypeValues.LABELMAP
                if seg_type == "labelmap"
                else hd.seg.SegmentationTypeValues.BINARY
            ),
            segment_descriptions=descriptions,
            series_instance_uid=generate_uid(),
            series_number=series_number,
            sop_instance_uid=generate_uid(),
            instance_number=1,
            manufacturer="dicomnode",
            manufacturer_model_name="dicomnode",
            software_versions=__version__,
            device_serial_number=socket.gethostname()[:_LO_MAX] or "unknown",
            content_label=_content_label(algorithm_name),
            content_description=description[:_LO_MAX],
            content_creator_name=None,
            transfer_syntax_uid=ExplicitVRLittleEndian,
            plane_positions=plane_positions,
            omit_empty_frames=False,
        )
    seg.SeriesDescription = (series_description or description)[:_LO_MAX]
    # Type 2 and meant for a person; an automatic result has none, so present and empty.
    seg.ContentCreatorName = seg.get("ContentCreatorName") or ""
    return seg


def _code(code: Code) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value=code.value, scheme_designator=code.scheme, meaning=code.meaning)


def _content_label(algorithm_name: str) -> str:
    """A Code String (A-Z, 0-9, underscore; at most 16 characters) from the algorithm name."""
    text = re.sub(r"[^A-Z0-9_]+", "_", algorithm_name.upper()).strip("_")
    return text[:_CS_MAX].rstrip("_") or "SEGMENTATION"


def _check_names(name: str, version: str, structures: Sequence[Structure]) -> None:
    if not name.strip() or not version.strip():
        raise ValueError("algorithm_name and algorithm_version must not be empty")
    for what, text in [("algorithm_name", name), ("algorithm_version", version)]:
        if len(text) > _LO_MAX:
            raise ValueError(f"{what} {text!r} is longer than {_LO_MAX} characters")
    labels = [s.label for s in structures]
    duplicates = sorted({v for v in labels if labels.count(v) > 1})
    if duplicates:
        raise ValueError(f"structure labels {duplicates} are declared more than once")
    for s in structures:
        if not 0 < s.label <= 0xFFFF:
            raise ValueError(f"structure {s.name!r}: label {s.label} is not in 1..65535")
        if not s.name.strip() or len(s.name) > _LO_MAX:
            raise ValueError(
                f"structure label {s.label}: name {s.name!r} must be 1..{_LO_MAX} characters"
            )


def _segment_values(
    label: npt.NDArray[np.generic], ordered: Sequence[Structure]
) -> npt.NDArray[np.unsignedinteger]:
    """The label volume with structure labels replaced by segment numbers (uint8 or uint16)."""
    if label.ndim != 3 or 0 in label.shape:
        raise ValueError(
            f"label must be a non-empty (slices, rows, columns) array, not {label.shape}"
        )
    if label.dtype == np.bool_:
        label = label.view(np.uint8)
    if not np.issubdtype(label.dtype, np.integer):
        raise ValueError(f"label must be an integer array, not {label.dtype}")
    labels = np.array([s.label for s in ordered])
    # Room for the segment numbers and the sentinel below.
    out_dtype = np.uint8 if len(ordered) < 0xFF else np.uint16
    low, high = int(label.min()), int(label.max())
    if low < 0 or high > int(labels.max()):
        _raise_unknown(label, labels)
    if np.array_equal(labels, np.arange(1, len(labels) + 1)):
        # Labels are already segment numbers: no remapping, only a cheap cast if needed.
        return label.astype(out_dtype, copy=False)
    # Unknown labels map to a sentinel one above the last segment number.
    lut: npt.NDArray[np.unsignedinteger] = np.full(
        int(labels.max()) + 1, len(labels) + 1, dtype=out_dtype
    )
    lut[0] = 0
    lut[labels] = np.arange(1, len(labels) + 1)
    values = np.take(lut, cast(npt.NDArray[np.integer], label))  # faster than lut[label]
    if int(values.max()) > len(labels):
        _raise_unknown(label, labels)
    return values


def _raise_unknown(label: npt.NDArray[np.generic], labels: npt.NDArray[np.generic]) -> NoReturn:
    present = np.unique(label)
    unknown = [int(v) for v in present if v != 0 and v not in labels]
    raise ValueError(
        f"label volume holds values {unknown} that no structure declares "
        f"(declared: {sorted(int(v) for v in labels)}); add them to the model's structures"
    )


def _source_frames(
    values: npt.NDArray[np.generic],
    source_datasets: Sequence[Dataset],
    frames: Sequence[tuple[Dataset, int | None]] | None,
) -> tuple[list[Dataset], list[hd.PlanePositionSequence] | None]:
    """The source images for highdicom and, for a multi-frame source, each slice's plane position.

    highdicom matches the plane positions to the source frames and references the matching
    frame from each segmentation frame.
    """
    slices = values.shape[0]
    images = list(source_datasets)
    multiframe = [ds for ds in images if int(ds.get("NumberOfFrames", 1) or 1) > 1]
    if not multiframe:
        if len(images) != slices:
            raise ValueError(
                f"label has {slices} slices but {len(images)} source datasets were given"
            )
        consistent = frames is None or (
            len(frames) == slices
            and all(
                f is None and ds.SOPInstanceUID == src.SOPInstanceUID
                for (ds, f), src in zip(frames, images, strict=True)
            )
        )
        if not consistent:
            raise ValueError(
                "for a single-frame series, frames must be None or "
                "[(source_datasets[k], None) for each slice k]"
            )
        return images, None

    if len(images) != 1:
        raise ValueError(
            f"a multi-frame source must be exactly one dataset, got {len(images)} datasets "
            "of which multi-frame: " + ", ".join(str(ds.SOPInstanceUID) for ds in multiframe)
        )
    source = images[0]
    count = int(source.NumberOfFrames)
    if frames is None:
        if slices != count:
            raise ValueError(
                f"label has {slices} slices but the source has {count} frames; "
                "say which frame each slice is with frames=[(dataset, frame_number), ...]"
            )
        return images, None
    if len(frames) != slices:
        raise ValueError(f"label has {slices} slices but frames lists {len(frames)}")
    numbers: list[int] = []
    for k, (ds, number) in enumerate(frames):
        if ds.SOPInstanceUID != source.SOPInstanceUID:
            raise ValueError(f"frames[{k}] refers to {ds.SOPInstanceUID}, not the source dataset")
        if number is None or not 1 <= number <= count:
            raise ValueError(f"frames[{k}]: frame number {number} is not in 1..{count}")
        numbers.append(number)
    if len(set(numbers)) != len(numbers):
        raise ValueError("frames lists a source frame more than once")
    positions = hd.utils.get_plane_positions_of_image(source)
    return images, [positions[n - 1] for n in numbers]
