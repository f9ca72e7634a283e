"""Jobs and deliveries on Dramatiq. A message carries only a row id; every state change is a
committed row first. Actors are idempotent: a job or delivery that is not due, or that another
worker holds under a lease, is left alone, so duplicate messages (reconciliation) are harmless.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import dramatiq
from sqlalchemy import Connection, Engine, and_, or_, select, update
from sqlalchemy.orm import Session

from dicomnode.deliver import DeliveryError, Outgoing, is_delivered_status, send_instances
from dicomnode.errors import DicomNodeError
from dicomnode.settings import RemoteNode, Settings
from runners.broker import QUEUES
from storage.db import utcnow
from storage.filestore import FileStore
from storage.models import (
    Delivery,
    DeliveryItem,
    DeliveryState,
    Instance,
    Job,
    JobState,
    Series,
)

__all__ = ["JobError", "Tasks"]

logger = logging.getLogger(__name__)

_PRIORITY = {"urgent": 0, "normal": 5, "low": 9}
_SYNC_SECONDS = 0.1  # SQLite WAL fsync interval of delivery statuses, see _StatusLog


class JobError(DicomNodeError):
    """A job cannot succeed as configured (retrying will not help)."""


class Tasks:
    """The actors of one process, bound to its broker, database and settings."""

    def __init__(self, engine: Engine, settings: Settings, broker: dramatiq.Broker) -> None:
        self.engine = engine
        self.settings = settings
        self.broker = broker
        self.storage_root = settings.storage.root
        self._job_actors = {
            prio: dramatiq.actor(
                broker=broker,
                actor_name=f"run_job_{prio}",
                queue_name=f"jobs.{prio}",
                priority=value,
                max_retries=0,
                time_limit=24 * 3600 * 1000,
            )(self._run_job_message)
            for prio, value in _PRIORITY.items()
        }
        self._deliver_actor = dramatiq.actor(
            broker=broker,
            actor_name="deliver",
            queue_name="delivery",
            max_retries=0,
            time_limit=6 * 3600 * 1000,
        )(self._deliver_message)
        assert {f"jobs.{p}" for p in _PRIORITY} | {"delivery"} == set(QUEUES)

    # --- enqueueing ----------------------------------------------------------------------

    def enqueue_job(self, job_id: int, priority: str = "normal", delay: float = 0) -> None:
        self._mark_enqueued(Job, job_id)
        actor = self._job_actors.get(priority, self._job_actors["normal"])
        actor.send_with_options(args=(job_id,), delay=int(delay * 1000) or None)

    def enqueue_delivery(self, delivery_id: int, delay: float = 0) -> None:
        self._mark_enqueued(Delivery, delivery_id)
        self._deliver_actor.send_with_options(args=(delivery_id,), delay=int(delay * 1000) or None)

    def _mark_enqueued(self, model: type[Job] | type[Delivery], row_id: int) -> None:
        with Session(self.engine) as session:
            session.execute(update(model).where(model.id == row_id).values(enqueued_at=utcnow()))
            session.commit()

    def reconcile(self, *, expired_only: bool = False, own_all: bool = False) -> tuple[int, int]:
        """Enqueue jobs and deliveries that should be moving; returns how many of each.

        At start (``expired_only`` False): every queued job and pending delivery (their
        messages may have been lost with an in-process broker) and every running job or sending
        delivery whose lease expired. Periodically (``expired_only``): expired leases (the work
        of a worker that died) and rows no message was ever sent for.
        """
        now = utcnow()
        if own_all:
            self._release_all_leases()
        job_expired = and_(
            Job.state == JobState.RUNNING, or_(Job.lease_until.is_(None), Job.lease_until < now)
        )
        delivery_expired = and_(
            Delivery.state == DeliveryState.SENDING,
            or_(Delivery.lease_until.is_(None), Delivery.lease_until < now),
        )
        # Periodically: never-enqueued rows too (a retry from the command line).
        job_queued = Job.state == JobState.QUEUED
        delivery_pending = Delivery.state == DeliveryState.PENDING
        if expired_only:
            job_queued = and_(job_queued, Job.enqueued_at.is_(None))
            delivery_pending = and_(delivery_pending, Delivery.enqueued_at.is_(None))
        job_due = or_(job_queued, job_expired)
        delivery_due = or_(delivery_pending, delivery_expired)
        with Session(self.engine) as session:
            jobs = session.execute(
                select(Job.id, Job.priority, Job.next_attempt_at).where(job_due)
            ).all()
            deliveries = session.execute(
                select(Delivery.id, Delivery.next_attempt_at).where(delivery_due)
            ).all()
        for job in jobs:
            self.enqueue_job(job.id, job.priority, _delay(job.next_attempt_at, now))
        for d in deliveries:
            self.enqueue_delivery(d.id, _delay(d.next_attempt_at, now))
        if jobs or deliveries:
            logger.info(
                "reconciled: %d job(s) and %d delivery(ies) enqueued", len(jobs), len(deliveries)
            )
        return len(jobs), len(deliveries)

    def _release_all_leases(self) -> None:
        """With the embedded broker nothing else can be running this node's work: whatever is
        marked running or sending was cut off by a stop or crash and is taken up again."""
        with Session(self.engine) as session:
            session.execute(
                update(Job)
                .where(Job.state == JobState.RUNNING)
                .values(state=JobState.QUEUED, lease_until=None)
            )
            session.execute(
                update(Delivery)
                .where(Delivery.state == DeliveryState.SENDING)
                .values(state=DeliveryState.PENDING, lease_until=None)
            )
            session.commit()

    # --- jobs ----------------------------------------------------------------------------

    def _claim_job(self, job_id: int) -> Job | None:
        now = utcnow()
        lease = now + timedelta(seconds=self.settings.jobs.lease_seconds)
        with Session(self.engine, expire_on_commit=False) as session:
            claimed = (
                session.connection()
                .execute(
                    update(Job)
                    .where(
                        Job.id == job_id,
                        or_(
                            and_(
                                Job.state == JobState.QUEUED,
                                or_(Job.next_attempt_at.is_(None), Job.next_attempt_at <= now),
                            ),
                            and_(Job.state == JobState.RUNNING, Job.lease_until < now),
                        ),
                    )
                    .values(
                        state=JobState.RUNNING,
                        attempts=Job.attempts + 1,
                        started_at=now,
                        lease_until=lease,
                    )
                )
                .rowcount
            )
            session.commit()
            if claimed != 1:
                return None
            return session.get(Job, job_id)

    def _run_job_message(self, job_id: int) -> None:
        job = self._claim_job(job_id)
        if job is None:
            logger.debug("job %d is not due or held by another worker", job_id)
            return
        try:
            deliveries = self._execute(job)
        except DicomNodeError as exc:
            # A configuration or input problem (unknown pipeline, inconsistent series, ...):
            # retrying cannot help.
            self._finish_job(job, JobState.FAILED, str(exc))
            return
        except Exception as exc:
            logger.exception("job %d (%s) attempt %d failed", job.id, job.rule, job.attempts)
            if job.attempts >= job.max_attempts:
                self._finish_job(job, JobState.FAILED, f"{type(exc).__name__}: {exc}")
            else:
                delay = self.settings.jobs.retry_seconds * 2 ** (job.attempts - 1)
                self._requeue_job(job, f"{type(exc).__name__}: {exc}", delay)
            return
        self._finish_job(job, JobState.SUCCEEDED, None)
        for delivery_id in deliveries:
            self.enqueue_delivery(delivery_id)

    def _finish_job(self, job: Job, state: str, error: str | None) -> None:
        with Session(self.engine) as session:
            session.execute(
                update(Job)
                .where(Job.id == job.id, Job.state == JobState.RUNNING)
                .values(state=state, error=error, finished_at=utcnow(), lease_until=None)
            )
            session.commit()
        log = logger.error if state == JobState.FAILED else logger.info
        log(
            "job %d (rule %s, %s) %s%s",
            job.id,
            job.rule,
            job.action,
            state,
            f": {error}" if error else "",
        )

    def _requeue_job(self, job: Job, error: str, delay: float) -> None:
        with Session(self.engine) as session:
            session.execute(
                update(Job)
                .where(Job.id == job.id, Job.state == JobState.RUNNING)
                .values(
                    state=JobState.QUEUED,
                    error=error,
                    lease_until=None,
                    next_attempt_at=utcnow() + timedelta(seconds=delay),
                )
            )
            session.commit()
        self.enqueue_job(job.id, job.priority, delay)

    def _execute(self, job: Job) -> list[int]:
        """Do the job's work; returns the deliveries it created."""
        if job.action == "forward":
            return self._create_deliveries(job, self._job_instances(job))
        if job.action == "run":
            from runners.pipeline import run_pipeline

            store = FileStore(
                self.settings.storage.root,
                self.settings.storage.quarantine_dir,
                fsync=self.settings.storage.fsync,
            )
            results = run_pipeline(self.engine, self.settings, store, job)
            return self._create_deliveries(job, results)
        return []

    def _job_instances(self, job: Job) -> list[int]:
        """Instances a forward job sends: of its selected series, those of its study version
        (earlier versions were forwarded by their own jobs)."""
        series_uids = sorted({uid for uids in job.inputs.values() for uid in uids})
        with Session(self.engine) as session:
            rows = session.scalars(
                select(Instance.id)
                .join(Series, Series.id == Instance.series_pk)
                .where(
                    Series.series_instance_uid.in_(series_uids),
                    Instance.study_pk == job.study_pk,
                    Instance.study_version == job.study_version,
                )
                .order_by(Instance.series_pk, Instance.instance_number, Instance.id)
            ).all()
        return list(rows)

    def resolve(self, destination: str, job: Job) -> RemoteNode:
        """A destination name, or ``origin``: the registered node whose AE title sent the study."""
        if destination != "origin":
            node = self.settings.nodes.get(destination)
            if node is None:
                raise JobError(f"destination {destination!r} is not in the nodes registry")
            return node
        series_uids = sorted({uid for uids in job.inputs.values() for uid in uids})
        query = select(Series.calling_ae).where(Series.study_pk == job.study_pk)
        if series_uids:
            query = query.where(Series.series_instance_uid.in_(series_uids))
        with Session(self.engine) as session:
            callers = set(session.scalars(query).all())
        callers.discard(None)
        if not callers:
            raise JobError(
                "destination 'origin': the study did not come over DICOM (no calling AE)"
            )
        for caller in sorted(c for c in callers if c):
            for node in self.settings.nodes.values():
                if node.ae_title == caller:
                    return node
        names = ", ".join(sorted(c for c in callers if c))
        raise JobError(
            f"destination 'origin': calling AE {names} is not in the nodes registry; add it "
            f"under 'nodes:' with the host and port it listens on (the association's source "
            f"port is not a listening port)"
        )

    def _create_deliveries(self, job: Job, instance_ids: list[int]) -> list[int]:
        now = utcnow()
        remotes = [(name, self.resolve(name, job)) for name in job.destinations]
        created: list[int] = []
        with Session(self.engine) as session:
            for name, remote in remotes:
                existing = session.scalars(
                    select(Delivery).where(Delivery.job_pk == job.id, Delivery.destination == name)
                ).first()
                if existing is not None:  # a retried job keeps its outbox rows
                    created.append(existing.id)
                    continue
                delivery = Delivery(
                    job_pk=job.id,
                    destination=name,
                    ae_title=remote.ae_title,
                    host=remote.host,
                    port=remote.port,
                    state=DeliveryState.PENDING,
                    attempts=0,
                    max_attempts=self.settings.delivery.max_attempts,
                    instances=len(instance_ids),
                    delivered=0,
                    created_at=now,
                    updated_at=now,
                )
                session.add(delivery)
                session.flush()
                session.add_all(
                    DeliveryItem(delivery_pk=delivery.id, instance_pk=i) for i in instance_ids
                )
                created.append(delivery.id)
            session.commit()
        return created

    # --- deliveries ----------------------------------------------------------------------

    def _claim_delivery(self, delivery_id: int) -> Delivery | None:
        now = utcnow()
        lease = now + timedelta(seconds=self.settings.delivery.lease_seconds)
        with Session(self.engine, expire_on_commit=False) as session:
            claimed = (
                session.connection()
                .execute(
                    update(Delivery)
                    .where(
                        Delivery.id == delivery_id,
                        or_(
                            and_(
                                Delivery.state == DeliveryState.PENDING,
                                or_(
                                    Delivery.next_attempt_at.is_(None),
                                    Delivery.next_attempt_at <= now,
                                ),
                            ),
                            and_(
                                Delivery.state == DeliveryState.SENDING, Delivery.lease_until < now
                            ),
                        ),
                    )
                    .values(
                        state=DeliveryState.SENDING,
                        attempts=Delivery.attempts + 1,
                        lease_until=lease,
                        updated_at=now,
                    )
                )
                .rowcount
            )
            session.commit()
            return session.get(Delivery, delivery_id) if claimed == 1 else None

    def _deliver_message(self, delivery_id: int) -> None:
        delivery = self._claim_delivery(delivery_id)
        if delivery is None:
            logger.debug("delivery %d is not due or held by another sender", delivery_id)
            return
        items = self._pending_items(delivery.id)
        remote = self._remote(delivery)
        error: str | None = None
        try:
            # One connection for the whole send: statuses are committed one by one on it.
            with self.engine.connect() as conn, _StatusLog(conn) as log:
                statuses = send_instances(
                    remote,
                    [item for item, _ in items],
                    calling_ae=self.settings.node.ae_title,
                    timeout=self.settings.delivery.timeout,
                    on_status=lambda out, status: self._record_item(
                        log, delivery.id, out.key, status
                    ),
                )
            failed = {k: s for k, s in statuses.items() if not is_delivered_status(s)}
            if failed:
                shown = ", ".join(
                    "not sent" if s is None else f"0x{s:04X}" for s in list(failed.values())[:5]
                )
                error = f"{len(failed)} of {len(items)} instance(s) not stored: {shown}"
        except (DeliveryError, OSError) as exc:
            error = str(exc)
        except Exception as exc:
            logger.exception("delivery %d failed unexpectedly", delivery.id)
            error = f"{type(exc).__name__}: {exc}"
        self._settle_delivery(delivery, error)

    def _remote(self, delivery: Delivery) -> RemoteNode:
        """The outbox row's address with the TLS settings of its registry entry: by name, or
        for ``origin`` the entry with its AE title (as ``resolve`` chose it)."""
        address = {"ae_title": delivery.ae_title, "host": delivery.host, "port": delivery.port}
        nodes = self.settings.nodes
        if delivery.destination in nodes:
            entry: RemoteNode | None = nodes[delivery.destination]
        else:
            same_ae = [n for n in nodes.values() if n.ae_title == delivery.ae_title]
            exact = [n for n in same_ae if (n.host, n.port) == (delivery.host, delivery.port)]
            entry = next(iter(exact + same_ae), None)
        if entry is None:
            return RemoteNode(**address)
        return entry.model_copy(update=address)

    def _pending_items(self, delivery_id: int) -> list[tuple[Outgoing, int]]:
        with Session(self.engine) as session:
            rows = session.execute(
                select(DeliveryItem.id, Instance)
                .join(Instance, Instance.id == DeliveryItem.instance_pk)
                .where(DeliveryItem.delivery_pk == delivery_id, DeliveryItem.delivered_at.is_(None))
                .order_by(DeliveryItem.id)
            ).all()
            return [
                (
                    Outgoing(
                        key=item_id,
                        path=self.storage_root / inst.path,
                        sop_class_uid=inst.sop_class_uid,
                        sop_instance_uid=inst.sop_instance_uid,
                        transfer_syntax_uid=inst.transfer_syntax_uid,
                    ),
                    inst.id,
                )
                for item_id, inst in rows
            ]

    def _record_item(
        self, log: _StatusLog, delivery_id: int, item_id: int, status: int | None
    ) -> None:
        # One commit per acknowledged instance, before the next is sent, so after a crash
        # nothing acknowledged is sent again; the same commit renews the sender's lease.
        # (Core statements on one held connection: the ORM session per instance cost as much
        # as the commit's fsync.)
        now = utcnow()
        lease = now + timedelta(seconds=self.settings.delivery.lease_seconds)
        values: dict[str, Any] = {"status": status}
        if is_delivered_status(status):
            values["delivered_at"] = now
        with log.transaction() as conn:
            conn.execute(update(DeliveryItem).where(DeliveryItem.id == item_id).values(**values))
            conn.execute(
                update(Delivery)
                .where(Delivery.id == delivery_id, Delivery.state == DeliveryState.SENDING)
                .values(lease_until=lease, updated_at=now)
            )

    def _settle_delivery(self, delivery: Delivery, error: str | None) -> None:
        now = utcnow()
        cfg = self.settings.delivery
        with Session(self.engine) as session:
            remaining = session.scalars(
                select(DeliveryItem.id).where(
                    DeliveryItem.delivery_pk == delivery.id, DeliveryItem.delivered_at.is_(None)
                )
            ).all()
            done = delivery.instances - len(remaining)
            values: dict[str, Any] = {"delivered": done, "updated_at": now, "lease_until": None}
            delay = 0.0
            if not remaining:
                values.update(state=DeliveryState.DELIVERED, last_error=None, next_attempt_at=None)
            elif delivery.attempts >= delivery.max_attempts:
                values.update(state=DeliveryState.FAILED, last_error=error)
            else:
                delay = min(cfg.retry_max_seconds, cfg.retry_seconds * 2 ** (delivery.attempts - 1))
                values.update(
                    state=DeliveryState.PENDING,
                    last_error=error,
                    next_attempt_at=now + timedelta(seconds=delay),
                )
            session.execute(
                update(Delivery)
                .where(Delivery.id == delivery.id, Delivery.state == DeliveryState.SENDING)
                .values(**values)
            )
            session.commit()
        where = f"{delivery.destination} ({delivery.ae_title}@{delivery.host}:{delivery.port})"
        if not remaining:
            logger.info("delivery %d to %s: %d instance(s) delivered", delivery.id, where, done)
        elif values["state"] == DeliveryState.FAILED:
            logger.error("delivery %d to %s failed for good: %s", delivery.id, where, error)
        else:
            logger.warning(
                "delivery %d to %s attempt %d: %s; retry in %.0f s",
                delivery.id,
                where,
                delivery.attempts,
                error,
                delay,
            )
            self.enqueue_delivery(delivery.id, delay)


