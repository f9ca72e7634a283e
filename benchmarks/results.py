"""Result encoding: a 512x512x300 label map with 10 structures -> DICOM-SEG (and RTSTRUCT later).

The source is a generated axial CT series given as header-only datasets (the encoders need the
geometry and identifiers, not the pixels); the label map holds ``structures`` ellipsoids, some
nested, one structure declared but absent. Each encoding is timed ``rounds`` times and the median
printed, for encoding alone and for encoding plus writing the file to memory.

Usage::

    python -m benchmarks.results [--slices 300] [--size 512] [--structures 10] [--rounds 3]

This is a measurement, not a test: nothing here passes or fails on a number (target: SEG < 3 s).
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from runners.seg import SegType, encode_seg
from runners.structures import Structure, default_structure

__all__ = ["Row", "bench_seg", "main", "make_label_map", "make_sources", "make_structures"]

_CT = "1.2.840.10008.5.1.4.1.1.2"


@dataclass(frozen=True)
class Row:
    """One line of the results table (seconds are medians over the rounds)."""

    encoder: str
    variant: str
    encode_s: float
    encode_write_s: float
    megabytes: float
    note: str = ""


def make_sources(slices: int, size: int) -> list[Dataset]:
    """Header-only axial CT datasets, 0.8 mm pixels, 1.5 mm slices, sorted by position."""
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    out = []
    for k in range(slices):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = _CT
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = "B1", "Bench", "", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260101", "120000", "1", ""
        ds.ReferringPhysicianName, ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "", "CT", 1, k
        ds.ImagePositionPatient = [-200.0, -200.0, 1.5 * k]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing, ds.SliceThickness = [0.8, 0.8], 1.5
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        out.append(ds)
    return out


def make_structures(count: int) -> list[Structure]:
    """``count`` structures labelled 1..count."""
    return [default_structure(i, f"Structure {i}", "object") for i in range(1, count + 1)]


def make_label_map(slices: int, size: int, count: int, seed: int = 0) -> npt.NDArray[np.uint8]:
    """Ellipsoids for labels 1..count-1 (later ones may sit in earlier ones); ``count`` absent."""
    rng = np.random.default_rng(seed)
    out = np.zeros((slices, size, size), np.uint8)
    k = np.arange(slices)[:, None, None]
    i = np.arange(size)[None, :, None]
    j = np.arange(size)[None, None, :]
    for value in range(1, count):
        centre = rng.uniform(0.3, 0.7, 3) * (slices, size, size)
        radii = rng.uniform(0.05, 0.25, 3) * (slices, size, size)
        lo = np.maximum(np.floor(centre - radii).astype(int), 0)
        hi = np.minimum(np.ceil(centre + radii).astype(int) + 1, (slices, size, size))
        box = (
            ((k[lo[0] : hi[0]] - centre[0]) / radii[0]) ** 2
            + ((i[:, lo[1] : hi[1]] - centre[1]) / radii[1]) ** 2
            + ((j[:, :, lo[2] : hi[2]] - centre[2]) / radii[2]) ** 2
        ) <= 1
        out[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]][box] = value
    return out


def bench_seg(
    label: npt.NDArray[np.uint8],
    sources: Sequence[Dataset],
    structures: Sequence[Structure],
    *,
    seg_type: SegType = "binary",
    rounds: int = 3,
) -> Row:
    """Time ``encode_seg`` (and encode + write to memory) on the given input."""
    encode_times, total_times, size = [], [], 0
    for _ in range(rounds):
        start = time.perf_counter()
        seg = encode_seg(
            label,
            sources,
            structures,
            algorithm_name="bench",
            algorithm_version="1",
            seg_type=seg_type,
        )
        encoded = time.perf_counter()
        buffer = io.BytesIO()
        seg.save_as(buffer, enforce_file_format=True)
        total_times.append(time.perf_counter() - start)
        encode_times.append(encoded - start)
        size = buffer.tell()
        del seg, buffer
    frames = label.shape[0] * (len(structures) if seg_type == "binary" else 1)
    return Row(
        encoder="dicomnode SEG (highdicom)",
        variant=seg_type.upper(),
        encode_s=statistics.median(encode_times),
        encode_write_s=statistics.median(total_times),
        megabytes=size / 1e6,
        note=f"{frames} frames",
    )


def _table(rows: Sequence[Row]) -> str:
    lines = [
        "| encoder | variant | encode s | encode + write s | MB | note |",
        "|---|---|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.encoder} | {r.variant} | {r.encode_s:.2f} | {r.encode_write_s:.2f} "
            f"| {r.megabytes:.1f} | {r.note} |"
        )
    return "\n".join(lines)


def main(args: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512, help="rows and columns")
    parser.add_argument("--structures", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    opts = parser.parse_args(args)

    sources = make_sources(opts.slices, opts.size)
    structures = make_structures(opts.structures)
    label = make_label_map(opts.slices, opts.size, opts.structures)
    print(
        f"label map {opts.slices}x{opts.size}x{opts.size}, {opts.structures} structures "
        f"({len(np.unique(label)) - 1} present), median of {opts.rounds} rounds\n"
    )
    rows = [
        bench_seg(label, sources, structures, seg_type=kind, rounds=opts.rounds)
        for kind in ("binary", "labelmap")
    ]
    print(_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
