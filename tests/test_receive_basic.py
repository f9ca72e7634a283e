"""End to end over a real association: DCMTK storescu -> dicomnode serve -> index and disk."""

from __future__ import annotations

from pathlib import Path

import pydicom

from tests.conftest import storescu, wait_for


def test_storescu_series_is_stored_indexed_and_completes(make_node, ct_files: list[Path]) -> None:
    node = make_node()
    storescu(node.port, ct_files)

    studies = node.studies()
    assert len(studies) == 1
    study = studies[0]
    sent = pydicom.dcmread(ct_files[0])
    assert study["study_instance_uid"] == sent.StudyInstanceUID
    assert study["patient_id"] == "PAT001"
    assert study["instances"] == len(ct_files)
    assert [s["instances"] for s in study["series"]] == [len(ct_files)]
    assert study["series"][0]["modality"] == "CT"
    assert study["series"][0]["source"]["calling_ae"] == "STORESCU"

    # Stored exactly as received: same dataset bytes after the file meta.
    stored = {pydicom.dcmread(p).SOPInstanceUID: p for p in node.storage_files()}
    assert len(stored) == len(ct_files)
    for f in ct_files:
        ds = pydicom.dcmread(f)
        kept = pydicom.dcmread(stored[ds.SOPInstanceUID])
        assert kept.PixelData == ds.PixelData
        assert kept.file_meta.SourceApplicationEntityTitle == "STORESCU"

    done = wait_for(
        lambda: [s for s in node.studies() if s["state"] == "complete"],
        timeout=20,
        what="completion",
    )
    assert done[0]["completion_reason"] == "settled"


def test_same_instance_twice_is_stored_once_and_counted(make_node, ct_files: list[Path]) -> None:
    node = make_node()
    storescu(node.port, ct_files[:3])
    storescu(node.port, ct_files[:3])
    study = node.studies()[0]
    assert study["instances"] == 3
    assert study["duplicates"] == 3
    assert len(node.storage_files()) == 3
