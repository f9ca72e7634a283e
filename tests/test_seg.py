"""DICOM-SEG encoder: a generated CT series -> SEG on disk -> highdicom readback, dciodvfy."""

from __future__ import annotations

import subprocess
import warnings
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, SegmentationStorage, generate_uid

from runners.seg import encode_seg, segment_numbers
from runners.structures import Structure, default_structure
from tests.conftest import require_tool

CT_IMAGE_STORAGE = CTImageStorage
SEG_STORAGE = SegmentationStorage
LABELMAP_SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.7"  # not in pydicom 3.0's UID list

ROWS, COLUMNS = 64, 48
PIXEL_SPACING = (0.8, 1.1)  # between rows, between columns (mm)
SLICE_SPACING = 2.5  # mm


def _rotation(ax: float, az: float) -> npt.NDArray[np.float64]:
    """Rotation about x by ``ax`` then about z by ``az`` (degrees)."""
    a, c = np.radians(ax), np.radians(az)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    out: npt.NDArray[np.float64] = rz @ rx
    return out


OBLIQUE = _rotation(20.0, 15.0) @ np.eye(3)  # columns: row direction, column direction, normal
SAGITTAL = np.array([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])  # row=+y, col=-z


def make_ct(tmp: Path, slices: int, axes: npt.NDArray[np.float64]) -> list[Path]:
    """Write a CT series on ``axes`` (3x3, columns: row dir, column dir, normal); returns paths
    in a shuffled order (the caller sorts, as a receiver would)."""
    row_dir, col_dir, normal = axes[:, 0], axes[:, 1], axes[:, 2]
    assert np.allclose(np.cross(row_dir, col_dir), normal)
    origin = np.array([-30.0, -20.0, 40.0])
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    rng = np.random.default_rng(1)
    paths = []
    for k in range(slices):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SOPClassUID = CT_IMAGE_STORAGE
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientID, ds.PatientName = "SEG001", "Phantom^Seg"
        ds.PatientBirthDate, ds.PatientSex = "19700101", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID = "20260101", "120000", "1"
        ds.AccessionNumber, ds.ReferringPhysicianName = "ACC1", ""
        ds.Modality, ds.Manufacturer = "CT", "dicomnode tests"
        ds.SeriesNumber, ds.InstanceNumber = 2, k + 1
        ds.PositionReferenceIndicator = ""
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.KVP = 120
        ds.AcquisitionNumber = 1
        ds.ImagePositionPatient = [round(float(v), 4) for v in origin + k * SLICE_SPACING * normal]
        ds.ImageOrientationPatient = [round(float(v), 6) for v in (*row_dir, *col_dir)]
        ds.PixelSpacing = list(PIXEL_SPACING)
        ds.SliceThickness = SLICE_SPACING
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = ROWS, COLUMNS
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.PixelData = rng.integers(0, 2000, (ROWS, COLUMNS), dtype=np.int16).tobytes()
        path = tmp / f"ct{k:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return list(rng.permutation(paths))  # type: ignore[arg-type]


