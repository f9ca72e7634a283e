"""The ``dicomnode`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import logging.config
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, selectinload

from dicomnode.errors import ConfigError, DicomNodeError, IndexMissingError
from dicomnode.settings import Settings, embedded_settings, load_settings
from storage.db import index_location, make_engine, missing_index, upgrade_schema
from storage.models import CompletionEvent, QuarantineRecord, Series, Study

__all__ = ["EXIT", "main"]

# Exit codes, documented in README.md (Commands).
EXIT = {
    "ok": 0,
    "failure": 1,
    "usage": 2,
    "config": 3,
    "unreachable": 4,
    "rejected": 5,
    "no_index": 6,
}
DEFAULT_CONFIG = Path("/etc/dicomnode/dicomnode.yaml")

logger = logging.getLogger("dicomnode")


def _setup_logging(level: str) -> None:
    logging.config.dictConfig(
        {
            "version": 1,
            "disable_existing_loggers": False,
            "formatters": {
                "plain": {"format": "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"}
            },
            "handlers": {
                "stderr": {"class": "logging.StreamHandler", "formatter": "plain"},
            },
            "root": {"level": level, "handlers": ["stderr"]},
            # pika (RabbitMQ) logs every connection and channel at INFO
            "loggers": {"pynetdicom": {"level": "WARNING"}, "pika": {"level": "WARNING"}},
        }
    )


def _settings(args: argparse.Namespace) -> Settings:
    if getattr(args, "config", None):
        return load_settings(Path(args.config))
    if getattr(args, "data", None):
        return embedded_settings(Path(args.data), port=getattr(args, "port", None) or 11112)
    if DEFAULT_CONFIG.exists():
        return load_settings(DEFAULT_CONFIG)
    return embedded_settings(Path("dicomnode-data"), port=getattr(args, "port", None) or 11112)


def _add_source(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--config", "-c", help=f"configuration file (default {DEFAULT_CONFIG})")
    g.add_argument(
        "--data",
        help="run the embedded default with all state under this folder (SQLite, local storage)",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dicomnode", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the node: C-STORE SCP, watched folders, completion")
    _add_source(p)
    p.add_argument("--port", type=int, help="listen on this port (overrides the config)")

    p = sub.add_parser("config", help="configuration tools")
    csub = p.add_subparsers(dest="config_command", required=True)
    c = csub.add_parser("check", help="validate a configuration file")
    c.add_argument("file")

    p = sub.add_parser("studies", help="list studies in the index")
    _add_source(p)
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("quarantine", help="list quarantined input with reasons")
    _add_source(p)
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("echo", help="C-ECHO a registered node or HOST:PORT")
    _add_source(p)
    p.add_argument("target", help="a name from the nodes registry, or HOST:PORT")
    p.add_argument("--ae", help="called AE title for HOST:PORT (default ANY-SCP)")
    p.add_argument(
        "--calling-ae",
        metavar="TITLE",
        help="our (calling) AE title (default node.ae_title; a node with an allow-list refuses "
        "its own title unless listed)",
    )
    p.add_argument("--timeout", type=float, default=10.0, help="seconds")

    p = sub.add_parser("route", help="routing rules")
    rsub = p.add_subparsers(dest="route_command", required=True)
    r = rsub.add_parser("test", help="explain every rule's decision for DICOM files or folders")
    _add_source(r)
    r.add_argument("paths", nargs="+", help="DICOM files or folders")
    r.add_argument("--calling-ae", help="pretend the study came from this calling AE title")
    r.add_argument("--called-ae", help="pretend it was sent to this AE title")
    r.add_argument("--peer", help="pretend it came from this address")
    r.add_argument("--json", action="store_true", help="print JSON")

    for name, text in (
        ("jobs", "list jobs with state, attempts and errors"),
        ("deliveries", "list deliveries (outbox) per destination"),
        ("routing", "list routing decisions: routed, held, unmatched, with reasons"),
    ):
        p = sub.add_parser(name, help=text)
        _add_source(p)
        p.add_argument("--json", action="store_true", help="print JSON")
    for name, text in (
        ("retry", "queue a failed job again (and its failed deliveries)"),
        ("cancel", "cancel a queued or running job and its open deliveries"),
    ):
        p = sub.add_parser(name, help=text)
        _add_source(p)
        p.add_argument("job", type=int, help="job id (see 'dicomnode jobs')")

    p = sub.add_parser("worker", help="run a Dramatiq worker for jobs and deliveries")
    _add_source(p)
    p.add_argument("--queues", nargs="+", help="only these queues (jobs.urgent, jobs.normal, ...)")
    p.add_argument("--gpu", help="GPU index for what this worker runs (sets CUDA_VISIBLE_DEVICES)")
    p.add_argument("--threads", type=int, help="worker threads (default broker.worker_threads)")

    p = sub.add_parser("db", help="index database")
    dsub = p.add_subparsers(dest="db_command", required=True)
    d = dsub.add_parser("upgrade", help="apply migrations")
    _add_source(d)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _dispatch(args)
    except ConfigError as exc:
        print(f"dicomnode: {exc}", file=sys.stderr)
        return EXIT["config"]
    except IndexMissingError as exc:
        print(f"dicomnode: {exc}", file=sys.stderr)
        return EXIT["no_index"]
    except DicomNodeError as exc:
        print(f"dicomnode: {exc}", file=sys.stderr)
        return EXIT["failure"]


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "config":
        settings = load_settings(Path(args.file))
        counts = f"{len(settings.watch)} watch folder(s), {len(settings.nodes)} node(s)"
        print(f"{args.file}: OK ({counts})")
        return EXIT["ok"]
    settings = _settings(args)
    if args.command == "serve":
        if args.port is not None:
            settings = settings.model_copy(
                update={"node": settings.node.model_copy(update={"port": args.port})}
            )
        return _serve(settings)
    if args.command == "studies":
        return _studies(settings, args.json)
    if args.command == "quarantine":
        return _quarantine(settings, args.json)
    if args.command == "echo":
        calling = args.calling_ae or settings.node.ae_title
        return _echo(settings, args.target, args.ae, calling, args.timeout)
    if args.command == "route":
        return _route_test(settings, args)
    if args.command in ("jobs", "deliveries", "routing"):
        return _ledger(settings, args.command, args.json)
    if args.command in ("retry", "cancel"):
        return _retry_cancel(settings, args.command, args.job)
    if args.command == "worker":
        return _worker(settings, args)
    if args.command == "db":
        engine = make_engine(settings.database.url)
        upgrade_schema(engine)
        print("index schema is up to date")
        return EXIT["ok"]
    return EXIT["usage"]


def _route_test(settings: Settings, args: argparse.Namespace) -> int:
    from routing.explain import explain_files, format_report

    if args.calling_ae or args.called_ae or args.peer:
        source = {
            "kind": "dicom",
            "calling_ae": args.calling_ae,
            "called_ae": args.called_ae or settings.node.ae_title,
            "peer_address": args.peer,
        }
    else:
        source = {"kind": "folder", "folder": ", ".join(str(Path(p).resolve()) for p in args.paths)}
    reports, skipped = explain_files(settings.rules, [Path(p) for p in args.paths], source)
    if args.json:
        print(json.dumps({"studies": reports, "not_read": skipped}, indent=2))
    else:
        if not settings.rules:
            print(f"no rules in {settings.source}")
        print(format_report(reports, skipped), end="")
    return EXIT["ok"] if reports else EXIT["failure"]


def _ledger(settings: Settings, what: str, as_json: bool) -> int:
    from dicomnode import admin

    engine = _open_index(settings)
    rows = {
        "jobs": admin.job_rows,
        "deliveries": admin.delivery_rows,
        "routing": admin.routing_rows,
    }[what](engine)
    if as_json:
        print(json.dumps(rows, indent=2))
        return EXIT["ok"]
    if not rows:
        print(f"no {what}")
    for r in rows:
        if what == "jobs":
            series = sum(len(v) for v in r["inputs"].values())
            print(
                f"{r['id']:>5}  {r['state']:<9} {r['rule']} ({r['action']}"
                f"{' ' + r['pipeline'] if r['pipeline'] else ''}, {r['priority']}) "
                f"v{r['study_version']} {series} series -> {', '.join(r['destinations']) or '-'}"
                f"  attempts {r['attempts']}/{r['max_attempts']}"
                + (f"\n       error: {r['error']}" if r["error"] else "")
            )
        elif what == "deliveries":
            print(
                f"{r['id']:>5}  {r['state']:<9} job {r['job']} -> {r['destination']} "
                f"({r['ae_title']}@{r['host']}:{r['port']})  {r['delivered']}/{r['instances']} "
                f"delivered  attempts {r['attempts']}/{r['max_attempts']}"
                + (f"\n       last error: {r['last_error']}" if r["last_error"] else "")
            )
        else:
            print(f"{r['study_instance_uid']} v{r['version']}: {r['outcome']}")
            for line in r["explanation"]:
                print(f"    {line}")
    return EXIT["ok"]


def _retry_cancel(settings: Settings, what: str, job_id: int) -> int:
    from dicomnode import admin

    engine = _open_index(settings)
    if what == "retry":
        priority, deliveries = admin.retry_job(engine, job_id)
        parts = ["job queued again"] if priority else []
        if deliveries:
            parts.append(f"{len(deliveries)} delivery(ies) pending again")
        print(f"job {job_id}: {', '.join(parts)}; the running node picks it up")
    else:
        cancelled = admin.cancel_job(engine, job_id)
        print(f"job {job_id}: cancelled ({cancelled} open delivery(ies) cancelled)")
    return EXIT["ok"]


def _worker(settings: Settings, args: argparse.Namespace) -> int:
    import os
    import signal
    import threading

    import dramatiq

    from runners.broker import QUEUES, make_broker
    from runners.tasks import Tasks

    if settings.broker.url == "embedded":
        print(
            "dicomnode: broker.url is 'embedded': jobs run inside 'dicomnode serve'. To run "
            "separate workers set broker.url to redis://HOST:6379/0 (or amqp://...)",
            file=sys.stderr,
        )
        return EXIT["config"]
    unknown = sorted(set(args.queues or ()) - set(QUEUES))
    if unknown:
        print(
            f"dicomnode: unknown queue(s) {', '.join(unknown)}; use {', '.join(QUEUES)}",
            file=sys.stderr,
        )
        return EXIT["usage"]
    if args.gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(args.gpu)
    _setup_logging(settings.logging.level)
    engine = make_engine(settings.database.url)
    upgrade_schema(engine)
    broker = make_broker(settings.broker.url, settings.broker.namespace)
    Tasks(engine, settings, broker)
    worker = dramatiq.Worker(
        broker,
        queues=set(args.queues) if args.queues else None,
        worker_threads=args.threads or settings.broker.worker_threads,
    )
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    worker.start()
    logger.info(
        "worker ready: queues %s, %d thread(s)%s",
        ", ".join(args.queues or QUEUES),
        args.threads or settings.broker.worker_threads,
        f", GPU {args.gpu}" if args.gpu is not None else "",
    )
    from dicomnode.service import wait_interruptibly

    wait_interruptibly(done)
    worker.stop()
    broker.close()
    return EXIT["ok"]


def _serve(settings: Settings) -> int:
    from dicomnode.service import Node

    _setup_logging(settings.logging.level)
    node = Node(settings)
    try:
        node.start()
    except OSError as exc:
        logger.error(
            "cannot start: %s (is node.port %d in use or the storage root writable?)",
            exc,
            settings.node.port,
        )
        return EXIT["failure"]
    node.install_signal_handlers()
    node.wait()
    return EXIT["ok"] if node.failure is None else EXIT["failure"]


def _open_index(settings: Settings) -> Any:
    """The engine of an index that exists (brought to the newest schema). Commands other than
    ``serve``, ``worker`` and ``db upgrade`` never create one: a mistyped --data or --config
    must not look like an empty node."""
    url = settings.database.url
    where = index_location(url)
    try:
        missing = missing_index(url)
    except SQLAlchemyError as exc:
        first = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise DicomNodeError(
            f"cannot open the index database {where}: {first} "
            "(is the database server running, and database.url right?)"
        ) from exc
    if missing is not None:
        raise IndexMissingError(
            f"no dicomnode index at {where}{': ' + missing if missing else ''} "
            "(is --data/--config right? the node creates it on first start, "
            "or run 'dicomnode db upgrade')"
        )
    engine = make_engine(url)
    upgrade_schema(engine)
    return engine


def study_rows(session: Session) -> list[dict[str, Any]]:
    """Every study as a dict (the ``studies --json`` format)."""
    studies = session.scalars(
        select(Study)
        .options(selectinload(Study.series), selectinload(Study.completions))
        .order_by(Study.first_received_at)
    ).all()
    out = []
    for st in studies:
        last: CompletionEvent | None = st.completions[-1] if st.completions else None
        out.append(
            {
                "study_instance_uid": st.study_instance_uid,
                "patient_id": st.patient_id,
                "patient_name": st.patient_name,
                "accession_number": st.accession_number,
                "study_date": st.study_date,
                "study_description": st.study_description,
                "state": st.state,
                "version": st.version,
                "instances": st.instances,
                "size_bytes": st.size_bytes,
                "duplicates": st.duplicates,
                "first_received_at": st.first_received_at.isoformat() + "Z",
                "last_received_at": st.last_received_at.isoformat() + "Z",
                "completed_at": st.completed_at.isoformat() + "Z" if st.completed_at else None,
                "completion_reason": last.reason if last and st.completed_at else None,
                "completions": [
                    {
                        "version": ev.version,
                        "reason": ev.reason,
                        "completed_at": ev.completed_at.isoformat() + "Z",
                        "instances": ev.instances,
                        "version_instances": ev.version_instances,
                    }
                    for ev in st.completions
                ],
                # What was received; the results jobs made (SEG, RTSTRUCT) apart.
                "series": [_series_row(se) for se in st.series if se.source_kind != "result"],
                "results": [
                    {k: v for k, v in _series_row(se).items() if k != "source"}
                    for se in st.series
                    if se.source_kind == "result"
                ],
            }
        )
    return out


def _series_row(se: Series) -> dict[str, Any]:
    return {
        "series_instance_uid": se.series_instance_uid,
        "modality": se.modality,
        "series_number": se.series_number,
        "series_description": se.series_description,
        "body_part_examined": se.body_part_examined,
        "sop_class_uid": se.sop_class_uid,
        "instances": se.instances,
        "size_bytes": se.size_bytes,
        "source": (
            {"folder": se.source_folder}
            if se.source_kind == "folder"
            else {
                "calling_ae": se.calling_ae,
                "called_ae": se.called_ae,
                "peer_address": se.peer_address,
            }
        ),
    }


def _studies(settings: Settings, as_json: bool) -> int:
    engine = _open_index(settings)
    with Session(engine) as session:
        rows = study_rows(session)
    if as_json:
        print(json.dumps(rows, indent=2))
        return EXIT["ok"]
    if not rows:
        print("no studies")
        return EXIT["ok"]
    for st in rows:
        print(
            f"{st['study_instance_uid']}  patient {st['patient_id'] or '-'}  "
            f"{st['study_date'] or '-'}  "
            f"{st['state']} (v{st['version']})  {st['instances']} instances"
        )
        for se in sorted(st["series"], key=_series_order):
            _print_series(se, _series_source(se["source"]))
        for se in sorted(st["results"], key=_series_order):
            _print_series(se, "result of a job")
    return EXIT["ok"]


def _print_series(se: dict[str, Any], where: str) -> None:
    print(
        f"    {se['modality'] or '--':<4} #{_text(se['series_number'], '-'):<4} "
        f"{se['instances']:>5}  {se['series_description'] or ''}  "
        f"[{se['series_instance_uid']}]  {where}"
    )


def _text(value: Any, empty: str) -> str:
    return empty if value is None else str(value)


def _series_order(series: dict[str, Any]) -> tuple[bool, int, str, str]:
    """By series number (series without one last), then description, then UID."""
    number = series["series_number"]
    return (
        number is None,
        number or 0,
        series["series_description"] or "",
        series["series_instance_uid"],
    )


def _series_source(source: dict[str, Any]) -> str:
    """Where a series came from, briefly: ``from CT1@10.0.0.5``, ``from folder /srv/in``."""
    if "folder" in source:
        return f"from folder {source['folder']}"
    return f"from {source.get('calling_ae') or '?'}@{source.get('peer_address') or '?'}"


def _quarantine(settings: Settings, as_json: bool) -> int:
    engine = _open_index(settings)
    with Session(engine) as session:
        records = session.scalars(select(QuarantineRecord).order_by(QuarantineRecord.id)).all()
        rows = [
            {
                "id": r.id,
                "received_at": r.received_at.isoformat() + "Z",
                "reason": r.reason,
                "source": r.source,
                "original_name": r.original_name,
                "sop_instance_uid": r.sop_instance_uid,
                "calling_ae": r.calling_ae,
                "peer_address": r.peer_address,
                "path": r.path,
                "size_bytes": r.size_bytes,
            }
            for r in records
        ]
    if as_json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print("quarantine is empty")
    else:
        for r in rows:
            print(f"{r['received_at']}  {_quarantined_input(r)}: {r['reason']}\n    {r['path']}")
    return EXIT["ok"]


def _quarantined_input(row: dict[str, Any]) -> str:
    """Which input a quarantine record is, briefly: the file (relative to its watched folder)
    or the SOP Instance UID and sender of a C-STORE."""
    if row["original_name"]:
        original = Path(row["original_name"])
        if not row["source"].startswith("folder "):
            return str(original)
        folder = row["source"].removeprefix("folder ")
        name = original.relative_to(folder) if original.is_relative_to(folder) else original
        return f"{name} (folder {folder})"
    if row["sop_instance_uid"] or row["calling_ae"]:
        sender = f"{row['calling_ae'] or '?'}@{row['peer_address'] or '?'}"
        return f"SOP Instance {row['sop_instance_uid'] or '(none)'} from {sender}"
    return str(row["source"])  # recorded before the index kept these details


def _echo(settings: Settings, target: str, ae: str | None, calling_ae: str, timeout: float) -> int:
    """C-ECHO ``target`` as ``calling_ae``: exit 0 on success, 4 when the peer cannot be
    reached, 5 when it refuses the association, 1 on a failure status."""
    from pynetdicom import AE

    from dicomnode.deliver import describe_failure, rejection, tls_args
    from dicomnode.settings import RemoteNode

    if target in settings.nodes:
        remote = settings.nodes[target]
        host, port, called = remote.host, remote.port, remote.ae_title
    else:
        host, sep, port_text = target.rpartition(":")
        if not sep or not port_text.isdigit():
            print(
                f"dicomnode: {target!r} is neither a node in the registry "
                f"({', '.join(settings.nodes) or 'none registered'}) nor HOST:PORT",
                file=sys.stderr,
            )
            return EXIT["usage"]
        port, called = int(port_text), ae or "ANY-SCP"
        try:
            remote = RemoteNode(ae_title=called, host=host, port=port)
        except ValueError as exc:  # pydantic's ValidationError: a bad port or AE title
            print(f"dicomnode: {target!r}: {exc}", file=sys.stderr)
            return EXIT["usage"]
    try:
        client = AE(ae_title=calling_ae)
    except ValueError as exc:  # pynetdicom checks the title: length, characters
        print(f"dicomnode: --calling-ae {calling_ae!r}: {exc}", file=sys.stderr)
        return EXIT["usage"]
    client.add_requested_context("1.2.840.10008.1.1")
    client.acse_timeout = client.network_timeout = client.dimse_timeout = timeout
    client.connection_timeout = timeout  # also bounds a TLS handshake
    assoc = client.associate(host, port, ae_title=called, tls_args=tls_args(remote))
    if not assoc.is_established:
        why = describe_failure(remote, assoc, calling_ae, timeout)
        refused = rejection(assoc)
        if refused is not None:
            if refused[1:] == (1, 3):  # calling AE title not recognised
                why += " (or echo as a title it accepts: --calling-ae TITLE)"
            print(f"C-ECHO as {calling_ae}: {why}", file=sys.stderr)
            return EXIT["rejected"]
        print(f"C-ECHO as {calling_ae}: unreachable: {why}", file=sys.stderr)
        return EXIT["unreachable"]
    status = assoc.send_c_echo()
    assoc.release()
    code = getattr(status, "Status", None)
    if code == 0x0000:
        print(f"C-ECHO {called}@{host}:{port}: success")
        return EXIT["ok"]
    print(f"C-ECHO {called}@{host}:{port}: failed (status {code!r})", file=sys.stderr)
    return EXIT["failure"]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
