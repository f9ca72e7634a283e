"""A ``run`` job: load the input series, run the model, encode SEG / RTSTRUCT, keep the
results, and hand them to delivery."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from dicomnode.errors import DicomNodeError
from dicomnode.settings import Settings
from runners.modelspec import ModelSpec
from runners.results import job_results, store_result
from storage.filestore import FileStore
from storage.models import Instance, Job, Series

__all__ = ["PipelineError", "run_pipeline"]

logger = logging.getLogger(__name__)


class PipelineError(DicomNodeError):
    """A pipeline cannot run as configured or on this input (retrying will not help)."""


def _input_series(job: Job, spec: ModelSpec) -> dict[str, list[str]]:
    """Model input name -> the series the rule selected for it."""
    chosen: dict[str, list[str]] = {}
    groups = dict(job.inputs)
    for i, name in enumerate(spec.inputs):
        uids = groups.get(name)
        if uids is None and i == 0 and len(groups) == 1:
            uids = next(iter(groups.values()))  # a rule without named inputs feeds input one
        if not uids:
            raise PipelineError(
                f"model input {name!r} has no series: the rule must select it "
                f"(rule inputs: {', '.join(groups) or 'none'})"
            )
        chosen[name] = list(uids)
    return chosen


def _series_files(engine: Engine, root: Path, series_uid: str) -> list[Path]:
    with Session(engine) as session:
        paths = session.scalars(
            select(Instance.path)
            .join(Series, Series.id == Instance.series_pk)
            .where(Series.series_instance_uid == series_uid, Instance.job_pk.is_(None))
        ).all()
    return [root / p for p in paths]


def _largest(engine: Engine, uids: list[str]) -> str:
    with Session(engine) as session:
        rows = session.execute(
            select(Series.series_instance_uid, Series.instances).where(
                Series.series_instance_uid.in_(uids)
            )
        ).all()
    return max(rows, key=lambda r: r.instances).series_instance_uid if rows else uids[0]


def run_pipeline(engine: Engine, settings: Settings, store: FileStore, job: Job) -> list[int]:
    """Run the job's model and keep its results; returns the result instance ids."""
    existing = job_results(engine, job.id)
    if existing:
        logger.info("job %d already stored %d result(s); not running again", job.id, len(existing))
        return existing
    spec = settings.models.get(job.pipeline or "")
    if spec is None:
        known = ", ".join(sorted(settings.models)) or "none configured"
        raise PipelineError(f"pipeline {job.pipeline!r} is not in 'models:' ({known})")

    from runners.model import run_model
    from runners.volumes import load_series

    inputs: dict[str, str] = {}
    for name, uids in _input_series(job, spec).items():
        inputs[name] = uids[0] if len(uids) == 1 else _largest(engine, uids)
        if len(uids) > 1:
            logger.info(
                "job %d input %s: %d series match, using the largest", job.id, name, len(uids)
            )
    volumes: dict[str, Any] = {}
    for name, uid in inputs.items():
        files = _series_files(engine, settings.storage.root, uid)
        volumes[name] = load_series(files)
    images = {name: vol.image for name, vol in volumes.items()}
    label_image = run_model(spec, images)
    import SimpleITK as sitk

    label = sitk.GetArrayFromImage(label_image)
    source = volumes[spec.inputs[0]]
    structures = [s.structure() for s in spec.structures]
    results = []
    model_name = job.pipeline or "model"
    if "seg" in spec.results:
        from runners.seg import encode_seg

        results.append(
            encode_seg(
                label,
                source.datasets,
                structures,
                algorithm_name=model_name,
                algorithm_version=spec.version,
                seg_type=spec.seg_type,
                frames=getattr(source, "frames", None),
            )
        )
    if "rtstruct" in spec.results:
        from runners.rtstruct import encode_rtstruct

        if len(source.datasets) == 1 and int(source.datasets[0].get("NumberOfFrames", 1) or 1) > 1:
            logger.warning(
                "job %d: RTSTRUCT needs a single-frame source series; only SEG is produced", job.id
            )
        else:
            results.append(
                encode_rtstruct(
                    label,
                    source.datasets,
                    structures,
                    algorithm_name=model_name,
                    algorithm_version=spec.version,
                )
            )
    ids = [
        store_result(engine, store, ds, job_pk=job.id, node_ae=settings.node.ae_title)
        for ds in results
    ]
    logger.info(
        "job %d: %s v%s on %s -> %d result(s) (pid %d)",
        job.id,
        model_name,
        spec.version,
        ", ".join(f"{k}={v}" for k, v in inputs.items()),
        len(ids),
        os.getpid(),
    )
    return ids
