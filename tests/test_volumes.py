"""DICOM series → SimpleITK volume, checked against SimpleITK's own reader and known geometry;
resampling to a model grid and back."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import SimpleITK
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)
from pydicom.valuerep import format_number_as_ds

from runners.volumes import SeriesVolume, VolumeError, load_series, to_model_grid, to_source_grid

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"
sitk: Any = SimpleITK


def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    """Rotation matrix for angles (degrees) about x, then y, then z."""
    a, b, c = np.radians([ax, ay, az])
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    rotation: np.ndarray = rz @ ry @ rx
    return rotation


def _ds(values: Any) -> list[str]:
    return [format_number_as_ds(float(v)) for v in values]


@dataclass
class Geometry:
    row: np.ndarray  # direction of increasing column index
    col: np.ndarray  # direction of increasing row index
    origin: np.ndarray
    row_spacing: float = 0.8  # between rows (PixelSpacing[0])
    col_spacing: float = 0.6  # between columns (PixelSpacing[1])
    dz: float = 2.0
    rows: int = 20
    columns: int = 24
    n: int = 8

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row, self.col)

    def position(self, k: int) -> np.ndarray:
        return self.origin + k * self.dz * self.normal


AXIAL_ROTATED = Geometry(
    _rotation(0, 0, 15)[:, 0], _rotation(0, 0, 15)[:, 1], np.array([-90, -80, 30])
)
SAGITTAL = Geometry(np.array([0.0, 1, 0]), np.array([0.0, 0, -1]), np.array([20, -100, 80]))
CORONAL = Geometry(np.array([1.0, 0, 0]), np.array([0.0, 0, -1]), np.array([-100, 15, 60]))
OBLIQUE = Geometry(
    _rotation(20, 20, 0)[:, 0], _rotation(20, 20, 0)[:, 1], np.array([-50, -60, -20])
)


def _base(sop_class: str, modality: str, study: str, series: str, frame: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = UID(sop_class)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = sop_class
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
    ds.Modality = modality
    ds.SeriesNumber = 3
    ds.SeriesDescription = "volume test"
    ds.PatientID = "VOL001"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    return ds


def _pixels(g: Geometry, seed: int) -> np.ndarray:
    """Random slices (k, rows, columns); slice k's mean grows with k so misordering shows."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 200, (g.n, g.rows, g.columns))
    return (noise + 300 * np.arange(g.n)[:, None, None]).astype(np.uint16)


def make_classic(
    g: Geometry,
    *,
    modality: str = "CT",
    slope: float = 1.0,
    intercept: float = -1024.0,
    seed: int = 0,
) -> tuple[list[Dataset], np.ndarray]:
    """Slices in spatial order (ascending along the normal) and their stored pixel values."""
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    pixels = _pixels(g, seed)
    numbers = random.Random(seed).sample(range(1, g.n + 1), g.n)  # InstanceNumber unrelated
    out = []
    for k in range(g.n):
        ds = _base(CT if modality == "CT" else MR, modality, study, series, frame)
        ds.InstanceNumber = numbers[k]
        ds.ImagePositionPatient = _ds(g.position(k))
        ds.ImageOrientationPatient = _ds([*g.row, *g.col])
        ds.PixelSpacing = _ds([g.row_spacing, g.col_spacing])
        ds.SliceThickness = format_number_as_ds(g.dz * 1.5)  # not the spacing: must be ignored
        ds.RescaleSlope, ds.RescaleIntercept = _ds([slope, intercept])
        ds.Rows, ds.Columns = g.rows, g.columns
        ds.PixelData = pixels[k].tobytes()
        out.append(ds)
    return out, pixels


