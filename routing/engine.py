"""Turning a completed study version into a routing record and job rows, in one transaction.

- Every matched rule gives one Job (unique per study version and rule); ``discard`` jobs are
  recorded as succeeded at once.
- A rule whose named inputs are missing is *held* (``missing_inputs: hold``) until the study's
  force timeout: a new version that brings the input routes it; at the deadline it is reported
  unmatched with the reason.
- A study no rule matches is recorded ``unmatched`` with every rule's reason; it stays stored.
- A later version (late instances) gives a rule a job again only when it has something new to
  work on: a ``forward`` only when a selected series received instances in that version (it
  sends only those), a ``run`` only when one of its inputs changed since the rule's last job
  or the inputs it picks are others. Otherwise the decision says why nothing was done.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Engine, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload

from dicomnode.settings import Settings
from routing.rules import Decision, evaluate_rules
from routing.views import study_view_from_index
from storage.db import utcnow
from storage.models import Instance, Job, JobState, RoutingRecord, Series, Study, StudyState

__all__ = ["Routed", "Router"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Routed:
    """The outcome for one study version: the new job ids (to enqueue) and the record."""

    outcome: str
    job_ids: list[int]
    priorities: dict[int, str]
    explanation: str


class Router:
    """Applies the configured rules to completed study versions."""

    def __init__(self, engine: Engine, settings: Settings) -> None:
        self.engine = engine
        self.settings = settings

    def route(self, study_pk: int, version: int, *, final: bool = False) -> Routed:
        """Route one completed study version (idempotent: a rule's job is created once)."""
        now = utcnow()
        with Session(self.engine) as session:
            study = session.scalars(
                select(Study).where(Study.id == study_pk).options(selectinload(Study.series))
            ).one()
            deadline = study.version_started_at + timedelta(
                seconds=self.settings.completion.force_seconds
            )
            final = final or now >= deadline
            view = study_view_from_index(session, study)
            decisions = evaluate_rules(self.settings.rules, view, final=final)
            explanation = "\n".join(d.explain() for d in decisions) or "no rules configured"
            matched = [d for d in decisions if d.matched]
            held = [d for d in decisions if d.held]
            unchanged = {
                id(d): why
                for d in matched
                if (why := _nothing_new(session, study_pk, version, d)) is not None
            }
            if unchanged:
                explanation += "".join(
                    f"\nrule {d.rule.name}: {unchanged[id(d)]}"
                    for d in matched
                    if id(d) in unchanged
                )
            jobs = [self._job(study, version, d, now) for d in matched if id(d) not in unchanged]
            session.add_all(jobs)
            if jobs:
                outcome = "routed"
            elif held:
                outcome = "held"
            else:
                outcome = "unchanged" if matched else "unmatched"
            session.add(
                RoutingRecord(
                    study_pk=study_pk,
                    version=version,
                    outcome=outcome if not (jobs and held) else "routed+held",
                    explanation=explanation,
                    decided_at=now,
                    hold_until=deadline if held else None,
                )
            )
            try:
                session.commit()
            except IntegrityError:
                # Routed before (a restart re-ran the completion hook): nothing new to do.
                session.rollback()
                logger.info("study %s v%d was routed already", study.study_instance_uid, version)
                return Routed("routed", [], {}, explanation)
            queued = [j for j in jobs if j.state == JobState.QUEUED]
            result = Routed(
                outcome,
                [j.id for j in queued],
                {j.id: j.priority for j in queued},
                explanation,
            )
            uid = study.study_instance_uid
        # Unmatched is a normal, recorded outcome (``dicomnode routing``), not a problem.
        logger.info("study %s v%d %s: %s", uid, version, outcome, explanation.replace("\n", "; "))
        return result

    def _job(self, study: Study, version: int, decision: Decision, now: datetime) -> Job:
        rule = decision.rule
        discard = rule.action == "discard"
        return Job(
            study_pk=study.id,
            study_version=version,
            rule=rule.name,
            action=rule.action,
            pipeline=rule.pipeline,
            priority=rule.priority,
            state=JobState.SUCCEEDED if discard else JobState.QUEUED,
            inputs=decision.inputs,
            destinations=list(rule.destinations),
            attempts=0,
            max_attempts=self.settings.jobs.max_attempts,
            created_at=now,
            finished_at=now if discard else None,
        )

    def release_holds(self, now: datetime | None = None) -> list[Routed]:
        """Route held study versions whose force deadline has passed (final evaluation)."""
        now = now or utcnow()
        with Session(self.engine) as session:
            rows = session.execute(
                select(RoutingRecord.id, RoutingRecord.study_pk, RoutingRecord.version)
                .join(Study, Study.id == RoutingRecord.study_pk)
                .where(
                    RoutingRecord.outcome.in_(("held", "routed+held")),
                    RoutingRecord.hold_until <= now,
                    Study.version == RoutingRecord.version,
                    Study.state == StudyState.COMPLETE,
                )
            ).all()
            for row in rows:
                record = session.get(RoutingRecord, row.id)
                if record is not None:
                    record.outcome = "released"
            session.commit()
        results = []
        for row in rows:
            results.append(self._route_final(row.study_pk, row.version))
        return results

    def _route_final(self, study_pk: int, version: int) -> Routed:
        # Rules that already have a job for this version keep it (unique constraint); only the
        # held ones are decided again, now finally.
        with Session(self.engine) as session:
            done = set(
                session.scalars(
                    select(Job.rule).where(Job.study_pk == study_pk, Job.study_version == version)
                ).all()
            )
        settings = self.settings.model_copy(
            update={"rules": [r for r in self.settings.rules if r.name not in done]}
        )
        return Router(self.engine, settings).route(study_pk, version, final=True)


def _nothing_new(session: Session, study_pk: int, version: int, decision: Decision) -> str | None:
    """Why a matched rule has nothing to do in study version ``version`` (a late arrival),
    or None when it gets a job."""
    if version <= 1 or decision.rule.action == "discard":
        return None
    selected = decision.selected_series
    changed = set(
        session.scalars(
            select(Series.series_instance_uid)
            .join(Instance, Instance.series_pk == Series.id)
            .where(
                Instance.study_pk == study_pk,
                Instance.study_version == version,
                Instance.job_pk.is_(None),
                Series.series_instance_uid.in_(selected),
            )
            .distinct()
        )
    )
    if changed:
        return None
    if decision.rule.action == "forward":
        return f"not forwarded again: its series received nothing in version {version}"
    last = session.scalars(
        select(Job)
        .where(
            Job.study_pk == study_pk,
            Job.rule == decision.rule.name,
            Job.study_version < version,
            Job.state != JobState.CANCELLED,
        )
        .order_by(Job.study_version.desc())
        .limit(1)
    ).first()
    if last is None or last.inputs != decision.inputs:
        return None
    return (
        f"not run again: its inputs are unchanged since version {last.study_version} "
        f"(job {last.id})"
    )
