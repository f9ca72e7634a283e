"""Admin views and actions on the ledger: jobs, deliveries, retry, cancel."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session

from dicomnode.errors import DicomNodeError
from storage.db import utcnow
from storage.models import Delivery, DeliveryState, Job, JobState, RoutingRecord, Study

__all__ = ["cancel_job", "delivery_rows", "job_rows", "retry_job", "routing_rows"]


def _iso(value: Any) -> str | None:
    return value.isoformat() + "Z" if value is not None else None


def job_rows(engine: Engine) -> list[dict[str, Any]]:
    with Session(engine) as session:
        rows = session.execute(
            select(Job, Study.study_instance_uid)
            .join(Study, Study.id == Job.study_pk)
            .order_by(Job.id)
        ).all()
        return [
            {
                "id": job.id,
                "study_instance_uid": uid,
                "study_version": job.study_version,
                "rule": job.rule,
                "action": job.action,
                "pipeline": job.pipeline,
                "priority": job.priority,
                "state": job.state,
                "attempts": job.attempts,
                "max_attempts": job.max_attempts,
                "error": job.error,
                "inputs": job.inputs,
                "destinations": job.destinations,
                "created_at": _iso(job.created_at),
                "started_at": _iso(job.started_at),
                "finished_at": _iso(job.finished_at),
            }
            for job, uid in rows
        ]


def delivery_rows(engine: Engine) -> list[dict[str, Any]]:
    with Session(engine) as session:
        rows = session.scalars(select(Delivery).order_by(Delivery.id)).all()
        return [
            {
                "id": d.id,
                "job": d.job_pk,
                "destination": d.destination,
                "ae_title": d.ae_title,
                "host": d.host,
                "port": d.port,
                "state": d.state,
                "instances": d.instances,
                "delivered": d.delivered,
                "attempts": d.attempts,
                "max_attempts": d.max_attempts,
                "next_attempt_at": _iso(d.next_attempt_at),
                "last_error": d.last_error,
                "updated_at": _iso(d.updated_at),
            }
            for d in rows
        ]


def routing_rows(engine: Engine) -> list[dict[str, Any]]:
    with Session(engine) as session:
        rows = session.execute(
            select(RoutingRecord, Study.study_instance_uid)
            .join(Study, Study.id == RoutingRecord.study_pk)
            .order_by(RoutingRecord.id)
        ).all()
        return [
            {
                "study_instance_uid": uid,
                "version": r.version,
                "outcome": r.outcome,
                "explanation": r.explanation.splitlines(),
                "decided_at": _iso(r.decided_at),
                "hold_until": _iso(r.hold_until),
            }
            for r, uid in rows
        ]


def retry_job(engine: Engine, job_id: int) -> tuple[str, list[int]]:
    """Queue a failed or cancelled job again, with its failed deliveries; returns the job's
    priority and the deliveries made pending again."""
    with Session(engine) as session:
        job = session.get(Job, job_id)
        if job is None:
            raise DicomNodeError(f"no job {job_id} (see 'dicomnode jobs')")
        failed = session.scalars(
            select(Delivery.id).where(
                Delivery.job_pk == job_id,
                Delivery.state.in_((DeliveryState.FAILED, DeliveryState.CANCELLED)),
            )
        ).all()
        if job.state in JobState.ACTIVE:
            raise DicomNodeError(f"job {job_id} is {job.state} already")
        if job.state == JobState.SUCCEEDED and not failed:
            raise DicomNodeError(f"job {job_id} succeeded and all its deliveries were delivered")
        if job.state != JobState.SUCCEEDED:
            job.state = JobState.QUEUED
            job.attempts = 0
            job.error = None
            job.next_attempt_at = None
            job.finished_at = None
            job.enqueued_at = None
        session.execute(
            update(Delivery)
            .where(Delivery.id.in_(failed))
            .values(
                state=DeliveryState.PENDING,
                attempts=0,
                next_attempt_at=None,
                enqueued_at=None,
                updated_at=utcnow(),
            )
        )
        session.commit()
        requeue = job.state == JobState.QUEUED
        return (job.priority if requeue else ""), list(failed)


def cancel_job(engine: Engine, job_id: int) -> int:
    """Cancel a job that has not finished, and its undelivered deliveries; returns how many
    deliveries were cancelled."""
    with Session(engine) as session:
        job = session.get(Job, job_id)
        if job is None:
            raise DicomNodeError(f"no job {job_id} (see 'dicomnode jobs')")
        open_deliveries = (DeliveryState.PENDING, DeliveryState.SENDING)
        cancelled = (
            session.connection()
            .execute(
                update(Delivery)
                .where(Delivery.job_pk == job_id, Delivery.state.in_(open_deliveries))
                .values(state=DeliveryState.CANCELLED, updated_at=utcnow())
            )
            .rowcount
        )
        if job.state in JobState.ACTIVE:
            job.state = JobState.CANCELLED
            job.finished_at = utcnow()
        elif not cancelled:
            raise DicomNodeError(f"job {job_id} is {job.state}: nothing to cancel")
        session.commit()
        return int(cancelled)
