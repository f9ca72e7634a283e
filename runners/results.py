"""Keeping results (SEG, RTSTRUCT) like received instances: durable file, index rows.

Results belong to their study and are linked to the job that made them. Unlike received
instances they never re-open a completed study nor start routing again (a result must not
trigger the rule that produced it), they are not counted in the study's instances and bytes
(those say what was received), and a job run again finds the results it already stored.
"""

from __future__ import annotations

import io
import logging

from pydicom import Dataset
from pydicom.filewriter import dcmwrite
from sqlalchemy import Engine, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from storage.db import utcnow
from storage.filestore import FileStore
from storage.models import Instance, Series, Study

__all__ = ["RESULT_SOURCE", "job_results", "store_result"]

logger = logging.getLogger(__name__)

RESULT_SOURCE = "result"


def job_results(engine: Engine, job_pk: int) -> list[int]:
    """Instance ids of the results a job stored already."""
    with Session(engine) as session:
        return list(
            session.scalars(
                select(Instance.id).where(Instance.job_pk == job_pk).order_by(Instance.id)
            ).all()
        )


def _encode(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def store_result(
    engine: Engine, store: FileStore, ds: Dataset, *, job_pk: int, node_ae: str
) -> int:
    """Write ``ds`` durably under the storage root and index it; returns the instance id."""
    data = _encode(ds)
    study_uid, series_uid, sop_uid = (
        str(ds.StudyInstanceUID),
        str(ds.SeriesInstanceUID),
        str(ds.SOPInstanceUID),
    )
    relative = store.relative_path(study_uid, series_uid, sop_uid)
    size = store.put(relative, [data])
    now = utcnow()
    dialect = engine.dialect.name
    with Session(engine) as session:
        study = session.scalars(select(Study).where(Study.study_instance_uid == study_uid)).one()
        insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        session.execute(
            insert(Series)
            .values(
                study_pk=study.id,
                series_instance_uid=series_uid,
                modality=str(ds.get("Modality", "")) or None,
                series_description=str(ds.get("SeriesDescription", ""))[:64] or None,
                series_number=int(ds.get("SeriesNumber", 0) or 0) or None,
                manufacturer="dicomnode",
                frame_of_reference_uid=None,
                sop_class_uid=str(ds.SOPClassUID),
                attributes={},
                source_kind=RESULT_SOURCE,
                calling_ae=None,
                called_ae=node_ae,
                peer_address=None,
                source_folder=None,
                instances=0,
                size_bytes=0,
                first_received_at=now,
                last_received_at=now,
            )
            .on_conflict_do_nothing(index_elements=["series_instance_uid"])
        )
        series_pk = session.scalars(
            select(Series.id).where(Series.series_instance_uid == series_uid)
        ).one()
        instance = Instance(
            study_pk=study.id,
            series_pk=series_pk,
            sop_instance_uid=sop_uid,
            sop_class_uid=str(ds.SOPClassUID),
            transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
            instance_number=int(ds.get("InstanceNumber", 1) or 1),
            path=relative,
            size_bytes=size,
            study_version=study.version,
            received_at=now,
            source_kind=RESULT_SOURCE,
            called_ae=node_ae,
            duplicates=0,
            job_pk=job_pk,
        )
        session.add(instance)
        session.execute(
            update(Series)
            .where(Series.id == series_pk)
            .values(instances=Series.instances + 1, size_bytes=Series.size_bytes + size)
        )
        session.commit()
        logger.info(
            "stored result %s (%s, %d bytes) of job %d", sop_uid, ds.get("Modality"), size, job_pk
        )
        return instance.id