class _StatusLog:
    """Per-instance status commits on one connection, with SQLite's WAL synced at most every
    ``_SYNC_SECONDS``.

    Trade-off: every commit is in the WAL before the next instance is sent, so a killed
    process (or worker) resends at most the instance in flight. Only the WAL fsync is spread
    out: after a power loss or OS crash the last ``_SYNC_SECONDS`` of statuses may be lost and
    those instances sent again (duplicates, never losses). The delivery is counted by a later
    commit with ``synchronous=FULL``, whose fsync makes every earlier status durable first.
    The fsync per instance was the largest cost of forwarding (0.5-1.3 ms of ~3 ms here).
    Other databases commit as they are configured.
    """

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.sqlite = conn.dialect.name == "sqlite"
        self.synced = time.monotonic()

    def __enter__(self) -> _StatusLog:
        if self.sqlite:
            self.conn.exec_driver_sql("PRAGMA synchronous=NORMAL")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.sqlite:
            self.conn.rollback()
            self.conn.exec_driver_sql("PRAGMA synchronous=FULL")  # as storage.db sets it

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Connection]:
        """Statements run in the block are committed at its end."""
        sync = self.sqlite and time.monotonic() - self.synced >= _SYNC_SECONDS
        if sync:  # set outside the transaction: this commit fsyncs the WAL
            self.conn.exec_driver_sql("PRAGMA synchronous=FULL")
        try:
            yield self.conn
            self.conn.commit()
        except BaseException:
            self.conn.rollback()
            raise
        finally:
            if sync:
                self.conn.exec_driver_sql("PRAGMA synchronous=NORMAL")
                self.conn.commit()
                self.synced = time.monotonic()


def _delay(when: datetime | None, now: datetime) -> float:
    return max(0.0, (when - now).total_seconds()) if when is not None else 0.0