def make_enhanced(
    g: Geometry,
    *,
    sop_class: str = ENHANCED_MR,
    slope: float = 1.0,
    intercept: float = 0.0,
    per_frame_measures: bool = False,
    seed: int = 0,
) -> tuple[Dataset, np.ndarray]:
    """One enhanced multi-frame instance whose frames are stored in shuffled spatial order."""
    pixels = _pixels(g, seed)
    order = random.Random(seed + 1).sample(range(g.n), g.n)  # frame f holds slice order[f]
    ds = _base(
        sop_class, "MR" if sop_class == ENHANCED_MR else "CT", *(generate_uid() for _ in "abc")
    )
    ds.InstanceNumber = 1
    ds.NumberOfFrames = g.n
    ds.Rows, ds.Columns = g.rows, g.columns
    measures = Dataset()
    measures.PixelSpacing = _ds([g.row_spacing, g.col_spacing])
    measures.SliceThickness = format_number_as_ds(g.dz)
    orientation = Dataset()
    orientation.ImageOrientationPatient = _ds([*g.row, *g.col])
    transform = Dataset()
    transform.RescaleSlope, transform.RescaleIntercept = _ds([slope, intercept])
    transform.RescaleType = "HU" if sop_class == ENHANCED_CT else "US"
    shared = Dataset()
    shared.PlaneOrientationSequence = DicomSequence([orientation])
    shared.PixelValueTransformationSequence = DicomSequence([transform])
    if not per_frame_measures:
        shared.PixelMeasuresSequence = DicomSequence([measures])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    items = []
    for k in order:
        item = Dataset()
        position = Dataset()
        position.ImagePositionPatient = _ds(g.position(k))
        item.PlanePositionSequence = DicomSequence([position])
        content = Dataset()
        content.InStackPositionNumber = k + 1
        item.FrameContentSequence = DicomSequence([content])
        if per_frame_measures:
            item.PixelMeasuresSequence = DicomSequence([measures])
        items.append(item)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(items)
    ds.PixelData = pixels[order].tobytes()
    return ds, pixels


def write(folder: Path, datasets: list[Dataset], seed: int = 0) -> list[Path]:
    """Write in shuffled order under names unrelated to position; paths shuffled too."""
    folder.mkdir(parents=True, exist_ok=True)
    shuffled = random.Random(seed).sample(datasets, len(datasets))
    paths = []
    for i, ds in enumerate(shuffled):
        path = folder / f"f{(i * 7919) % 1000:03d}_{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def itk_read(folder: Path) -> Any:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def check_known_geometry(vol: SeriesVolume, g: Geometry, expected: np.ndarray) -> None:
    """Voxel index → physical point matches each slice's ImagePositionPatient; values match."""
    image = vol.image
    assert image.GetSize() == (g.columns, g.rows, g.n)
    assert image.GetPixelID() == sitk.sitkFloat32
    np.testing.assert_allclose(image.GetSpacing(), (g.col_spacing, g.row_spacing, g.dz), atol=1e-6)
    for k, (ds, number) in enumerate(vol.frames):
        ipp = (
            ds.ImagePositionPatient
            if number is None
            else ds.PerFrameFunctionalGroupsSequence[number - 1]
            .PlanePositionSequence[0]
            .ImagePositionPatient
        )
        np.testing.assert_allclose(image.TransformIndexToPhysicalPoint((0, 0, k)), ipp, atol=1e-6)
        np.testing.assert_allclose(ipp, g.position(k), atol=1e-6)
        i, j = g.columns - 1, g.rows - 2
        point = g.position(k) + i * g.col_spacing * g.row + j * g.row_spacing * g.col
        np.testing.assert_allclose(image.TransformIndexToPhysicalPoint((i, j, k)), point, atol=1e-6)
        assert image.TransformPhysicalPointToIndex(tuple(point)) == (i, j, k)
    np.testing.assert_allclose(sitk.GetArrayFromImage(image), expected, rtol=1e-6)


GEOMETRIES = {
    "axial-rotated": AXIAL_ROTATED,
    "sagittal": SAGITTAL,
    "coronal": CORONAL,
    "oblique": OBLIQUE,
}


@pytest.mark.parametrize("name", GEOMETRIES)
def test_classic_series_matches_simpleitk_and_known_geometry(tmp_path: Path, name: str) -> None:
    g = GEOMETRIES[name]
    datasets, pixels = make_classic(g, slope=0.5, intercept=-10.0, seed=len(name))
    paths = write(tmp_path, datasets)
    vol = load_series(paths)

    reference = itk_read(tmp_path)
    np.testing.assert_allclose(vol.image.GetOrigin(), reference.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(vol.image.GetSpacing(), reference.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(vol.image.GetDirection(), reference.GetDirection(), atol=1e-5)
    np.testing.assert_allclose(
        sitk.GetArrayFromImage(vol.image), sitk.GetArrayFromImage(reference), atol=1e-3
    )
    check_known_geometry(vol, g, pixels * 0.5 - 10.0)
    assert [d.SOPInstanceUID for d in vol.datasets] == [d.SOPInstanceUID for d in datasets]
    assert all(number is None for _, number in vol.frames)
    assert [int(d.InstanceNumber) for d in vol.datasets] != sorted(
        d.InstanceNumber for d in datasets
    )
    assert vol.series_instance_uid == datasets[0].SeriesInstanceUID
    assert vol.study_instance_uid == datasets[0].StudyInstanceUID
    assert vol.frame_of_reference_uid == datasets[0].FrameOfReferenceUID
    assert vol.modality == "CT"
    assert "PixelData" in vol.datasets[0] and vol.datasets[0].PatientID == "VOL001"


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless, JPEGLSLossless])
def test_compressed_series(tmp_path: Path, syntax: str) -> None:
    g = replace(OBLIQUE, rows=40, columns=48)  # OpenJPEG's default resolutions need >= 32 px
    datasets, pixels = make_classic(g, modality="MR", slope=1.0, intercept=0.0, seed=5)
    for ds in datasets:
        ds.compress(syntax)
    paths = write(tmp_path, datasets)
    assert pydicom.dcmread(paths[0]).file_meta.TransferSyntaxUID == syntax
    vol = load_series(paths)
    check_known_geometry(vol, g, pixels.astype(np.float32))
    reference = itk_read(tmp_path)
    np.testing.assert_allclose(vol.image.GetOrigin(), reference.GetOrigin(), atol=1e-5)
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(vol.image), sitk.GetArrayFromImage(reference).astype(np.float32)
    )
    assert vol.modality == "MR"


