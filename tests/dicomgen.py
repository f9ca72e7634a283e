"""Generated DICOM test data with real geometry (CT series, MR series)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

__all__ = ["CT_IMAGE_STORAGE", "MR_IMAGE_STORAGE", "encoded", "make_series", "write_series"]

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


def make_series(
    n: int = 10,
    *,
    rows: int = 64,
    columns: int = 64,
    modality: str = "CT",
    study_uid: str | None = None,
    series_uid: str | None = None,
    patient_id: str = "PAT001",
    patient_name: str = "Test^Patient",
    series_description: str = "Generated series",
    series_number: int = 1,
    spacing: tuple[float, float, float] = (0.7, 0.7, 2.5),
    seed: int = 0,
) -> list[Dataset]:
    """An axial series of ``n`` slices with consistent geometry and random pixel data."""
    rng = np.random.default_rng(seed)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_uid = generate_uid()
    sop_class = CT_IMAGE_STORAGE if modality == "CT" else MR_IMAGE_STORAGE
    out = []
    for i in range(n):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = sop_class
        sop_uid = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = sop_uid
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.PatientID = patient_id
        ds.PatientName = patient_name
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "O"
        ds.StudyDate = "20260101"
        ds.StudyTime = "120000"
        ds.AccessionNumber = "ACC" + patient_id[-3:]
        ds.StudyID = "1"
        ds.StudyDescription = "Generated study"
        ds.ReferringPhysicianName = ""
        ds.Modality = modality
        ds.Manufacturer = "dicomnode tests"
        ds.SeriesDescription = series_description
        ds.SeriesNumber = series_number
        ds.InstanceNumber = i + 1
        ds.BodyPartExamined = "HEAD"
        ds.ImagePositionPatient = [-100.0, -100.0, i * spacing[2]]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [spacing[0], spacing[1]]
        ds.SliceThickness = spacing[2]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = rows
        ds.Columns = columns
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        if modality == "CT":
            ds.RescaleIntercept = -1024
            ds.RescaleSlope = 1
        ds.PixelData = rng.integers(0, 4095, (rows, columns), dtype=np.uint16).tobytes()
        out.append(ds)
    return out


def write_series(folder: Path, datasets: list[Dataset]) -> list[Path]:
    """Write datasets as Part 10 files named by instance number; returns the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in datasets:
        path = folder / f"{ds.Modality}{int(ds.SeriesNumber):03d}_{int(ds.InstanceNumber):05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def mni_t1_series(folder: Path, series_description: str = "T1 MNI152") -> list[Path]:
    """nilearn's bundled MNI152 T1 template (2 mm) written as an axial DICOM MR series."""
    import tempfile

    import nibabel as nib
    import SimpleITK as sitk
    from nilearn.datasets import load_mni152_template

    with tempfile.TemporaryDirectory() as tmp:
        nifti = Path(tmp) / "mni.nii.gz"
        nib.save(load_mni152_template(resolution=2), str(nifti))
        image = sitk.ReadImage(str(nifti), sitk.sitkFloat32)  # LPS, like DICOM
    array = sitk.GetArrayFromImage(image)  # (z, y, x)
    scaled = np.clip(array / max(float(array.max()), 1e-6) * 1000, 0, 4095).astype(np.uint16)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    sx, sy, _sz = image.GetSpacing()
    datasets = make_series(
        scaled.shape[0],
        rows=scaled.shape[1],
        columns=scaled.shape[2],
        modality="MR",
        series_description=series_description,
        patient_id="MNI152",
        patient_name="MNI^Template",
    )
    for k, ds in enumerate(datasets):
        ds.ImagePositionPatient = [
            round(v, 4) for v in image.TransformIndexToPhysicalPoint((0, 0, k))
        ]
        ds.ImageOrientationPatient = [*direction[:, 0].round(6), *direction[:, 1].round(6)]
        ds.PixelSpacing = [sy, sx]
        ds.SliceThickness = image.GetSpacing()[2]
        ds.PixelData = scaled[k].tobytes()
        ds.BodyPartExamined = "HEAD"
    return write_series(folder, datasets)


def encoded(ds: Dataset, transfer_syntax: str = ExplicitVRLittleEndian) -> bytes:
    """A data set as C-STORE carries it: no file meta, little endian, explicit VR unless
    ``transfer_syntax`` is implicit VR little endian."""
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = transfer_syntax == ImplicitVRLittleEndian
    write_dataset(fp, ds)
    return fp.getvalue()
