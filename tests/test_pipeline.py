"""End to end: storescu sends a CT phantom -> rule -> TorchScript model -> SEG and RTSTRUCT
arrive at a DCMTK storescp and at Orthanc; the SEG reads back with highdicom and both pass
dciodvfy."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import torch
from pydicom.uid import generate_uid

from runners.rtstruct import rasterize_rtstruct
from tests.conftest import require_tool, storescu, wait_for
from tests.dicomgen import make_series, write_series
from tests.peers import Orthanc, StoreSCP

# TorchScript is the model format users have; torch 2.13 marks scripting as deprecated.
pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated:DeprecationWarning"
)

SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
RTSTRUCT_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"


class _Threshold(torch.nn.Module):
    """Two-class logits: background below 500, foreground above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([500.0 - x, x - 500.0], dim=1)


def _phantom(tmp_path: Path) -> tuple[list[Path], np.ndarray]:
    """An oblique CT series (24 slices, 48 x 40) with a bright ellipsoid; returns the files
    and the true mask in slice order."""
    datasets = make_series(24, rows=40, columns=48, modality="CT", spacing=(0.9, 1.2, 2.0))
    cos, sin = np.cos(np.radians(20)), np.sin(np.radians(20))
    row_dir = np.array([cos, sin, 0.0])
    col_dir = np.array([-sin * cos, cos * cos, sin])
    normal = np.cross(row_dir, col_dir)
    zz, yy, xx = np.mgrid[0:24, 0:40, 0:48]
    mask = ((xx - 24) / 12.0) ** 2 + ((yy - 20) / 9.0) ** 2 + ((zz - 12) / 6.0) ** 2 <= 1.0
    for k, ds in enumerate(datasets):
        ds.ImageOrientationPatient = [*row_dir.round(6).tolist(), *col_dir.round(6).tolist()]
        ds.ImagePositionPatient = (
            (np.array([-30.0, -20.0, 10.0]) + k * 2.0 * normal).round(4).tolist()
        )
        pixels = np.where(mask[k], 2000, 100).astype(np.uint16)  # HU 976 inside, -924 outside
        ds.PixelData = pixels.tobytes()
        ds.SeriesDescription = "Phantom CT"
    return write_series(tmp_path / "ct", datasets), mask


def test_model_results_reach_storescp_and_orthanc(make_node, tmp_path: Path) -> None:
    files, truth = _phantom(tmp_path)
    model = tmp_path / "threshold.pt"
    torch.jit.script(_Threshold()).save(str(model))
    dest = StoreSCP(tmp_path / "dest", "DEST").start()
    pacs = Orthanc(tmp_path / "orthanc").start()
    try:
        node = make_node(
            completion={"settle_seconds": 1, "force_seconds": 600, "check_interval": 0.2},
            nodes={
                "DEST": {"ae_title": "DEST", "host": "127.0.0.1", "port": dest.port},
                "PACS": {"ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.port},
            },
            models={
                "phantom": {
                    "version": "1.0",
                    "kind": "torchscript",
                    "path": str(model),
                    "inputs": ["ct"],
                    "output": {"activation": "softmax"},
                    "structures": [{"label": 1, "name": "Ellipsoid", "type": "lesion"}],
                    "results": ["seg", "rtstruct"],
                }
            },
            rules=[
                {
                    "name": "phantom",
                    "series": {"Modality": "CT"},
                    "action": "run",
                    "pipeline": "phantom",
                    "destinations": ["DEST", "PACS"],
                }
            ],
        )
        storescu(node.port, files)
        wait_for(lambda: len(dest.files()) == 2, 90, what="SEG and RTSTRUCT at storescp")
        wait_for(lambda: len(pacs.instances()) == 2, 30, what="SEG and RTSTRUCT at Orthanc")

        sources = sorted(
            (pydicom.dcmread(f) for f in files),
            key=lambda d: float(
                np.dot(
                    d.ImagePositionPatient,
                    np.cross(
                        np.array(d.ImageOrientationPatient[:3], float),
                        np.array(d.ImageOrientationPatient[3:], float),
                    ),
                )
            ),
        )
        received = {pydicom.dcmread(p).SOPClassUID: p for p in dest.files()}
        assert set(received) == {SEG_CLASS, RTSTRUCT_CLASS}

        seg = hd.seg.segread(received[SEG_CLASS])
        assert seg.StudyInstanceUID == sources[0].StudyInstanceUID
        assert seg.get_segment_description(1).SegmentLabel == "Ellipsoid"
        pixels = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=[d.SOPInstanceUID for d in sources],
            segment_numbers=[1],
        )
        assert np.array_equal(pixels[..., 0] > 0, truth)

        rt = pydicom.dcmread(received[RTSTRUCT_CLASS])
        masks = rasterize_rtstruct(rt, sources)
        ellipsoid = masks["Ellipsoid"]
        dice = 2 * np.sum(ellipsoid & truth) / (ellipsoid.sum() + truth.sum())
        assert dice >= 0.98

        dciodvfy = require_tool("dciodvfy")
        for path in received.values():
            out = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True)
            errors = [ln for ln in (out.stdout + out.stderr).splitlines() if "Error" in ln]
            assert errors == [], errors

        # Results are kept with the study, never routed again.
        jobs = json.loads(node.cli("jobs", "--json").stdout)
        assert [(j["rule"], j["state"]) for j in jobs] == [("phantom", "succeeded")]
        study = node.studies()[0]
        assert len(study["series"]) == 1  # what was received
        assert sorted(r["modality"] for r in study["results"]) == ["RTSTRUCT", "SEG"]
        assert study["instances"] == study["series"][0]["instances"]
    finally:
        dest.stop()
        pacs.stop()


