"""Dramatiq broker set-up: Redis or RabbitMQ for services, an in-process broker for the
embedded default. The broker is only transport: the database is the ledger."""

from __future__ import annotations

import logging
from urllib.parse import urlsplit, urlunsplit

import dramatiq
from dramatiq.brokers.stub import StubBroker

from dicomnode.errors import DicomNodeError

__all__ = ["QUEUES", "BrokerError", "make_broker"]

logger = logging.getLogger(__name__)

# One queue per priority (a worker can be dedicated to urgent work) and one for delivery.
QUEUES = ("jobs.urgent", "jobs.normal", "jobs.low", "delivery")


class BrokerError(DicomNodeError):
    """The broker URL is unusable or the broker cannot be reached."""


def make_broker(url: str, namespace: str = "dicomnode") -> dramatiq.Broker:
    """A broker for ``url``: ``embedded``, ``redis://...`` or ``amqp://...``; ``namespace``
    keeps the keys of several nodes sharing one Redis apart."""
    if url == "embedded":
        broker: dramatiq.Broker = StubBroker()
        broker.emit_after("process_boot")
        return broker
    if url.startswith(("redis://", "rediss://")):
        from dramatiq.brokers.redis import RedisBroker

        broker = RedisBroker(url=url, namespace=namespace)  # type: ignore[no-untyped-call]
        try:
            broker.client.ping()
        except Exception as exc:
            raise BrokerError(
                f"cannot reach the Redis broker at {url}: {exc} (is redis-server running?)"
            ) from exc
        return broker
    if url.startswith(("amqp://", "amqps://")):
        try:
            from dramatiq.brokers.rabbitmq import RabbitmqBroker
        except ImportError as exc:
            raise BrokerError(
                "RabbitMQ needs the 'rabbitmq' extra: pip install 'dicomnode[rabbitmq]'"
            ) from exc
        # Publisher confirms: an enqueue returns only once RabbitMQ has the message (and
        # dramatiq re-declares a queue that was deleted under it).
        broker = RabbitmqBroker(url=url, confirm_delivery=True)
        try:
            broker.connection  # noqa: B018  (connects; pika connects lazily otherwise)
        except Exception as exc:
            raise BrokerError(
                f"cannot reach the RabbitMQ broker at {_redact(url)}: {exc!r} "
                "(is rabbitmq-server running, are user, password and vhost right?)"
            ) from exc
        return broker
    raise BrokerError(f"unsupported broker URL {url!r}")


def _redact(url: str) -> str:
    """``url`` with its password replaced, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))