@pytest.mark.parametrize(
    ("sop_class", "per_frame_measures", "compress"),
    [(ENHANCED_MR, False, False), (ENHANCED_CT, True, False), (ENHANCED_MR, False, True)],
)
def test_enhanced_multiframe_matches_classic(
    tmp_path: Path, sop_class: str, per_frame_measures: bool, compress: bool
) -> None:
    g = OBLIQUE
    enhanced, pixels = make_enhanced(
        g, sop_class=sop_class, slope=2.0, intercept=-1024.0, per_frame_measures=per_frame_measures
    )
    if compress:
        enhanced.compress(RLELossless)
    vol = load_series(write(tmp_path / "enhanced", [enhanced]))
    check_known_geometry(vol, g, pixels * 2.0 - 1024.0)
    assert len(vol.datasets) == 1 and vol.datasets[0].SOPInstanceUID == enhanced.SOPInstanceUID
    frame_numbers = [number or 0 for _, number in vol.frames]
    assert sorted(frame_numbers) == list(range(1, g.n + 1))
    assert frame_numbers != sorted(frame_numbers)  # frames were stored out of spatial order
    # slice k is the frame whose In-Stack Position is k + 1
    for k, (ds, number) in enumerate(vol.frames):
        assert number is not None
        item = ds.PerFrameFunctionalGroupsSequence[number - 1]
        assert item.FrameContentSequence[0].InStackPositionNumber == k + 1

    classic, _ = make_classic(g, slope=2.0, intercept=-1024.0)
    reference = load_series(write(tmp_path / "classic", classic))
    for attribute in ("GetOrigin", "GetSpacing", "GetDirection"):
        np.testing.assert_allclose(
            getattr(vol.image, attribute)(), getattr(reference.image, attribute)(), atol=1e-6
        )
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(vol.image), sitk.GetArrayFromImage(reference.image)
    )


def test_single_slice_uses_slice_thickness(tmp_path: Path) -> None:
    datasets, pixels = make_classic(CORONAL, seed=3)
    vol = load_series(write(tmp_path, datasets[2:3]))
    assert vol.image.GetSize() == (CORONAL.columns, CORONAL.rows, 1)
    np.testing.assert_allclose(vol.image.GetSpacing(), (0.6, 0.8, CORONAL.dz * 1.5), atol=1e-6)
    np.testing.assert_allclose(vol.image.GetOrigin(), CORONAL.position(2), atol=1e-6)
    np.testing.assert_allclose(sitk.GetArrayFromImage(vol.image)[0], pixels[2] - 1024.0)
    del datasets[2].SliceThickness
    vol = load_series(write(tmp_path / "nothick", datasets[2:3]))
    assert vol.image.GetSpacing()[2] == 1.0


# --- rejected series -------------------------------------------------------------------------


def _series(tmp_path: Path, change: Callable[[list[Dataset]], list[Dataset]]) -> list[Path]:
    datasets, _ = make_classic(AXIAL_ROTATED, seed=9)
    return write(tmp_path, change(datasets))


def _set(index: int, keyword: str, value: Any) -> Callable[[list[Dataset]], list[Dataset]]:
    def change(datasets: list[Dataset]) -> list[Dataset]:
        setattr(datasets[index], keyword, value)
        return datasets

    return change