def read_sorted(paths: Sequence[Path]) -> list[Dataset]:
    """Read a series and sort it by position along the slice normal."""
    datasets = [pydicom.dcmread(p) for p in paths]
    iop = np.array(datasets[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    return sorted(datasets, key=lambda ds: float(np.dot(ds.ImagePositionPatient, normal)))


def phantom(shape: tuple[int, int, int], outer: int, inner: int) -> npt.NDArray[np.uint8]:
    """An ellipsoid (``outer``) with a smaller sphere (``inner``) nested in it, off centre."""
    k, i, j = np.indices(shape)
    sz, sy, sx = shape
    out = np.zeros(shape, np.uint8)
    out[
        ((k - sz / 2) / (sz / 3)) ** 2 + ((i - sy / 2) / 20) ** 2 + ((j - sx / 2) / 15) ** 2 <= 1
    ] = outer
    out[((k - sz / 2 - 2) * 2.5) ** 2 + (i - sy / 2 + 4) ** 2 + (j - sx / 2 - 3) ** 2 <= 36] = inner
    return out


def dciodvfy(path: Path) -> list[str]:
    """Run dciodvfy; return its error lines (warnings are printed, not returned)."""
    proc = subprocess.run(
        [require_tool("dciodvfy"), str(path)], capture_output=True, text=True, timeout=60
    )
    lines = (proc.stdout + proc.stderr).splitlines()
    for line in lines:
        if "Warning" in line:
            print("dciodvfy:", line)
    return [line for line in lines if "Error" in line]


def source_affine(datasets: Sequence[Dataset]) -> npt.NDArray[np.float64]:
    """Index (slice, row, column) -> patient mm, from the source series' own attributes."""
    iop = np.array(datasets[0].ImageOrientationPatient, dtype=float)
    first = np.array(datasets[0].ImagePositionPatient, dtype=float)
    step = np.array(datasets[1].ImagePositionPatient, dtype=float) - first
    affine = np.eye(4)
    affine[:3, 0] = step
    affine[:3, 1] = iop[3:] * float(datasets[0].PixelSpacing[0])
    affine[:3, 2] = iop[:3] * float(datasets[0].PixelSpacing[1])
    affine[:3, 3] = first
    return affine


def to_labels(
    numbers: npt.NDArray[np.generic], structures: Sequence[Structure]
) -> npt.NDArray[np.int64]:
    """Segment numbers back to structure labels."""
    lut = np.zeros(len(structures) + 1, np.int64)
    for label, number in segment_numbers(structures).items():
        lut[number] = label
    out: npt.NDArray[np.int64] = lut[numbers]
    return out


ORGANS = [
    default_structure(1, "Liver", "liver"),
    default_structure(2, "Tumour", "tumor"),
    default_structure(3, "Spleen", "spleen"),  # absent from the volume
]


def check_metadata(
    seg: hd.seg.Segmentation, sources: Sequence[Dataset], structures: Sequence[Structure]
) -> None:
    src = sources[0]
    assert seg.StudyInstanceUID == src.StudyInstanceUID
    assert seg.SeriesInstanceUID != src.SeriesInstanceUID
    assert seg.FrameOfReferenceUID == src.FrameOfReferenceUID
    assert (seg.PatientID, str(seg.PatientName)) == (src.PatientID, str(src.PatientName))
    assert (seg.PatientBirthDate, seg.PatientSex) == (src.PatientBirthDate, src.PatientSex)
    assert seg.AccessionNumber == src.AccessionNumber
    assert seg.Modality == "SEG" and seg.Manufacturer == "dicomnode"
    assert seg.ContentLabel == "PHANTOM_NET_V2"
    assert "ContentCreatorName" in seg and not seg.ContentCreatorName
    assert seg.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    (ref_series,) = seg.ReferencedSeriesSequence
    assert ref_series.SeriesInstanceUID == src.SeriesInstanceUID
    assert {r.ReferencedSOPInstanceUID for r in ref_series.ReferencedInstanceSequence} == {
        ds.SOPInstanceUID for ds in sources
    }
    numbers = segment_numbers(structures)
    assert seg.segment_numbers == sorted(numbers.values())
    for s in structures:
        desc = seg.get_segment_description(numbers[s.label])
        assert desc.segment_label == s.name
        category, kind = desc.segmented_property_category, desc.segmented_property_type
        assert (category.value, category.scheme_designator, category.meaning) == (
            s.category.value,
            s.category.scheme,
            s.category.meaning,
        )
        assert (kind.value, kind.scheme_designator, kind.meaning) == (
            s.type.value,
            s.type.scheme,
            s.type.meaning,
        )
        assert desc.algorithm_type == hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
        (algo,) = desc.algorithm_identification or []
        assert (algo.AlgorithmName, algo.AlgorithmVersion) == ("phantom-net v2", "2.1.0")
        assert algo.AlgorithmFamilyCodeSequence[0].CodeMeaning == "Artificial Intelligence"
        rgb = hd.color.CIELabColor.from_dicom_value(desc.RecommendedDisplayCIELabValue).to_rgb()
        assert np.abs(np.array(rgb) - np.array(s.color)).max() <= 1


def encode_and_check(
    tmp_path: Path,
    axes: npt.NDArray[np.float64],
    structures: Sequence[Structure],
    outer: int,
    inner: int,
    seg_type: str,
    validate: bool,
) -> None:
    sources = read_sorted(make_ct(tmp_path, 40, axes))
    label = phantom((40, ROWS, COLUMNS), outer, inner)
    assert set(np.unique(label)) == {0, outer, inner}  # the phantom really has both structures

    ds = encode_seg(
        label,
        sources,
        structures,
        algorithm_name="phantom-net v2",
        algorithm_version="2.1.0",
        seg_type=seg_type,  # type: ignore[arg-type]
        series_description="Phantom SEG",
    )
    path = tmp_path / "seg.dcm"
    ds.save_as(path, enforce_file_format=True)

    seg = hd.seg.segread(path)
    labelmap = seg_type == "labelmap"
    assert seg.SOPClassUID == (LABELMAP_SEG_STORAGE if labelmap else SEG_STORAGE)
    assert seg.SegmentationType == seg_type.upper()
    # Every slice has a frame for every segment (BINARY) or one frame (LABELMAP), empty or not.
    assert int(seg.NumberOfFrames) == 40 * (1 if labelmap else len(structures))
    assert (seg.SeriesNumber, seg.SeriesDescription) == (901, "Phantom SEG")
    check_metadata(seg, sources, structures)

    # Slice by slice through the referenced source instances.
    uids = [s.SOPInstanceUID for s in sources]
    numbers = seg.get_pixels_by_source_instance(uids, combine_segments=True)
    np.testing.assert_array_equal(to_labels(numbers, structures), label)

    # The volume highdicom builds from the SEG's own plane positions sits on the source grid.
    volume = seg.get_volume(combine_segments=True)
    expected = source_affine(sources)
    if np.dot(volume.affine[:3, 0], expected[:3, 0]) < 0:  # highdicom may stack the other way
        volume = volume.flip_spatial(0)
    np.testing.assert_allclose(volume.affine, expected, atol=1e-3)
    np.testing.assert_array_equal(to_labels(volume.array, structures), label)

    errors = dciodvfy(path)
    if not validate and any("Information Object Not found" in e for e in errors):
        # dciodvfy does not know this SOP class (the 2022 build and LABELMAP): nothing to check.
        print("dciodvfy does not know", seg.SOPClassUID, "- checked by highdicom readback only")
    else:
        assert errors == [], "\n".join(errors)


def test_binary_oblique_round_trip_and_dciodvfy(tmp_path: Path) -> None:
    encode_and_check(tmp_path, OBLIQUE, ORGANS, 1, 2, "binary", validate=True)


def test_binary_sagittal_sparse_labels(tmp_path: Path) -> None:
    # Labels 4 and 9 with 7 declared but absent: segments 1..3 in label order.
    structures = [
        default_structure(9, "Lesion", "lesion", color=(10, 200, 30)),
        default_structure(4, "Brain", "brain"),
        default_structure(7, "Edema", "edema"),
    ]
    encode_and_check(tmp_path, SAGITTAL, structures, 4, 9, "binary", validate=True)


def test_labelmap_oblique_round_trip(tmp_path: Path) -> None:
    # The installed dciodvfy (2022) does not know the LABELMAP SOP class: highdicom readback only
    # (dciodvfy still runs: once it knows the class, its errors fail this test).
    encode_and_check(tmp_path, OBLIQUE, ORGANS, 1, 2, "labelmap", validate=False)


def test_multiframe_source_with_frame_mapping(tmp_path: Path) -> None:
    singles = read_sorted(make_ct(tmp_path, 12, OBLIQUE))
    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(
        singles[::-1], generate_uid(), 3, generate_uid(), 1
    )
    mf_path = tmp_path / "enhanced.dcm"
    enhanced.save_as(mf_path, enforce_file_format=True)
    source = pydicom.dcmread(mf_path)
    # Frame f of the enhanced image holds singles[::-1][f - 1]; slice k is singles[k].
    frame_of = {ds.SOPInstanceUID: 12 - k for k, ds in enumerate(singles)}
    frames: list[tuple[Dataset, int | None]] = [
        (source, frame_of[ds.SOPInstanceUID]) for ds in singles
    ]
    label = phantom((12, ROWS, COLUMNS), 1, 2)

    ds = encode_seg(
        label,
        [source],
        ORGANS,
        algorithm_name="phantom-net v2",
        algorithm_version="2.1.0",
        frames=frames,
    )
    path = tmp_path / "seg.dcm"
    ds.save_as(path, enforce_file_format=True)
    seg = hd.seg.segread(path)
    numbers = seg.get_pixels_by_source_frame(
        source.SOPInstanceUID,
        source_frame_numbers=[f for _, f in frames if f is not None],
        combine_segments=True,
    )
    np.testing.assert_array_equal(to_labels(numbers, ORGANS), label)
    errors = dciodvfy(path)
    assert errors == [], "\n".join(errors)

    with pytest.raises(ValueError, match="12 frames"):
        encode_seg(label[:5], [source], ORGANS, algorithm_name="a", algorithm_version="1")


def test_rejects_undeclared_labels_and_mismatched_series(tmp_path: Path) -> None:
    sources = read_sorted(make_ct(tmp_path, 4, OBLIQUE))
    label = np.zeros((4, ROWS, COLUMNS), np.int32)
    label[1, 5, 5], label[2, 6, 6], label[3, 7, 7] = 1, 6, 11
    with pytest.raises(ValueError, match=r"\[6, 11\]"):
        encode_seg(label, sources, ORGANS, algorithm_name="a", algorithm_version="1")
    sparse = [default_structure(5, "A"), default_structure(11, "B")]
    with pytest.raises(ValueError, match=r"\[1, 6\]"):
        encode_seg(label, sources, sparse, algorithm_name="a", algorithm_version="1")
    with pytest.raises(ValueError, match="3 slices but 4 source datasets"):
        encode_seg(label[:3] * 0, sources, ORGANS, algorithm_name="a", algorithm_version="1")
    with pytest.raises(ValueError, match=r"\[-1\]"):
        encode_seg(-label.clip(0, 1), sources, ORGANS, algorithm_name="a", algorithm_version="1")
    with pytest.raises(ValueError, match="integer array"):
        encode_seg(label * 0.5, sources, ORGANS, algorithm_name="a", algorithm_version="1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="more than once"):
        encode_seg(
            label * 0, sources, [*ORGANS, ORGANS[0]], algorithm_name="a", algorithm_version="1"
        )


def test_single_component_patient_name_is_not_logged(tmp_path: Path) -> None:
    # highdicom warns about "ANONYMOUS"-style names and quotes them: a patient identifier in the
    # logs. pytest turns warnings into errors, so this fails if the warning gets through.
    sources = read_sorted(make_ct(tmp_path, 3, SAGITTAL))
    for ds in sources:
        ds.PatientName = "ANONYMOUS"
    label = np.zeros((3, ROWS, COLUMNS), np.uint8)
    label[1, 10:20, 10:20] = 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        seg = encode_seg(label, sources, ORGANS, algorithm_name="a", algorithm_version="1")
    assert [str(w.message) for w in caught] == []
    assert seg.PatientName == "ANONYMOUS"


def test_frames_for_single_frame_series_must_match(tmp_path: Path) -> None:
    sources = read_sorted(make_ct(tmp_path, 3, OBLIQUE))
    label = np.zeros((3, ROWS, COLUMNS), np.uint8)
    same: list[tuple[Dataset, int | None]] = [(ds, None) for ds in sources]
    seg = encode_seg(label, sources, ORGANS, algorithm_name="a", algorithm_version="1", frames=same)
    assert int(seg.NumberOfFrames) == 9
    with pytest.raises(ValueError, match="frames must be None"):
        encode_seg(
            label, sources, ORGANS, algorithm_name="a", algorithm_version="1", frames=same[::-1]
        )
