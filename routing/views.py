"""Study views for rules: from the index (in production) or from files (``route test``).

Both expose the same attribute names: DICOM keywords of the attributes the index keeps, the
series' extra attributes, ``instances``, ``ModalitiesInStudy`` and ``source.*``
(``source.kind``, ``source.calling_ae``, ``source.called_ae``, ``source.peer_address``,
``source.folder``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError
from sqlalchemy.orm import Session

from dicomnode.ingest import SERIES_EXTRA_KEYWORDS
from routing.rules import SeriesView, StudyView, flatten_source
from storage.models import Series, Study

__all__ = [
    "SERIES_KEYWORDS",
    "STUDY_KEYWORDS",
    "study_view_from_index",
    "study_views_from_files",
]

# Index column -> DICOM keyword.
STUDY_KEYWORDS = {
    "patient_id": "PatientID",
    "patient_name": "PatientName",
    "patient_birth_date": "PatientBirthDate",
    "patient_sex": "PatientSex",
    "accession_number": "AccessionNumber",
    "study_id": "StudyID",
    "study_date": "StudyDate",
    "study_time": "StudyTime",
    "study_description": "StudyDescription",
    "referring_physician_name": "ReferringPhysicianName",
    "institution_name": "InstitutionName",
}
SERIES_KEYWORDS = {
    "modality": "Modality",
    "series_description": "SeriesDescription",
    "series_number": "SeriesNumber",
    "body_part_examined": "BodyPartExamined",
    "protocol_name": "ProtocolName",
    "manufacturer": "Manufacturer",
    "station_name": "StationName",
    "frame_of_reference_uid": "FrameOfReferenceUID",
    "sop_class_uid": "SOPClassUID",
}


def _finish(view: StudyView, sources: list[dict[str, Any]]) -> StudyView:
    modalities = sorted(
        {str(s.attributes["Modality"]) for s in view.series if s.attributes.get("Modality")}
    )
    view.attributes["ModalitiesInStudy"] = modalities
    view.attributes["StudyInstanceUID"] = view.study_instance_uid
    # A study's source is every source of its series (a list matches when any value does).
    for key in ("kind", "calling_ae", "called_ae", "peer_address", "folder"):
        values = sorted({str(s[key]) for s in sources if s.get(key)})
        if values:
            view.attributes[f"source.{key}"] = values[0] if len(values) == 1 else values
    return view


def study_view_from_index(session: Session, study: Study) -> StudyView:
    """The view of an indexed study."""
    attrs: dict[str, Any] = {
        kw: getattr(study, col) for col, kw in STUDY_KEYWORDS.items() if getattr(study, col)
    }
    attrs["instances"] = study.instances
    view = StudyView(study.study_instance_uid, attrs)
    sources = []
    series: Series
    for series in study.series:
        if series.source_kind == "result":
            continue  # results of jobs are never routed again
        source = {
            "kind": series.source_kind,
            "calling_ae": series.calling_ae,
            "called_ae": series.called_ae,
            "peer_address": series.peer_address,
            "folder": series.source_folder,
        }
        sources.append(source)
        sattrs: dict[str, Any] = dict(series.attributes or {})
        sattrs.update(
            {
                kw: getattr(series, col)
                for col, kw in SERIES_KEYWORDS.items()
                if getattr(series, col) is not None
            }
        )
        sattrs["SeriesInstanceUID"] = series.series_instance_uid
        sattrs["instances"] = series.instances
        sattrs.update(flatten_source(source))
        view.series.append(SeriesView(series.series_instance_uid, sattrs))
    return _finish(view, sources)


def _text(ds: pydicom.Dataset, keyword: str) -> Any:
    try:
        value = ds.get(keyword)
    except Exception:
        return None
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    if keyword == "SeriesNumber":
        try:
            return int(value)
        except (TypeError, ValueError):
            return str(value)
    return str(value).strip()


def _files(paths: Iterable[Path]) -> Iterable[Path]:
    for path in paths:
        if path.is_dir():
            for dirpath, _dirs, names in os.walk(path):
                for name in sorted(names):
                    yield Path(dirpath) / name
        else:
            yield path


def study_views_from_files(
    paths: Iterable[Path], source: dict[str, Any] | None = None
) -> tuple[list[StudyView], list[str]]:
    """Views of the studies in these files or folders, and the files that could not be read."""
    studies: dict[str, StudyView] = {}
    series_index: dict[str, SeriesView] = {}
    skipped: list[str] = []
    source = source or {"kind": "folder"}
    for path in _files(paths):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            study_uid = str(ds.StudyInstanceUID)
            series_uid = str(ds.SeriesInstanceUID)
        except (InvalidDicomError, AttributeError, OSError, ValueError) as exc:
            skipped.append(f"{path}: {exc}")
            continue
        view = studies.get(study_uid)
        if view is None:
            attrs = {kw: v for kw in STUDY_KEYWORDS.values() if (v := _text(ds, kw)) is not None}
            attrs["instances"] = 0
            view = studies[study_uid] = StudyView(study_uid, attrs)
        view.attributes["instances"] += 1
        series = series_index.get(series_uid)
        if series is None:
            keywords = [*SERIES_KEYWORDS.values(), *SERIES_EXTRA_KEYWORDS]
            sattrs = {kw: v for kw in keywords if (v := _text(ds, kw)) is not None}
            sattrs["SeriesInstanceUID"] = series_uid
            sattrs["instances"] = 0
            sattrs.update(flatten_source(source))
            series = series_index[series_uid] = SeriesView(series_uid, sattrs)
            view.series.append(series)
        series.attributes["instances"] += 1
    return [_finish(v, [source]) for v in studies.values()], skipped
