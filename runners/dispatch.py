"""Wiring completion to routing to jobs: the part of ``dicomnode serve`` that decides and
enqueues, plus in-process worker threads for the embedded broker."""

from __future__ import annotations

import logging
import threading

import dramatiq
from sqlalchemy import Engine, and_, select
from sqlalchemy.orm import Session

from dicomnode.completion import Completed
from dicomnode.settings import Settings
from routing.engine import Routed, Router
from runners.broker import make_broker
from runners.tasks import Tasks
from storage.models import CompletionEvent, RoutingRecord

__all__ = ["Dispatcher"]

logger = logging.getLogger(__name__)


class Dispatcher:
    """Routes completed study versions and keeps jobs and deliveries moving."""

    def __init__(self, engine: Engine, settings: Settings, sweep_seconds: float = 5.0) -> None:
        self.engine = engine
        self.settings = settings
        self.broker = make_broker(settings.broker.url, settings.broker.namespace)
        self.tasks = Tasks(engine, settings, self.broker)
        self.router = Router(engine, settings)
        self.sweep_seconds = sweep_seconds
        self.worker: dramatiq.Worker | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.settings.broker.url == "embedded":
            self.worker = dramatiq.Worker(
                self.broker, worker_threads=self.settings.broker.worker_threads
            )
            self.worker.start()
        for study_pk, version in self.unrouted():
            self._enqueue(self.router.route(study_pk, version))
        self.tasks.reconcile(own_all=self.settings.broker.url == "embedded")
        self._thread = threading.Thread(target=self._sweep, name="dispatch-sweep", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self.worker is not None:
            self.worker.stop()
        self.broker.close()

    def on_complete(self, event: Completed) -> None:
        """Completion hook: route the version and enqueue its jobs."""
        self._enqueue(
            self.router.route(event.study_pk, event.version, final=event.reason == "forced")
        )

    def _enqueue(self, routed: Routed) -> None:
        for job_id in routed.job_ids:
            self.tasks.enqueue_job(job_id, routed.priorities.get(job_id, "normal"))

    def unrouted(self) -> list[tuple[int, int]]:
        """Completed versions without a routing record (the node stopped in between)."""
        with Session(self.engine) as session:
            rows = session.execute(
                select(CompletionEvent.study_pk, CompletionEvent.version)
                .outerjoin(
                    RoutingRecord,
                    and_(
                        RoutingRecord.study_pk == CompletionEvent.study_pk,
                        RoutingRecord.version == CompletionEvent.version,
                    ),
                )
                .where(RoutingRecord.id.is_(None))
                .order_by(CompletionEvent.id)
            ).all()
        return [(r.study_pk, r.version) for r in rows]

    def _sweep(self) -> None:
        while not self._stop.wait(self.sweep_seconds):
            try:
                for routed in self.router.release_holds():
                    self._enqueue(routed)
                self.tasks.reconcile(expired_only=True)
            except Exception:
                logger.exception("dispatch sweep failed; retrying")
