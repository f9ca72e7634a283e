"""RTSTRUCT encoding: dicomnode's encoder against rt-utils on the same label map and series.

A 512x512x300 CT series (real files, random pixel data, 0.98 x 0.98 x 2 mm) and a label map of
10 structures on it (body with the organs cut out of it, paired lungs, heart, liver holding a
tumour whose necrotic core is liver again, spleen, two kidneys under one label, a spinal cord
inside a ring-shaped vertebra) are written to a temporary folder. Then, in the same run:

- dicomnode: read the series headers (``stop_before_pixels``), sort by position along the
  normal, ``encode_rtstruct``, ``save_as``;
- rt-utils 1.2.7: ``RTStructBuilder.create_new`` on the series folder, ``add_roi`` per
  structure (masks prepared outside the timed part), ``save``. rt-utils pulls full
  ``opencv-python``, which clashes with the ``opencv-python-headless`` of this environment, so
  it runs as a subprocess in its own virtual environment, created here with ``python3 -m venv``
  and ``pip install rt-utils==1.2.7`` (or reused with ``--rtutils-venv``).

Both results are read back and rasterised onto the grid with the even-odd rule
(``rasterize_rtstruct``), and their Dice against the label map is printed; rt-utils traces
contours through boundary pixel centres, so its outlines lie half a pixel inside the mask.

Usage::

    python -m benchmarks.results_rtstruct [--slices 300] [--size 512] [--rounds 1]
        [--rtutils-venv DIR] [--keep]

This is a measurement, not a test: figures depend on the machine and on what else runs on it,
which is why the reference runs in the same invocation.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import numpy.typing as npt
from pydicom import dcmread

from runners.rtstruct import encode_rtstruct, rasterize_rtstruct
from runners.structures import Structure, default_structure
from tests.dicomgen import make_series, write_series

RTUTILS = "rt-utils==1.2.7"
PIXEL = 0.9765625  # mm
SLICE = 2.0  # mm

STRUCTURES = [
    default_structure(1, "Body", "body"),
    default_structure(2, "Lung_L", "lung"),
    default_structure(3, "Lung_R", "lung", color=(170, 140, 120)),
    default_structure(4, "Heart", "heart"),
    default_structure(5, "Liver", "liver"),
    default_structure(6, "Spleen", "spleen"),
    default_structure(7, "Kidneys", "kidney"),
    default_structure(8, "SpinalCord", "spinal_cord"),
    default_structure(9, "Vertebra", "bone"),
    default_structure(10, "Tumor", "tumor"),
]

_RTUTILS_SCRIPT = r"""
import json, sys, time
import numpy as np
from rt_utils import RTStructBuilder

series_dir, label_path, out_path, spec = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
structures = json.loads(spec)
label = np.load(label_path)
t0 = time.perf_counter()
rtstruct = RTStructBuilder.create_new(dicom_series_path=series_dir)
t1 = time.perf_counter()
encode = 0.0
for s in structures:
    mask = np.ascontiguousarray((label == s["label"]).transpose(1, 2, 0))  # rows, cols, slices
    start = time.perf_counter()
    rtstruct.add_roi(mask=mask, color=s["color"], name=s["name"])
    encode += time.perf_counter() - start
