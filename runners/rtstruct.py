"""RT Structure Set encoder for label maps, and rasterisation of structure sets back to a grid.

``encode_rtstruct`` turns a label map aligned with a classic single-frame series into an RT
Structure Set that planning systems load:

- one ROI per structure, closed planar contours in patient coordinates on the source slices,
  every contour referencing the image it lies on; any orientation (axial, sagittal, coronal,
  oblique) and any in-plane spacing (see ``runners.contours`` for the geometry);
- holes as separate closed contours on the same slice, to be filled with the even-odd rule
  (a contour inside another is a hole, an island in the hole a third contour), which is how
  Eclipse, RayStation and most planning systems read nested contours; no keyholes;
- several islands on a slice as several contours; a single voxel as a 4-point diamond; no
  contour with fewer than 3 points;
- coordinates rounded to 0.001 mm and written in at most 16 characters (|coordinate| < 1e9 mm);
- a structure with no voxels keeps its ROI (Structure Set ROI, ROI Contour without a Contour
  Sequence, RT ROI Observation), so the receiver sees that the model ran and found nothing;
- the structure's codes in the RT ROI Observations Module: Segmented Property Category Code
  Sequence (category) and RT ROI Identification Code Sequence (type), both Type 3 there.

``rasterize_rtstruct`` fills each ROI's closed planar contours back onto the source grid with the
even-odd rule.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from datetime import datetime

import numpy as np
import numpy.typing as npt
from pydicom.charset import default_encoding
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import Tag
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian, generate_uid
from scipy.ndimage import find_objects

from runners.contours import SlicePlane, fill_even_odd, mask_contours, slice_plane
from runners.structures import Code, Structure

__all__ = ["RT_STRUCTURE_SET_STORAGE", "encode_rtstruct", "rasterize_rtstruct"]

logger = logging.getLogger(__name__)

RT_STRUCTURE_SET_STORAGE = UID("1.2.840.10008.5.1.4.1.1.481.3")
# Referenced SOP Class in RT Referenced Study Sequence: what planning systems write and expect.
_STUDY_COMPONENT_SOP_CLASS = "1.2.840.10008.3.1.2.3.1"
_AI_FAMILY = Code("123110", "Artificial Intelligence", "DCM")
_CONTOUR_DATA = Tag(0x3006, 0x0050)
_MAX_COORDINATE_MM = 1e9  # keeps "-123456789.123" within the 16 characters of a DS
_MAX_LABEL = 65535

_PATIENT_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex")
_PATIENT_OPTIONAL = (
    "IssuerOfPatientID",
    "OtherPatientIDsSequence",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
)
_STUDY_TYPE2 = ("StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber")
_STUDY_OPTIONAL = ("StudyDescription",)


def _code_item(code: Code) -> Dataset:
    item = Dataset()
    item.CodeValue = code.value
    item.CodingSchemeDesignator = code.scheme
    item.CodeMeaning = code.meaning
    return item


def _check_text(value: str, what: str, limit: int) -> str:
    if not value or len(value) > limit or re.search(r"[\\\x00-\x1f]", value):
        raise ValueError(
            f"{what} {value!r} must be 1 to {limit} characters without backslashes or "
            "control characters"
        )
    return value


def _ds_bytes(points: npt.NDArray[np.float64]) -> bytes:
    """(n, 3) points in mm → the DS multi-value bytes, each value rounded to 0.001 mm.

    The shortest repr of a float rounded to 3 decimals has at most 3 decimals, so a value
    below 1e9 mm in magnitude takes at most 14 characters. Adding 0.0 turns -0.0 into 0.0.
    """
    rounded = np.round(points, 3) + 0.0
    text = "\\".join(map(repr, rounded.ravel().tolist())).encode("ascii")
    return text + b" " if len(text) % 2 else text


def _contour_item(
    points: npt.NDArray[np.float64], number: int, sop_class: str, sop_instance: str
) -> Dataset:
    image = Dataset()
    image.ReferencedSOPClassUID = sop_class
    image.ReferencedSOPInstanceUID = sop_instance
    item = Dataset()
    item.ContourImageSequence = [image]
    item.ContourGeometricType = "CLOSED_PLANAR"
    item.NumberOfContourPoints = len(points)
    item.ContourNumber = number
    value = _ds_bytes(points)
    # Pre-formatted bytes: pydicom writes a raw element unchanged when the item's encoding is
    # the one being written, instead of building and re-formatting millions of DS objects.
    # Reading the attribute still gives DS values.
    item[_CONTOUR_DATA] = RawDataElement(_CONTOUR_DATA, "DS", len(value), value, 0, False, True)
    item.set_original_encoding(False, True, default_encoding)
    return item


def _check_inputs(
    label: npt.NDArray[np.generic],
    source_datasets: Sequence[Dataset],
    structures: Sequence[Structure],
) -> list[SlicePlane]:
    if not source_datasets:
        raise ValueError("no source images: the RTSTRUCT needs the series it was segmented on")
    if not np.issubdtype(label.dtype, np.integer) and label.dtype != np.bool_:
        raise TypeError(f"label map must be an integer array, not {label.dtype}")
    first = source_datasets[0]
    for attr in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        values = {str(ds.get(attr, "")) for ds in source_datasets}
        if len(values) != 1 or "" in values:
            raise ValueError(f"source images must share one non-empty {attr}; found {values}")
    for ds in source_datasets:
        if int(ds.get("NumberOfFrames", 1) or 1) != 1:
            raise ValueError(
                f"image {ds.SOPInstanceUID} is multi-frame; RTSTRUCT encoding needs a classic "
                "single-frame series"
            )
    planes = [slice_plane(ds) for ds in source_datasets]
    expected = (len(source_datasets), planes[0].rows, planes[0].columns)
    if label.shape != expected or any((p.rows, p.columns) != expected[1:] for p in planes):
        raise ValueError(
            f"label map of shape {label.shape} does not match the source series "
            f"(slices, rows, columns) = {expected} with equal Rows and Columns on every image"
        )
    if not structures:
        raise ValueError("no structures: an RT Structure Set needs at least one ROI")
    labels = [s.label for s in structures]
    names = [s.name for s in structures]
    if len(set(labels)) != len(labels) or len(set(names)) != len(names):
        raise ValueError(f"structure labels and names must be unique: {labels}, {names}")
    for s in structures:
        if not 0 < s.label <= _MAX_LABEL:
            raise ValueError(f"structure {s.name!r} has label {s.label}; use 1 to {_MAX_LABEL}")
        _check_text(s.name, "ROI name", 64)
        if len(s.color) != 3 or any(not 0 <= c <= 255 for c in s.color):
            raise ValueError(f"structure {s.name!r} has colour {s.color}; use three 0-255 values")
    if "SOPClassUID" not in first:
        raise ValueError("source images lack SOPClassUID")
    return planes


def _header(
    first: Dataset,
    *,
    algorithm_name: str,
    algorithm_version: str,
    series_number: int,
    structure_set_label: str,
    now: datetime,
) -> Dataset:
    sop_instance = generate_uid()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = RT_STRUCTURE_SET_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = sop_instance
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    if "SpecificCharacterSet" in first:
        ds.SpecificCharacterSet = first.SpecificCharacterSet
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    # SOP Common
    ds.SOPClassUID = RT_STRUCTURE_SET_STORAGE
    ds.SOPInstanceUID = sop_instance
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    # Patient and General Study, copied from the source so the result files with the study.
    for keyword in _PATIENT_TYPE2 + _STUDY_TYPE2:
        setattr(ds, keyword, first.get(keyword, ""))
    for keyword in _PATIENT_OPTIONAL + _STUDY_OPTIONAL:
        if keyword in first:
            setattr(ds, keyword, first.get(keyword))
    ds.StudyInstanceUID = first.StudyInstanceUID
    # RT Series: a new series in the study.
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = series_number
    ds.SeriesDate, ds.SeriesTime = date, time
    ds.SeriesDescription = f"{algorithm_name} {algorithm_version}".strip()[:64]
    ds.OperatorsName = ""
    # General Equipment
    ds.Manufacturer = "dicomnode"
    ds.ManufacturerModelName = algorithm_name[:64]
    ds.SoftwareVersions = algorithm_version[:64]
    # Frame of Reference
    ds.FrameOfReferenceUID = first.FrameOfReferenceUID
    ds.PositionReferenceIndicator = first.get("PositionReferenceIndicator", "")
    # Structure Set
    ds.StructureSetLabel = structure_set_label
    ds.StructureSetName = f"{algorithm_name} {algorithm_version}".strip()[:64]
    ds.InstanceNumber = 1
    ds.StructureSetDate, ds.StructureSetTime = date, time
    return ds


def _referenced_frame(source_datasets: Sequence[Dataset]) -> Dataset:
    first = source_datasets[0]
    images = []
    for src in source_datasets:
        image = Dataset()
        image.ReferencedSOPClassUID = src.SOPClassUID
        image.ReferencedSOPInstanceUID = src.SOPInstanceUID
        images.append(image)
    series = Dataset()
    series.SeriesInstanceUID = first.SeriesInstanceUID
    series.ContourImageSequence = images
    study = Dataset()
    study.ReferencedSOPClassUID = _STUDY_COMPONENT_SOP_CLASS
    study.ReferencedSOPInstanceUID = first.StudyInstanceUID
    study.RTReferencedSeriesSequence = [series]
    frame = Dataset()
    frame.FrameOfReferenceUID = first.FrameOfReferenceUID
    frame.RTReferencedStudySequence = [study]
    return frame


def _roi_items(
    number: int, structure: Structure, frame_uid: str, algorithm_name: str, version: str
) -> tuple[Dataset, Dataset]:
    roi = Dataset()
    roi.ROINumber = number
    roi.ReferencedFrameOfReferenceUID = frame_uid
    roi.ROIName = structure.name
    roi.ROIGenerationAlgorithm = "AUTOMATIC"
    roi.ROIGenerationDescription = f"{algorithm_name} {version}".strip()[:64]
    algorithm = Dataset()
    algorithm.AlgorithmFamilyCodeSequence = [_code_item(_AI_FAMILY)]
    algorithm.AlgorithmName = algorithm_name[:64]
    algorithm.AlgorithmVersion = version[:64]
    roi.ROIDerivationAlgorithmIdentificationSequence = [algorithm]

    observation = Dataset()
    observation.ObservationNumber = number
    observation.ReferencedROINumber = number
    observation.SegmentedPropertyCategoryCodeSequence = [_code_item(structure.category)]
    observation.RTROIIdentificationCodeSequence = [_code_item(structure.type)]
    observation.RTROIInterpretedType = structure.rt_type
    observation.ROIInterpreter = ""
    return roi, observation


def encode_rtstruct(
    label: npt.NDArray[np.generic],
    source_datasets: Sequence[Dataset],
    structures: Sequence[Structure],
    *,
    algorithm_name: str,
    algorithm_version: str,
    series_number: int = 902,
    structure_set_label: str | None = None,
) -> Dataset:
    """Encode a label map as an RT Structure Set (explicit VR little endian) on its source series.

    ``label`` is a (slices, rows, columns) integer array aligned voxel for voxel with the classic
    single-frame ``source_datasets``: ``label[k]`` belongs to ``source_datasets[k]`` (callers
    usually sort by position along the normal, but nothing here depends on the order). Each
    structure's voxels are those equal to its ``label``; other values are ignored.

    ``structure_set_label`` defaults to the first 16 characters of ``algorithm_name``; a label
    given explicitly must have at most 16 characters. Raises ``ValueError``/``TypeError`` when
    the inputs do not fit together (shape, geometry, one study/series/frame of reference,
    unique structure labels and names).
    """
    label = np.asarray(label)
    planes = _check_inputs(label, source_datasets, structures)
    _check_text(algorithm_name, "algorithm name", 64)
    if structure_set_label is None:
        structure_set_label = algorithm_name[:16].strip() or "dicomnode"
    _check_text(structure_set_label, "StructureSetLabel", 16)
    first = source_datasets[0]
    ds = _header(
        first,
        algorithm_name=algorithm_name,
        algorithm_version=algorithm_version,
        series_number=series_number,
        structure_set_label=structure_set_label,
        now=datetime.now(),
    )
    ds.ReferencedFrameOfReferenceSequence = [_referenced_frame(source_datasets)]

    if label.dtype == np.bool_:
        label = label.view(np.uint8)
    max_label = max((s.label for s in structures), default=0)
    boxes = find_objects(label, max_label=max_label) if max_label else []
    known = {s.label for s in structures}
    unknown = [str(i + 1) for i, box in enumerate(boxes) if box is not None and i + 1 not in known]
    if label.size and int(label.max()) > max_label:
        unknown.append(f"above {max_label}")
    if unknown:
        logger.warning("label values %s have no structure and are not encoded", unknown)

    roi_items, contour_items, observation_items = [], [], []
    for number, structure in enumerate(structures, start=1):
        roi, observation = _roi_items(
            number, structure, first.FrameOfReferenceUID, algorithm_name, algorithm_version
        )
        roi_items.append(roi)
        observation_items.append(observation)
        roi_contour = Dataset()
        roi_contour.ReferencedROINumber = number
        roi_contour.ROIDisplayColor = list(structure.color)
        contours: list[Dataset] = []
        box = boxes[structure.label - 1]
        if box is not None:
            zs, ys, xs = box
            sub = label[zs, ys, xs] == structure.label
            for dk in range(sub.shape[0]):
                k = zs.start + dk
                plane, src = planes[k], source_datasets[k]
                for points in mask_contours(sub[dk]):
                    patient = plane.to_patient(points[:, 0] + ys.start, points[:, 1] + xs.start)
                    if np.abs(patient).max() >= _MAX_COORDINATE_MM:
                        raise ValueError(f"image {src.SOPInstanceUID} lies beyond 1e9 mm")
                    contours.append(
                        _contour_item(
                            patient, len(contours) + 1, src.SOPClassUID, src.SOPInstanceUID
                        )
                    )
        if contours:
            roi_contour.ContourSequence = DicomSequence(contours)
        else:
            logger.info("structure %r is empty; its ROI is kept without contours", structure.name)
        contour_items.append(roi_contour)

    ds.StructureSetROISequence = roi_items
    ds.ROIContourSequence = contour_items
    ds.RTROIObservationsSequence = observation_items
    return ds


def rasterize_rtstruct(
    ds: Dataset, source_datasets: Sequence[Dataset]
) -> dict[str, npt.NDArray[np.bool_]]:
    """ROI name → (slices, rows, columns) mask on the grid of ``source_datasets``.

    Each CLOSED_PLANAR contour is filled on the image it references (Contour Image Sequence),
    or, without a usable reference, on the image whose plane it lies in (within half the
    distance to the next slice); contours of one ROI on one image combine with the even-odd
    rule. Contours off every source plane, and other geometric types, are skipped with a
    warning.
    """
    planes = [slice_plane(src) for src in source_datasets]
    by_uid = {str(src.SOPInstanceUID): k for k, src in enumerate(source_datasets)}
    shape = (len(planes), planes[0].rows, planes[0].columns)
    normal = planes[0].normal
    heights = np.array([p.origin @ normal for p in planes])
    gaps = np.diff(np.sort(heights))
    tolerance = 0.5 * float(gaps[gaps > 1e-3].min()) if np.any(gaps > 1e-3) else 0.5

    contours_by_roi = {
        int(item.ReferencedROINumber): item.get("ContourSequence", [])
        for item in ds.get("ROIContourSequence", [])
    }
    out: dict[str, npt.NDArray[np.bool_]] = {}
    for roi in ds.get("StructureSetROISequence", []):
        name = str(roi.ROIName)
        if name in out:
            raise ValueError(f"ROI name {name!r} occurs more than once in the structure set")
        per_slice: dict[int, list[tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]]] = {}
        for contour in contours_by_roi.get(int(roi.ROINumber), []):
            if contour.get("ContourGeometricType") != "CLOSED_PLANAR":
                logger.warning("ROI %r: skipping a %s contour", name, contour.ContourGeometricType)
                continue
            points = np.asarray(contour.ContourData, dtype=np.float64).reshape(-1, 3)
            refs = contour.get("ContourImageSequence", [])
            k = by_uid.get(str(refs[0].ReferencedSOPInstanceUID), -1) if refs else -1
            if k < 0:
                offsets = np.abs(heights - float(points.mean(axis=0) @ normal))
                k = int(offsets.argmin())
                if offsets[k] > tolerance:
                    logger.warning("ROI %r: skipping a contour off every source slice", name)
                    continue
            rows, cols, _ = planes[k].to_pixel(points)
            per_slice.setdefault(k, []).append((rows, cols))
        mask = np.zeros(shape, dtype=np.bool_)
        for k, polygons in per_slice.items():
            mask[k] = fill_even_odd(polygons, shape[1:])
        out[name] = mask
    return out
