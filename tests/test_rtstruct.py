"""RTSTRUCT encoder: label map -> RT Structure Set -> file -> read back -> rasterised again.

Series are generated with real geometry (axial with anisotropic, non-square pixels; sagittal;
oblique), written as files and read back. The phantom holds a sphere, a ring with an island in its
hole, several islands per slice, thin one-voxel lines (one only diagonally connected), a structure
touching the image edge, a single voxel and an empty structure. Contour geometry is checked
against SimpleITK's reading of the same files, and every written file against ``dciodvfy``.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import SimpleITK as sitk
from pydicom import dcmread
from pydicom.dataset import Dataset

from runners.rtstruct import RT_STRUCTURE_SET_STORAGE, encode_rtstruct, rasterize_rtstruct
from runners.structures import Structure, default_structure
from tests.conftest import require_tool
from tests.dicomgen import make_series, write_series

SHAPE = (24, 60, 72)  # slices, rows, columns
SPACING = (2.5, 0.8, 1.1)  # slice, row (PixelSpacing[0]), column (PixelSpacing[1]) in mm

STRUCTURES = [
    default_structure(1, "Sphere", "tumor"),
    default_structure(2, "Ring", "liver"),
    default_structure(3, "Islands", "kidney", color=(10, 20, 30)),
    default_structure(4, "Thin", "spinal_cord"),
    default_structure(5, "Edge", "body"),
    default_structure(6, "Speck", "lesion"),
    default_structure(7, "Empty", "heart"),
]
SPECK = (3, 2, 70)  # (slice, row, column) of the single-voxel structure
RING_SLICE = 11  # a slice through the ring and the island in its hole


def _rotation(ax: float, az: float) -> npt.NDArray[np.float64]:
    ca, sa, cz, sz = np.cos(ax), np.sin(ax), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, ca, -sa], [0, sa, ca]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return np.asarray(rz @ rx, dtype=np.float64)


_OBLIQUE = _rotation(np.radians(35), np.radians(20))
GEOMETRIES = {
    "axial": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (-40.3, -25.7, 112.25)),
    "sagittal": ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0), (12.5, -30.0, 80.0)),
    "oblique": (tuple(_OBLIQUE[:, 0]), tuple(_OBLIQUE[:, 1]), (-33.3, 17.1, -250.6)),
}


def _phantom() -> npt.NDArray[np.uint16]:
    """The label map, shapes laid out in millimetres on the (slice, row, column) grid."""
    z, y, x = np.meshgrid(
        *(np.arange(n) * d for n, d in zip(SHAPE, SPACING, strict=True)), indexing="ij"
    )
    label = np.zeros(SHAPE, dtype=np.uint16)
    label[(z - 28) ** 2 + (y - 14) ** 2 + (x - 16) ** 2 <= 10**2] = 1
    r2 = (y - 34) ** 2 + (x - 22) ** 2
    slab = (z >= 10) & (z <= 45)
    label[slab & (r2 <= 11**2) & (r2 > 5**2)] = 2
    label[(z >= 20) & (z <= 35) & (r2 <= 2.2**2)] = 2  # island in the ring's hole
    for cy, cx in ((10, 45), (10, 58), (22, 52)):
        label[(z >= 5) & (z <= 50) & ((y - cy) ** 2 + (x - cx) ** 2 <= 3**2)] = 3
    label[3:9, 38:56, 66] = 4  # one voxel wide
    for i in range(16):  # one voxel wide, connected only diagonally
        label[12:16, 40 + i, 38 + i] = 4
    label[15:20, 0:3, 30:45] = 5  # touches the first row
    label[15:20, 10:20, 68:72] = 5  # touches the last column
    label[SPECK] = 6
    assert label[RING_SLICE][label[RING_SLICE] == 2].size > 0
    return label


def _series(folder: Path, orientation: str) -> tuple[list[Dataset], list[Path]]:
    """A CT series in ``orientation``, written to ``folder`` and read back from the files."""
    row_dir, col_dir, origin = GEOMETRIES[orientation]
    normal = np.cross(row_dir, col_dir)
    datasets = make_series(SHAPE[0], rows=SHAPE[1], columns=SHAPE[2], spacing=SPACING)
    for k, ds in enumerate(datasets):
        position = np.asarray(origin) + k * SPACING[0] * normal
        ds.ImagePositionPatient = [f"{v:.4f}" for v in position]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*row_dir, *col_dir)]
        ds.PixelSpacing = [SPACING[1], SPACING[2]]
    paths = write_series(folder, datasets)
    return [dcmread(p) for p in paths], paths


def _iop(ds: Dataset) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])
    return iop[:3], iop[3:]


def _dciodvfy(path: Path) -> None:
    proc = subprocess.run(
        [require_tool("dciodvfy"), str(path)], capture_output=True, text=True, timeout=60
    )
    lines = (proc.stdout + proc.stderr).splitlines()
    for line in lines:
        if "Warning" in line:
            print("dciodvfy:", line)
    errors = [line for line in lines if "Error" in line]
    assert not errors, "\n".join(lines)


def _number_strings(ds: Dataset) -> Iterator[tuple[str, str]]:
    for elem in ds.iterall():
        if elem.VR in ("DS", "IS") and not elem.is_empty:
            values = elem.value if elem.VM > 1 else [elem.value]
            for value in values:
                yield elem.keyword, str(getattr(value, "original_string", value))


def _dice(a: npt.NDArray[np.bool_], b: npt.NDArray[np.bool_]) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def _encode_and_read(
    tmp_path: Path, sources: list[Dataset], label: npt.NDArray[np.generic], **kwargs: str
) -> tuple[Dataset, Path]:
    ds = encode_rtstruct(
        label, sources, STRUCTURES, algorithm_name="Phantom segmenter", algorithm_version="2.1"
    )
    path = tmp_path / "rtstruct.dcm"
    ds.save_as(path, enforce_file_format=True)
    return dcmread(path), path


@pytest.mark.parametrize("orientation", sorted(GEOMETRIES))
def test_round_trip(tmp_path: Path, orientation: str) -> None:
    sources, paths = _series(tmp_path / "ct", orientation)
    label = _phantom()
    rt, path = _encode_and_read(tmp_path, sources, label)
    first = sources[0]

    # Header: the study's patient and UIDs, a new series, explicit VR little endian.
    assert rt.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert rt.SOPClassUID == RT_STRUCTURE_SET_STORAGE == rt.file_meta.MediaStorageSOPClassUID
    assert rt.Modality == "RTSTRUCT" and rt.Manufacturer == "dicomnode"
    assert rt.StudyInstanceUID == first.StudyInstanceUID
    assert rt.PatientID == first.PatientID and rt.PatientName == first.PatientName
    assert rt.SeriesInstanceUID != first.SeriesInstanceUID and rt.SeriesNumber == 902
    assert rt.FrameOfReferenceUID == first.FrameOfReferenceUID
    assert rt.StructureSetLabel == "Phantom segmente" and len(rt.StructureSetLabel) <= 16

    # One frame of reference, referencing every image of the source series.
    (frame,) = rt.ReferencedFrameOfReferenceSequence
    assert frame.FrameOfReferenceUID == first.FrameOfReferenceUID
    (study,) = frame.RTReferencedStudySequence
    assert study.ReferencedSOPInstanceUID == first.StudyInstanceUID
    (series,) = study.RTReferencedSeriesSequence
    assert series.SeriesInstanceUID == first.SeriesInstanceUID
    assert [i.ReferencedSOPInstanceUID for i in series.ContourImageSequence] == [
        s.SOPInstanceUID for s in sources
    ]

    # ROIs as configured, the empty one kept without contours.
    rois = {int(r.ROINumber): r for r in rt.StructureSetROISequence}
    contours = {int(c.ReferencedROINumber): c for c in rt.ROIContourSequence}
    observations = {int(o.ReferencedROINumber): o for o in rt.RTROIObservationsSequence}
    assert sorted(rois) == sorted(contours) == sorted(observations) == list(range(1, 8))
    for number, structure in enumerate(STRUCTURES, start=1):
        roi, obs = rois[number], observations[number]
        assert roi.ROIName == structure.name and roi.ROIGenerationAlgorithm == "AUTOMATIC"
        assert roi.ReferencedFrameOfReferenceUID == first.FrameOfReferenceUID
        assert list(contours[number].ROIDisplayColor) == list(structure.color)
        assert obs.RTROIInterpretedType == structure.rt_type
        assert obs.RTROIIdentificationCodeSequence[0].CodeValue == structure.type.value
        category = obs.SegmentedPropertyCategoryCodeSequence[0]
        assert category.CodeValue == structure.category.value
    assert "ContourSequence" not in contours[7]

    # Every contour: >= 3 points, the count right, on the plane of the image it references.
    by_uid = {s.SOPInstanceUID: s for s in sources}
    count = 0
    for roi_contour in rt.ROIContourSequence:
        for contour in roi_contour.get("ContourSequence", []):
            count += 1
            points = np.asarray(contour.ContourData, dtype=np.float64).reshape(-1, 3)
            assert contour.ContourGeometricType == "CLOSED_PLANAR"
            assert int(contour.NumberOfContourPoints) == len(points) >= 3
            (image,) = contour.ContourImageSequence
            src = by_uid[image.ReferencedSOPInstanceUID]
            assert image.ReferencedSOPClassUID == src.SOPClassUID
            row_dir, col_dir = _iop(src)
            normal = np.cross(row_dir, col_dir)
            ipp = np.asarray([float(v) for v in src.ImagePositionPatient])
            assert np.abs((points - ipp) @ normal).max() < 0.002  # mm from the slice plane
    assert count > 100

    # Numbers fit their VRs: DS at most 16 characters everywhere.
    too_long = [(k, v) for k, v in _number_strings(rt) if len(v) > 16]
    assert not too_long

    # The single voxel is one 4-point diamond around the voxel centre SimpleITK computes.
    (speck,) = contours[6].ContourSequence
    k, i, j = SPECK
    image = sitk.ReadImage(str(paths[k]))
    centre = image.TransformContinuousIndexToPhysicalPoint((j, i, 0))  # type: ignore[no-untyped-call]
    points = np.asarray(speck.ContourData, dtype=np.float64).reshape(-1, 3)
    assert len(points) == 4
    np.testing.assert_allclose(points.mean(axis=0), centre, atol=0.002)
    half = sorted(np.linalg.norm(points - np.asarray(centre), axis=1))
    np.testing.assert_allclose(half, [SPACING[1] / 2] * 2 + [SPACING[2] / 2] * 2, atol=0.002)

    # Holes are separate contours: the ring slice has outline, hole and island.
    ring_uid = sources[RING_SLICE].SOPInstanceUID
    on_ring_slice = [
        c
        for c in contours[2].ContourSequence
        if c.ContourImageSequence[0].ReferencedSOPInstanceUID == ring_uid
    ]
    assert len(on_ring_slice) == 3

    # Rasterised back onto the source grid: identical to the label map.
    masks = rasterize_rtstruct(rt, sources)
    assert sorted(masks) == sorted(s.name for s in STRUCTURES)
    for structure in STRUCTURES:
        truth = label == structure.label
        dice = _dice(masks[structure.name], truth)
        print(f"{orientation} {structure.name}: {int(truth.sum())} voxels, Dice {dice:.4f}")
        assert dice >= 0.98
        np.testing.assert_array_equal(masks[structure.name], truth)

    _dciodvfy(path)


def test_rasterise_by_plane_without_image_references(tmp_path: Path) -> None:
    sources, _ = _series(tmp_path / "ct", "oblique")
    label = _phantom()
    rt, _ = _encode_and_read(tmp_path, sources, label)
    for roi_contour in rt.ROIContourSequence:
        for contour in roi_contour.get("ContourSequence", []):
            del contour.ContourImageSequence
    masks = rasterize_rtstruct(rt, sources)
    for structure in STRUCTURES:
        np.testing.assert_array_equal(masks[structure.name], label == structure.label)


def test_structure_set_label_and_unknown_labels(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sources, _ = _series(tmp_path / "ct", "axial")
    label = np.zeros(SHAPE, dtype=np.int32)
    label[5, 10:20, 10:20] = 9  # no structure has label 9
    label[6, 10:20, 10:20] = 1
    structures = [Structure(1, "Box", (1, 2, 3), STRUCTURES[0].category, STRUCTURES[0].type)]
    with caplog.at_level(logging.WARNING, logger="runners.rtstruct"):
        ds = encode_rtstruct(
            label,
            sources,
            structures,
            algorithm_name="A very long algorithm name for sure",
            algorithm_version="1",
        )
    assert ds.StructureSetLabel == "A very long algo"
    assert "above 1" in caplog.text
    (roi_contour,) = ds.ROIContourSequence
    assert len(roi_contour.ContourSequence) == 1
    ds = encode_rtstruct(
        label, sources, structures, algorithm_name="x", algorithm_version="1",
        structure_set_label="AI contours",
    )  # fmt: skip
    assert ds.StructureSetLabel == "AI contours"
    with pytest.raises(ValueError, match="StructureSetLabel"):
        encode_rtstruct(
            label, sources, structures, algorithm_name="x", algorithm_version="1",
            structure_set_label="seventeen chars!!",
        )  # fmt: skip


def test_rejects_inputs_that_do_not_fit(tmp_path: Path) -> None:
    sources, _ = _series(tmp_path / "ct", "axial")
    label = np.zeros(SHAPE, dtype=np.uint8)
    kwargs: dict[str, Any] = {"algorithm_name": "x", "algorithm_version": "1"}
    with pytest.raises(ValueError, match="does not match"):
        encode_rtstruct(label[:-1], sources, STRUCTURES, **kwargs)
    with pytest.raises(ValueError, match="does not match"):
        encode_rtstruct(label.transpose(0, 2, 1), sources, STRUCTURES, **kwargs)
    with pytest.raises(TypeError, match="integer"):
        encode_rtstruct(label.astype(np.float32), sources, STRUCTURES, **kwargs)
    with pytest.raises(ValueError, match="at least one ROI"):
        encode_rtstruct(label, sources, [], **kwargs)
    with pytest.raises(ValueError, match="unique"):
        encode_rtstruct(label, sources, [STRUCTURES[0], STRUCTURES[0]], **kwargs)
    with pytest.raises(ValueError, match="ROI name"):
        encode_rtstruct(label, sources, [default_structure(1, "a\\b")], **kwargs)
    sources[-1].SeriesInstanceUID = "1.2.3.4"
    with pytest.raises(ValueError, match="SeriesInstanceUID"):
        encode_rtstruct(label, sources, STRUCTURES, **kwargs)
    sources[-1].SeriesInstanceUID = sources[0].SeriesInstanceUID
    sources[3].ImageOrientationPatient = [1, 0, 0, 1, 0, 0]
    with pytest.raises(ValueError, match="orthogonal"):
        encode_rtstruct(label, sources, STRUCTURES, **kwargs)
