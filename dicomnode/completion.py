"""Study completion: a study version is complete after a quiet period or at the force timeout.

The quiet period (``settle_seconds``) restarts with every instance and when an association that
sent instances of the study ends. ``force_seconds`` after a version started it completes even if
instances keep arriving. Completion is a committed row (``completions``) with its reason; a
late instance re-opens the study as the next version (see ``dicomnode.ingest``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Engine, and_, func, insert, or_, select, update

from dicomnode.settings import CompletionSettings
from storage.db import utcnow
from storage.models import CompletionEvent, Instance, Study, StudyState

__all__ = ["Completed", "CompletionMonitor"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Completed:
    """One study version that just became complete."""

    study_pk: int
    study_instance_uid: str
    version: int
    reason: str
    instances: int


class CompletionMonitor:
    """Checks the index for studies whose quiet period or force timeout has passed."""

    def __init__(
        self,
        engine: Engine,
        settings: CompletionSettings,
        on_complete: Callable[[Completed], None] | None = None,
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.on_complete = on_complete
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check(self, now: datetime | None = None) -> list[Completed]:
        """Complete every study that is due; returns what was completed."""
        now = now or utcnow()
        settled = now - timedelta(seconds=self.settings.settle_seconds)
        forced = now - timedelta(seconds=self.settings.force_seconds)
        due = or_(Study.last_activity_at <= settled, Study.version_started_at <= forced)
        done: list[Completed] = []
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(
                    Study.id,
                    Study.study_instance_uid,
                    Study.version,
                    Study.instances,
                ).where(Study.state == StudyState.RECEIVING, due)
            ).all()
        for row in rows:
            with self.engine.begin() as conn:
                claimed = conn.execute(
                    update(Study)
                    .where(
                        and_(
                            Study.id == row.id,
                            Study.state == StudyState.RECEIVING,
                            Study.version == row.version,
                            due,
                        )
                    )
                    .values(state=StudyState.COMPLETE, completed_at=now)
                ).rowcount
                if claimed != 1:
                    continue  # another instance arrived meanwhile, or another checker won
                # The reason from the claimed row: an instance may have arrived since the
                # first read, leaving the version due only by the force timeout.
                last_activity = conn.execute(
                    select(Study.last_activity_at).where(Study.id == row.id)
                ).scalar_one()
                reason = "settled" if last_activity <= settled else "forced"
                total, in_version = conn.execute(
                    select(
                        func.count(Instance.id),
                        func.count(Instance.id).filter(Instance.study_version == row.version),
                    ).where(Instance.study_pk == row.id)
                ).one()
                conn.execute(
                    insert(CompletionEvent).values(
                        study_pk=row.id,
                        version=row.version,
                        reason=reason,
                        completed_at=now,
                        instances=total,
                        version_instances=in_version,
                    )
                )
            event = Completed(row.id, row.study_instance_uid, row.version, reason, total)
            logger.info(
                "study %s version %d complete (%s): %d instances",
                row.study_instance_uid,
                row.version,
                reason,
                total,
            )
            done.append(event)
            if self.on_complete is not None:
                try:
                    self.on_complete(event)
                except Exception:
                    logger.exception("completion hook failed for %s", row.study_instance_uid)
        return done

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="completion", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.settings.check_interval):
            try:
                self.check()
            except Exception:
                logger.exception("completion check failed; retrying")