def test_unknown_pipeline_fails_the_job_clearly(make_node, tmp_path: Path) -> None:
    node = make_node(
        completion={"settle_seconds": 1, "force_seconds": 600, "check_interval": 0.2},
        rules=[{"name": "x", "action": "run", "pipeline": "nowhere"}],
    )
    storescu(node.port, write_series(tmp_path / "ct", make_series(2, study_uid=generate_uid())))
    failed = wait_for(
        lambda: [
            j for j in json.loads(node.cli("jobs", "--json").stdout) if j["state"] == "failed"
        ],
        30,
        what="the job to fail",
    )
    assert "pipeline 'nowhere' is not in 'models:'" in failed[0]["error"]


class _TwoChannel(torch.nn.Module):
    """Foreground where both channels are bright (e.g. a lesion seen on T1 and FLAIR)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        both = torch.minimum(x[:, 0:1], x[:, 1:2])
        return torch.cat([500.0 - both, both - 500.0], dim=1)


def test_named_inputs_feed_a_two_channel_model(make_node, tmp_path: Path) -> None:
    study = generate_uid()
    zz, yy, xx = np.mgrid[0:12, 0:32, 0:32]
    t1_blob = ((xx - 12) ** 2 + (yy - 16) ** 2 + (zz - 6) ** 2) <= 36
    flair_blob = ((xx - 18) ** 2 + (yy - 16) ** 2 + (zz - 6) ** 2) <= 36
    series = []
    for number, (name, blob) in enumerate((("T1 AX", t1_blob), ("FLAIR AX", flair_blob)), 1):
        datasets = make_series(
            12,
            rows=32,
            columns=32,
            modality="MR",
            study_uid=study,
            series_description=name,
            series_number=number,
            seed=number,
        )
        frame = datasets[0].FrameOfReferenceUID
        for k, ds in enumerate(datasets):
            ds.FrameOfReferenceUID = frame
            ds.PixelData = np.where(blob[k], 1000, 10).astype(np.uint16).tobytes()
        series += write_series(tmp_path / name.split()[0], datasets)
    model = tmp_path / "both.pt"
    torch.jit.script(_TwoChannel()).save(str(model))
    node = make_node(
        completion={"settle_seconds": 1, "force_seconds": 600, "check_interval": 0.2},
        models={
            "both": {
                "version": "1",
                "kind": "torchscript",
                "path": str(model),
                "inputs": ["t1", "flair"],
                "structures": [{"label": 1, "name": "Overlap", "type": "lesion"}],
                "results": ["seg"],
            }
        },
        rules=[
            {
                "name": "both",
                "inputs": {
                    "t1": {"SeriesDescription": {"glob": "T1*"}},
                    "flair": {"SeriesDescription": {"glob": "*FLAIR*"}},
                },
                "action": "run",
                "pipeline": "both",
            }
        ],
    )
    storescu(node.port, series)

    def finished() -> list[dict]:
        jobs = json.loads(node.cli("jobs", "--json").stdout)
        return [j for j in jobs if j["state"] in ("succeeded", "failed")]

    job = wait_for(finished, 60, what="the job")[0]
    assert job["state"] == "succeeded", job["error"]
    seg_path = next(
        p
        for p in node.storage_files()
        if pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID == SEG_CLASS
    )
    seg = hd.seg.segread(seg_path)
    t1_sources = sorted(
        (pydicom.dcmread(p) for p in series if "T1" in str(pydicom.dcmread(p).SeriesDescription)),
        key=lambda d: float(d.ImagePositionPatient[2]),
    )
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[d.SOPInstanceUID for d in t1_sources], segment_numbers=[1]
    )
    assert np.array_equal(pixels[..., 0] > 0, t1_blob & flair_blob)
