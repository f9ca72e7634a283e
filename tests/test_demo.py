"""The embedded default's demo: an MR head (nilearn's MNI152 T1) sent by storescu comes back as
a brain SEG and RTSTRUCT stored with the study."""

from __future__ import annotations

import json
from pathlib import Path

import highdicom as hd
import pydicom

from runners.demo_config import DEMO_MODELS, DEMO_RULES
from tests.conftest import storescu, wait_for
from tests.dicomgen import mni_t1_series


def test_demo_brain_extraction_on_an_mr_head(make_node, tmp_path: Path) -> None:
    files = mni_t1_series(tmp_path / "mni")
    node = make_node(
        completion={"settle_seconds": 1, "force_seconds": 600, "check_interval": 0.2},
        models=DEMO_MODELS,
        rules=DEMO_RULES,
    )
    storescu(node.port, files)

    def done() -> list[dict]:
        jobs = json.loads(node.cli("jobs", "--json").stdout)
        return [j for j in jobs if j["state"] in ("succeeded", "failed")]

    job = wait_for(done, 240, what="the brain-extraction job")[0]
    assert job["state"] == "succeeded", job["error"]
    study = node.studies()[0]
    assert sorted(s["modality"] for s in study["results"]) == ["RTSTRUCT", "SEG"]
    assert all(s["modality"] == "MR" for s in study["series"])  # only what was received

    seg_path = next(
        p
        for p in node.storage_files()
        if pydicom.dcmread(p, stop_before_pixels=True).Modality == "SEG"
    )
    seg = hd.seg.segread(seg_path)
    assert seg.get_segment_description(1).SegmentLabel == "Brain"
    volume = seg.get_volume().array
    brain = (volume[..., 0] if volume.ndim == 4 else volume) > 0
    litres = brain.sum() * 8 / 1e6  # 2 mm isotropic voxels
    # The MNI152 template is an enlarged average brain: its own brain mask holds 1.88 litres.
    assert 1.5 <= litres <= 2.2, litres