def _delete(index: int, keyword: str) -> Callable[[list[Dataset]], list[Dataset]]:
    def change(datasets: list[Dataset]) -> list[Dataset]:
        delattr(datasets[index], keyword)
        return datasets

    return change


def _shift(index: int, millimetres: float) -> Callable[[list[Dataset]], list[Dataset]]:
    def change(datasets: list[Dataset]) -> list[Dataset]:
        position = AXIAL_ROTATED.position(index) + millimetres * AXIAL_ROTATED.normal
        datasets[index].ImagePositionPatient = _ds(position)
        return datasets

    return change


def _resize(datasets: list[Dataset]) -> list[Dataset]:
    datasets[4].Rows = AXIAL_ROTATED.rows // 2
    datasets[4].PixelData = datasets[4].PixelData[: len(datasets[4].PixelData) // 2]
    return datasets


def _drop_slice(datasets: list[Dataset]) -> list[Dataset]:
    return datasets[:4] + datasets[5:]


def _no_pixels(datasets: list[Dataset]) -> list[Dataset]:
    del datasets[1].PixelData
    return datasets


REJECTED: dict[str, tuple[Callable[[list[Dataset]], list[Dataset]], str]] = {
    "mixed series": (_set(3, "SeriesInstanceUID", "1.2.3.4"), r"differ in SeriesInstanceUID"),
    "mixed frame of reference": (_set(3, "FrameOfReferenceUID", "1.2.3.5"), r"FrameOfReferenceUID"),
    "varying orientation": (
        _set(5, "ImageOrientationPatient", _ds([1, 0, 0, 0, 1, 0])),
        r"orientation varies: .*instance",
    ),
    "varying size": (_resize, r"differ in size \(rows x columns: 10x24, 20x24\)"),
    "varying pixel spacing": (_set(2, "PixelSpacing", ["0.8", "0.7"]), r"pixel spacing varies"),
    "gap": (_drop_slice, r"gap\(s\).*4\.000 mm between 36\.000 and 40\.000"),
    "uneven spacing": (_shift(4, 0.3), r"uneven spacing.*2\.300 mm between 36\.000 and 38\.300"),
    "duplicate position": (_shift(4, -2.0), r"duplicate slice position.*several stacks"),
    "gantry tilt": (
        lambda d: [
            _set(
                k,
                "ImagePositionPatient",
                _ds(AXIAL_ROTATED.position(k) + np.array([0, 0.2 * k, 0])),
            )(d)[k]
            for k in range(len(d))
        ],
        r"not stacked along their normal",
    ),
    "missing position": (_delete(6, "ImagePositionPatient"), r"lacks ImagePositionPatient"),
    "missing spacing": (_delete(0, "PixelSpacing"), r"lacks PixelSpacing"),
    "missing frame of reference": (_delete(0, "FrameOfReferenceUID"), r"lacks FrameOfReferenceUID"),
    "bad orientation": (
        _set(0, "ImageOrientationPatient", _ds([1, 0, 0, 1, 0, 0])),
        r"not two orthogonal unit vectors",
    ),
    "no pixel data": (_no_pixels, r"is not an image \(no Pixel Data"),
}


@pytest.mark.parametrize("case", REJECTED)
def test_inconsistent_series_is_rejected(tmp_path: Path, case: str) -> None:
    change, message = REJECTED[case]
    paths = _series(tmp_path, change)
    series_uid = pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID
    with pytest.raises(VolumeError, match=message) as caught:
        load_series(paths)
    assert f"series {series_uid}" in str(caught.value) or "series 1.2.3.4" in str(caught.value)


def test_unreadable_and_empty_input(tmp_path: Path) -> None:
    bad = tmp_path / "junk.dcm"
    bad.write_bytes(b"not dicom at all" * 20)
    with pytest.raises(VolumeError, match=r"junk\.dcm: not a readable DICOM file"):
        load_series([bad])
    with pytest.raises(VolumeError, match="no files given"):
        load_series([])


def test_multiframe_without_functional_groups_is_rejected(tmp_path: Path) -> None:
    enhanced, _ = make_enhanced(AXIAL_ROTATED)
    del enhanced.PerFrameFunctionalGroupsSequence
    enhanced.ImagePositionPatient = _ds(AXIAL_ROTATED.origin)
    with pytest.raises(VolumeError, match=r"8 frames but no per-frame functional groups"):
        load_series(write(tmp_path, [enhanced]))


# --- resampling ------------------------------------------------------------------------------


def _like(array: np.ndarray, source: Any) -> Any:
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(source)
    return image


def _labels(source: Any) -> np.ndarray:
    rng = np.random.default_rng(4)
    shape = sitk.GetArrayViewFromImage(source).shape
    labels: np.ndarray = rng.integers(0, 4, shape).astype(np.uint8)
    return labels


@pytest.mark.parametrize("name", ["sagittal", "oblique"])
@pytest.mark.parametrize("orientation", ["LPS", "RAS", "none"])
def test_label_round_trip_is_exact(tmp_path: Path, name: str, orientation: str) -> None:
    g = GEOMETRIES[name]
    source = load_series(write(tmp_path, make_classic(g)[0])).image
    labels = _labels(source)
    label = _like(labels, source)
    moved = to_model_grid(label, orientation, None, "nearest")  # type: ignore[arg-type]
    if orientation == "RAS" and name == "sagittal":
        # the sagittal stack (normal -x) becomes x: right, y: anterior, z: superior
        np.testing.assert_allclose(np.diag(np.reshape(moved.GetDirection(), (3, 3))), [-1, -1, 1])
        assert moved.GetSize() != source.GetSize()
    resampled = to_model_grid(label, orientation, moved.GetSpacing(), "nearest")  # type: ignore[arg-type]
    for model in (moved, resampled):
        back = to_source_grid(model, source)
        assert back.GetPixelID() == sitk.sitkUInt8
        assert back.GetSize() == source.GetSize()
        np.testing.assert_allclose(back.GetOrigin(), source.GetOrigin(), atol=1e-9)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(back), labels)