t2 = time.perf_counter()
rtstruct.save(out_path)
t3 = time.perf_counter()
print(json.dumps({"load": t1 - t0, "encode": encode, "write": t3 - t2}))
"""


def _phantom(slices: int, size: int) -> npt.NDArray[np.uint8]:
    """The label map, drawn slice by slice (coordinates in pixels from the image centre)."""
    label = np.zeros((slices, size, size), dtype=np.uint8)
    scale = size / 512  # organ sizes are given for a 512-pixel field of view
    sz = slices / 300  # and for 300 slices
    y, x = np.ogrid[:size, :size]
    y = (y - size / 2) / scale
    x = (x - size / 2) / scale

    def ellipsoid(
        k: int, cx: float, cy: float, rx: float, ry: float, cz: float, rz: float
    ) -> npt.NDArray[np.bool_] | None:
        f = 1 - ((k - cz * sz) / (rz * sz)) ** 2
        if f <= 0:
            return None
        return (x - cx) ** 2 / (rx**2 * f) + (y - cy) ** 2 / (ry**2 * f) <= 1

    for k in range(slices):
        out = label[k]
        out[(x / 230) ** 2 + (y / 170) ** 2 <= 1] = 1
        for value, args in (
            (2, (90, -20, 60, 80, 200, 70)),
            (3, (-90, -20, 60, 80, 200, 70)),
            (4, (20, 20, 50, 50, 150, 35)),
            (5, (-70, 30, 90, 70, 100, 45)),
            (6, (110, 60, 35, 35, 100, 25)),
            (7, (90, 100, 28, 28, 80, 30)),
            (7, (-90, 100, 28, 28, 80, 30)),
            (10, (-70, 30, 25, 25, 100, 12)),
            (5, (-70, 30, 10, 10, 100, 5)),  # the tumour's necrotic core is liver again
        ):
            inside = ellipsoid(k, *args)
            if inside is not None:
                out[inside] = value
        r2 = x**2 + (y - 130) ** 2
        out[(r2 <= 30**2) & (r2 > 12**2)] = 9
        out[r2 <= 8**2] = 8
    return label


def _dice(a: npt.NDArray[np.bool_], b: npt.NDArray[np.bool_]) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.count_nonzero(a & b)) / total


def _rtutils_python(venv: Path | None, work: Path) -> Path:
    if venv is not None and (venv / "bin" / "python").exists():
        return venv / "bin" / "python"
    venv = venv or work / "rtutils-venv"
    python3 = shutil.which("python3") or sys.executable
    print(f"creating {venv} and installing {RTUTILS} (its own opencv-python) ...", flush=True)
    subprocess.run([python3, "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [str(venv / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check", RTUTILS],
        check=True,
    )
    return venv / "bin" / "python"


def _ours(files: list[Path], label: npt.NDArray[np.uint8], out: Path) -> dict[str, float]:
    t0 = time.perf_counter()
    sources = [dcmread(f, stop_before_pixels=True) for f in files]
    first = sources[0]
    iop = np.asarray([float(v) for v in first.ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    sources.sort(key=lambda ds: float(np.asarray(ds.ImagePositionPatient, dtype=float) @ normal))
    t1 = time.perf_counter()
    ds = encode_rtstruct(
        label, sources, STRUCTURES, algorithm_name="benchmark", algorithm_version="1"
    )
    t2 = time.perf_counter()
    ds.save_as(out, enforce_file_format=True)
    t3 = time.perf_counter()
    return {"load": t1 - t0, "encode": t2 - t1, "write": t3 - t2}


def _theirs(
    python: Path, series: Path, label_path: Path, out: Path, script: Path
) -> dict[str, float]:
    spec = json.dumps(
        [{"label": s.label, "name": s.name, "color": list(s.color)} for s in STRUCTURES]
    )
    proc = subprocess.run(
        [str(python), str(script), str(series), str(label_path), str(out), spec],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"rt-utils failed:\n{proc.stdout}\n{proc.stderr}")
    result: dict[str, float] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def _median(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}


def _summary(
    path: Path, sources: list[Path], label: npt.NDArray[np.uint8]
) -> tuple[int, int, float]:
    """(contours, points, minimum Dice over the non-empty structures) of a written RTSTRUCT."""
    ds = dcmread(path)
    headers = [dcmread(f, stop_before_pixels=True) for f in sources]
    contours = points = 0
    for item in ds.ROIContourSequence:
        for contour in item.get("ContourSequence", []):
            contours += 1
            points += int(contour.NumberOfContourPoints)
    masks = rasterize_rtstruct(ds, headers)
    by_name: dict[str, Structure] = {s.name: s for s in STRUCTURES}
    dice = min(_dice(masks[name], label == s.label) for name, s in by_name.items())
    return contours, points, dice


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--rtutils-venv", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="rtstruct-bench-"))
    try:
        python = _rtutils_python(args.rtutils_venv, work)
        print(f"generating {args.slices} x {args.size}x{args.size} CT series in {work}", flush=True)
        datasets = make_series(
            args.slices, rows=args.size, columns=args.size, spacing=(PIXEL, PIXEL, SLICE)
        )
        files = write_series(work / "ct", datasets)
        del datasets
        label = _phantom(args.slices, args.size)
        label_path = work / "label.npy"
        np.save(label_path, label)
        script = work / "rtutils_run.py"
        script.write_text(_RTUTILS_SCRIPT)

        ours_runs, theirs_runs = [], []
        for r in range(args.rounds):
            theirs_runs.append(
                _theirs(python, work / "ct", label_path, work / "theirs.dcm", script)
            )
            ours_runs.append(_ours(files, label, work / "ours.dcm"))
            print(
                f"round {r + 1}: dicomnode {ours_runs[-1]}, rt-utils {theirs_runs[-1]}", flush=True
            )
        ours, theirs = _median(ours_runs), _median(theirs_runs)
        quality = {
            "dicomnode": _summary(work / "ours.dcm", files, label),
            "rt-utils 1.2.7": _summary(work / "theirs.dcm", files, label),
        }
        sizes = {
            "dicomnode": (work / "ours.dcm").stat().st_size,
            "rt-utils 1.2.7": (work / "theirs.dcm").stat().st_size,
        }
        print()
        print(
            f"{args.slices} slices of {args.size}x{args.size}, {len(STRUCTURES)} structures, "
            f"{np.count_nonzero(label)} labelled voxels; median of {args.rounds} round(s); "
            f"{platform.processor() or platform.machine()}, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC"
        )
        print()
        print(
            "| encoder | load s | encode s | write s | total s | x rt-utils | contours | points "
            "| MB | min Dice |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        total_theirs = sum(theirs.values())
        for name, t in (("dicomnode", ours), ("rt-utils 1.2.7", theirs)):
            total = sum(t.values())
            contours, points, dice = quality[name]
            print(
                f"| {name} | {t['load']:.2f} | {t['encode']:.2f} | {t['write']:.2f} | "
                f"{total:.2f} | {total / total_theirs:.2f} | {contours} | {points} | "
                f"{sizes[name] / 1e6:.1f} | {dice:.4f} |"
            )
        print()
        enc_ours = ours["encode"] + ours["write"]
        enc_theirs = theirs["encode"] + theirs["write"]
        print(
            f"encode + write: dicomnode {enc_ours:.2f} s, rt-utils {enc_theirs:.2f} s, "
            f"ratio {enc_ours / enc_theirs:.3f}; total ratio "
            f"{sum(ours.values()) / total_theirs:.3f} (target <= 0.5)"
        )
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