def test_blob_two_times_coarser_and_back_keeps_dice(tmp_path: Path) -> None:
    g = Geometry(OBLIQUE.row, OBLIQUE.col, OBLIQUE.origin, 0.9, 0.7, 1.5, 56, 64, 36)
    source = load_series(write(tmp_path, make_classic(g)[0])).image
    size = np.array(source.GetSize())
    centre = source.TransformContinuousIndexToPhysicalPoint(tuple((size - 1) / 2 + [3, -2, 1]))
    points = np.stack(np.meshgrid(*(np.arange(s) for s in size), indexing="ij"), -1).reshape(-1, 3)
    direction = np.reshape(source.GetDirection(), (3, 3))
    physical = source.GetOrigin() + (points * source.GetSpacing()) @ direction.T
    inside = np.linalg.norm(physical - centre, axis=1) < 18.0  # mm
    blob = inside.reshape(*size).transpose(2, 1, 0).astype(np.float32)  # → (z, y, x)
    assert 3000 < blob.sum() < blob.size / 2

    reoriented = to_model_grid(_like(blob, source), "RAS")
    coarse_spacing = tuple(2 * s for s in reoriented.GetSpacing())
    model_input = to_model_grid(_like(blob, source), "RAS", coarse_spacing, "linear")
    np.testing.assert_allclose(np.array(model_input.GetSize()) * 2, reoriented.GetSize(), atol=1)
    old_centre = reoriented.TransformContinuousIndexToPhysicalPoint(
        tuple((np.array(reoriented.GetSize()) - 1) / 2)
    )
    new_centre = model_input.TransformContinuousIndexToPhysicalPoint(
        tuple((np.array(model_input.GetSize()) - 1) / 2)
    )
    np.testing.assert_allclose(new_centre, old_centre, atol=1e-6)

    model_label = sitk.Cast(model_input > 0.5, sitk.sitkUInt8)  # the "model"
    back = sitk.GetArrayFromImage(to_source_grid(model_label, source))
    dice = 2 * np.logical_and(back, blob).sum() / (back.sum() + blob.sum())
    assert dice >= 0.95, dice


def test_to_source_grid_label_types(tmp_path: Path) -> None:
    source = load_series(write(tmp_path, make_classic(CORONAL)[0])).image
    labels = _labels(source).astype(np.int32) * 100
    back = to_source_grid(_like(labels, source), source)
    assert back.GetPixelID() == sitk.sitkUInt16
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), labels)
    small = to_source_grid(_like((labels // 100).astype(np.float32), source), source)
    assert small.GetPixelID() == sitk.sitkUInt8
    with pytest.raises(VolumeError, match="whole numbers from 0 to 65535"):
        to_source_grid(_like(labels.astype(np.float32) - 0.5, source), source)
    with pytest.raises(VolumeError, match="unknown orientation 'RPI'"):
        to_model_grid(source, "RPI")  # type: ignore[arg-type]
    with pytest.raises(VolumeError, match="must be 3 positive numbers"):
        to_model_grid(source, "LPS", (1.0, 0.0, 1.0))
