"""The one ingest path shared by the C-STORE SCP and the watched folder.

An instance is parsed only far enough to index it (the header up to group 0x0028, never pixel
data), written durably under the storage root, and its index row committed. Only then does the
caller acknowledge it. Unreadable input goes to quarantine with a reason.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import logging
import os
import sqlite3
import struct
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset, read_preamble
from pydicom.tag import BaseTag
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from sqlalchemy import Connection, Engine, bindparam, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import configure_mappers

from dicomnode.errors import QuarantinedError, StorageError
from dicomnode.headerscan import KNOWN_VRS, HeaderScanner, NotHandled
from dicomnode.partial import unfinished_dataset
from dicomnode.resend import DEFLATED_TRANSFER_SYNTAXES, conflict
from storage.db import sqlite_pragmas, utcnow
from storage.filestore import FileImage, FileStore
from storage.models import Instance, QuarantineRecord, Series, Study, StudyState

__all__ = [
    "IMPLEMENTATION_CLASS_UID",
    "SERIES_EXTRA_KEYWORDS",
    "IngestResult",
    "Ingestor",
    "Source",
]

logger = logging.getLogger(__name__)

IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.10.1475.1"
IMPLEMENTATION_VERSION = "DICOMNODE_010"
_MAX_HEADER_TAG = 0x0029_0000  # everything routing needs lies before group 0x0029

_STUDY_FIELDS = {
    "patient_id": ("PatientID", 64),
    "patient_name": ("PatientName", 324),
    "patient_birth_date": ("PatientBirthDate", 8),
    "patient_sex": ("PatientSex", 16),
    "accession_number": ("AccessionNumber", 64),
    "study_id": ("StudyID", 16),
    "study_date": ("StudyDate", 8),
    "study_time": ("StudyTime", 16),
    "study_description": ("StudyDescription", 64),
    "referring_physician_name": ("ReferringPhysicianName", 324),
    "institution_name": ("InstitutionName", 64),
}
_SERIES_FIELDS = {
    "modality": ("Modality", 16),
    "series_description": ("SeriesDescription", 64),
    "body_part_examined": ("BodyPartExamined", 64),
    "protocol_name": ("ProtocolName", 64),
    "manufacturer": ("Manufacturer", 64),
    "station_name": ("StationName", 16),
    "frame_of_reference_uid": ("FrameOfReferenceUID", 64),
}
# Extra attributes kept per series for routing rules.
SERIES_EXTRA_KEYWORDS = (
    "ImageType",
    "SeriesDate",
    "SeriesTime",
    "ManufacturerModelName",
    "SliceThickness",
    "ContrastBolusAgent",
    "ScanningSequence",
    "SequenceName",
    "MagneticFieldStrength",
    "InstitutionalDepartmentName",
    "PerformedProcedureStepDescription",
    "ImageOrientationPatient",
    "Rows",
    "Columns",
)


@dataclass(frozen=True)
class Source:
    """Where an instance came from: a DICOM association or a watched folder."""

    kind: str  # "dicom" or "folder"
    calling_ae: str | None = None
    called_ae: str | None = None
    peer_address: str | None = None
    folder: str | None = None

    def describe(self) -> str:
        if self.kind == "folder":
            return f"folder {self.folder}"
        return f"{self.calling_ae}@{self.peer_address} -> {self.called_ae}"


@dataclass(frozen=True)
class IngestResult:
    """What happened to one instance."""

    duplicate: bool
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    size_bytes: int
    path: str


@dataclass
class _Header:
    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class: str
    study: dict[str, Any]
    series: dict[str, Any]
    extra: dict[str, Any]
    instance_number: int | None
    series_number: int | None


def _stop_after_header(tag: BaseTag, _vr: str | None, _length: int) -> bool:
    return int(tag) >= _MAX_HEADER_TAG


# Header values: a pydicom Dataset, or the keyword -> text mapping of the fast reader.
_Values = Dataset | dict[str, str]


def _text(ds: _Values, keyword: str, limit: int) -> str | None:
    """A header value as bounded text; undecodable values fall back to their raw bytes."""
    if isinstance(ds, dict):
        scanned = ds.get(keyword)
        if not scanned:
            return None
        scanned = scanned.replace("\x00", "").strip()
        return scanned[:limit] or None
    try:
        elem = ds[keyword]
    except KeyError:
        return None
    except Exception:  # a value that cannot even be converted (bad VR/length)
        return None
    try:
        value = elem.value
        if value is None or value == "":
            return None
        if isinstance(value, (bytes, bytearray)):
            text = bytes(value).decode("latin-1")
        elif isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
            text = "\\".join(str(v) for v in value)
        else:
            text = str(value)
    except Exception:
        raw = getattr(elem, "value", b"")
        text = raw.decode("latin-1") if isinstance(raw, bytes) else repr(raw)
    text = text.replace("\x00", "").strip()
    return text[:limit] or None


def _extra(ds: _Values) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kw in SERIES_EXTRA_KEYWORDS:
        text = _text(ds, kw, 256)
        if text is not None:
            out[kw] = text
    return out


def _int(ds: _Values, keyword: str) -> int | None:
    text = _text(ds, keyword, 16)
    if text is None:
        return None
    try:
        return int(float(text))
    except ValueError:
        return None


def _header_from(ds: _Values, reason_prefix: str) -> _Header:
    uids = {}
    for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        value = _text(ds, kw, 1000)
        if not value:
            raise ValueError(f"{reason_prefix}missing {kw}")
        if len(value) > 64:
            raise ValueError(f"{reason_prefix}{kw} is longer than 64 characters")
        uids[kw] = value
    return _Header(
        study_uid=uids["StudyInstanceUID"],
        series_uid=uids["SeriesInstanceUID"],
        sop_uid=uids["SOPInstanceUID"],
        sop_class=uids["SOPClassUID"],
        study={k: _text(ds, kw, n) for k, (kw, n) in _STUDY_FIELDS.items()},
        series={k: _text(ds, kw, n) for k, (kw, n) in _SERIES_FIELDS.items()},
        extra=_extra(ds),
        instance_number=_int(ds, "InstanceNumber"),
        series_number=_int(ds, "SeriesNumber"),
    )


def _parse_dataset(data: bytes | memoryview, transfer_syntax: str) -> Dataset:
    ts = UID(transfer_syntax)
    if ts in DEFLATED_TRANSFER_SYNTAXES:
        data = zlib.decompress(bytes(data), -zlib.MAX_WBITS)
    implicit = ts == ImplicitVRLittleEndian
    little = ts != "1.2.840.10008.1.2.2"
    return read_dataset(
        io.BytesIO(data), implicit, little, stop_when=_stop_after_header, defer_size=4096
    )


_SCANNER = HeaderScanner(
    [
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "SOPInstanceUID",
        "SOPClassUID",
        "InstanceNumber",
        "SeriesNumber",
        *(kw for kw, _ in _STUDY_FIELDS.values()),
        *(kw for kw, _ in _SERIES_FIELDS.values()),
        *SERIES_EXTRA_KEYWORDS,
    ],
    _MAX_HEADER_TAG,
)


def _read_header(data: bytes | memoryview, transfer_syntax: str) -> _Header:
    """The index header of a dataset: the fast reader for plain data, pydicom otherwise."""
    try:
        values = _SCANNER.scan(data, transfer_syntax)
    except NotHandled:
        return _header_from(_parse_dataset(data, transfer_syntax), "")
    return _header_from(values, "")


def _element(tag: int, vr: bytes, value: bytes, pad: bytes) -> bytes:
    if len(value) % 2:
        value += pad
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, len(value)) + value


def file_meta_bytes(sop_class: str, sop_uid: str, transfer_syntax: str, source_ae: str) -> bytes:
    """Preamble, DICM prefix and group 0002 for a dataset received over the network."""
    body = b"".join(
        (
            struct.pack("<HH2sHI", 0x0002, 0x0001, b"OB", 0, 2) + b"\x00\x01",
            _element(0x00020002, b"UI", sop_class.encode("ascii", "replace"), b"\x00"),
            _element(0x00020003, b"UI", sop_uid.encode("ascii", "replace"), b"\x00"),
            _element(0x00020010, b"UI", transfer_syntax.encode("ascii"), b"\x00"),
            _element(0x00020012, b"UI", IMPLEMENTATION_CLASS_UID.encode(), b"\x00"),
            _element(0x00020013, b"SH", IMPLEMENTATION_VERSION.encode(), b" "),
            _element(0x00020016, b"AE", source_ae.encode("ascii", "replace")[:16], b" ")
            if source_ae
            else b"",
        )
    )
    group_length = struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(body))
    return b"\x00" * 128 + b"DICM" + group_length + body


# Statements of the per-instance path, built once: building a Core statement (values(),
# where(), its cache key) costs more CPU than executing it. Only parameters change per instance.
_FIND_INSTANCE = select(
    Instance.id, Instance.study_pk, Instance.path, Instance.transfer_syntax_uid
).where(Instance.sop_instance_uid == bindparam("b_sop_uid"))
_COUNT_INSTANCE_DUPLICATE = (
    update(Instance)
    .where(Instance.id == bindparam("b_pk"))
    .values(duplicates=Instance.duplicates + 1)
)
_COUNT_STUDY_DUPLICATE = (
    update(Study).where(Study.id == bindparam("b_pk")).values(duplicates=Study.duplicates + 1)
)
# The known-study path: one more instance for a study that is still receiving. The state test
# and the counter update are one statement, so the completion monitor cannot complete the
# version in between; a study that completed meanwhile matches no row and takes the full path,
# which re-opens it as a new version.
_ADD_TO_RECEIVING_STUDY = (
    update(Study)
    .where(
        Study.id == bindparam("b_pk"),
        Study.study_instance_uid == bindparam("b_uid"),
        Study.state == StudyState.RECEIVING,
    )
    .values(
        instances=Study.instances + 1,
        size_bytes=Study.size_bytes + bindparam("b_size"),
        last_received_at=bindparam("b_now"),
        last_activity_at=bindparam("b_now"),
    )
    .returning(Study.version)
)
_ADD_TO_SERIES = (
    update(Series)
    .where(Series.id == bindparam("b_pk"), Series.series_instance_uid == bindparam("b_uid"))
    .values(
        instances=Series.instances + 1,
        size_bytes=Series.size_bytes + bindparam("b_size"),
        last_received_at=bindparam("b_now"),
    )
)
_INSERT_INSTANCE = insert(Instance)
_INSTANCE_KEYS = (
    "sop_instance_uid",
    "sop_class_uid",
    "transfer_syntax_uid",
    "instance_number",
    "path",
    "size_bytes",
    "received_at",
    "duplicates",
    "source_kind",
    "calling_ae",
    "called_ae",
    "peer_address",
    "source_folder",
    "study_pk",
    "series_pk",
    "study_version",
)
_KNOWN_SERIES_LIMIT = 10000


class _DriverStatement:
    """One of the statements every instance runs, rendered once for SQLite and run on the
    driver's cursor: SQLAlchemy's work per execution (cache lookup, parameter processing,
    result objects) was a third of the ingest path's Python time under load."""

    def __init__(self, stmt: Any, column_keys: Sequence[str] | None = None) -> None:
        compiled = stmt.compile(
            dialect=sqlite.dialect(), column_keys=list(column_keys) if column_keys else None
        )
        self.sql = str(compiled)
        self._names = tuple(compiled.positiontup or ())
        # Values fixed in the statement itself (the 1 of instances + 1, the state).
        self._fixed = {
            name: bind.value for name, bind in compiled.binds.items() if not bind.required
        }

    def run(self, connection: sqlite3.Connection, values: dict[str, Any]) -> sqlite3.Cursor:
        params = []
        for name in self._names:
            value = values[name] if name in values else self._fixed[name]
            if isinstance(value, datetime):  # as SQLAlchemy stores DATETIME in SQLite
                value = value.strftime("%Y-%m-%d %H:%M:%S.%f")
            params.append(value)
        try:
            return connection.execute(self.sql, params)
        except sqlite3.Error as exc:  # raised as SQLAlchemy would (IntegrityError, ...)
            raise DBAPIError.instance(self.sql, params, exc, sqlite3.Error) from exc


class _Hot:
    """A statement every instance runs, with its rendering for SQLite's own cursor."""

    def __init__(self, stmt: Any, column_keys: Sequence[str] | None = None) -> None:
        self.stmt = stmt
        self.driver = _DriverStatement(stmt, column_keys)


def _run_on_driver(
    connection: sqlite3.Connection, statement: _Hot, values: dict[str, Any]
) -> tuple[Any, int]:
    cursor = statement.driver.run(connection, values)
    row = cursor.fetchone() if cursor.description else None
    return (row[0] if row else None), cursor.rowcount


def _run_on_engine(conn: Connection, statement: _Hot, values: dict[str, Any]) -> tuple[Any, int]:
    result = conn.execute(statement.stmt, values)
    first = result.first() if result.returns_rows else None
    return (first[0] if first else None), result.rowcount


_HOT_ADD_TO_STUDY = _Hot(_ADD_TO_RECEIVING_STUDY)
_HOT_ADD_TO_SERIES = _Hot(_ADD_TO_SERIES)
_HOT_INSERT_INSTANCE = _Hot(_INSERT_INSTANCE, _INSTANCE_KEYS)


class _WriterLock:
    """Lets one thread of all processes at a time write to an SQLite index.

    SQLite admits one writer; the others retry from its busy handler, which sleeps 1, 2, 5,
    10 ms... between attempts, so with several associations most of their time went to
    sleeping after the lock was already free. A thread lock plus ``flock`` on a file beside
    the database hands the turn over at once. A no-op for other databases.
    """

    def __init__(self, engine: Engine) -> None:
        database = engine.url.database if engine.dialect.name == "sqlite" else None
        self._path = f"{database}.writer-lock" if database and database != ":memory:" else None
        self._thread_lock = threading.Lock()
        self._fd = -1
        self._pid = 0

    def __enter__(self) -> None:
        self._thread_lock.acquire()
        if self._path is None:
            return
        try:
            if self._pid != os.getpid():  # not a descriptor inherited across fork
                self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                self._pid = os.getpid()
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except OSError:
            logger.debug("no writer lock file %s; SQLite's busy handler decides", self._path)

    def __exit__(self, *_exc: object) -> None:
        try:
            if self._path is not None and self._pid == os.getpid():
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        except OSError:
            pass
        finally:
            self._thread_lock.release()


class _DriverConnections:
    """SQLite connections of this process for the statements every instance runs, opened as
    the engine opens its own (same file, same pragmas) but kept out of its pool: taking a
    connection from SQLAlchemy's pool and returning it for every instance was a fifth of the
    ingest path's Python time under load. Not usable for other databases or an in-memory
    SQLite (another connection would be another database)."""

    _IDLE = 16  # connections kept open while unused

    def __init__(self, engine: Engine) -> None:
        url = engine.url
        database = url.database if engine.dialect.name == "sqlite" else None
        usable = database and database != ":memory:" and not url.query
        self._database = database if usable else None
        self._idle: list[sqlite3.Connection] = []
        self._pid = os.getpid()
        # Connections opened before a fork belong to the parent: never used nor closed here.
        self._inherited: list[sqlite3.Connection] = []

    @property
    def usable(self) -> bool:
        return self._database is not None

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A connection whose transaction commits when the block ends, or rolls back."""
        conn = self._take()
        try:
            yield conn
            try:
                conn.commit()
            except sqlite3.Error as exc:  # raised as SQLAlchemy would
                raise DBAPIError.instance("COMMIT", (), exc, sqlite3.Error) from exc
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.rollback()
            raise
        finally:
            if len(self._idle) < self._IDLE:
                self._idle.append(conn)
            else:
                conn.close()

    def _take(self) -> sqlite3.Connection:
        if self._pid != os.getpid():
            self._inherited += self._idle
            self._idle = []
            self._pid = os.getpid()
        try:
            return self._idle.pop()
        except IndexError:
            pass
        assert self._database is not None
        conn = sqlite3.connect(self._database, timeout=30, check_same_thread=False)
        sqlite_pragmas(conn)
        return conn


class _NotKnown(Exception):
    """The cached study/series rows do not take this instance; use the full path."""


class _Mismatch(ValueError):
    """The data set is not what its C-STORE request says it is."""


class _PatientConflict(Exception):
    """The instance names another patient than the study it belongs to (the reason)."""


def _patient_conflict(study_patient: str | None, header: _Header) -> str | None:
    """Why an instance cannot join a study recorded for ``study_patient``, or None."""
    patient = header.study["patient_id"]
    if not study_patient or not patient or patient == study_patient:
        return None
    return (
        f"study {header.study_uid} belongs to another patient: this instance has Patient ID "
        f"{patient!r}, the study {study_patient!r}; instances of one study must name one "
        "patient (correct the Patient ID, or give the study its own Study Instance UID)"
    )


def _differences(stored: bytes, header: _Header) -> str:
    """The index attributes in which ``header`` differs from a stored file's, as a short
    list of keywords ('' when the stored file cannot be read or none differ)."""
    try:
        ds, _ = _parse_file(stored)
        old = _header_from(ds, "")
    except Exception:
        return ""
    names = {"study_uid": "StudyInstanceUID", "series_uid": "SeriesInstanceUID"}
    differ = [kw for field, kw in names.items() if getattr(old, field) != getattr(header, field)]
    for group, fields in ((old.study, _STUDY_FIELDS), (old.series, _SERIES_FIELDS)):
        new = header.study if fields is _STUDY_FIELDS else header.series
        differ += [kw for key, (kw, _) in fields.items() if group.get(key) != new.get(key)]
    differ += [kw for kw in SERIES_EXTRA_KEYWORDS if old.extra.get(kw) != header.extra.get(kw)]
    return ("differs in " + ", ".join(differ[:8])) if differ else ""


def _upsert(model: type[Study] | type[Series], dialect: str) -> Any:
    """An INSERT that can take ON CONFLICT DO NOTHING on both supported databases."""
    if dialect == "postgresql":
        return postgresql.insert(model)
    return sqlite.insert(model)


class Ingestor:
    """Stores instances durably and indexes them; thread-safe, one per process."""

    def __init__(self, engine: Engine, store: FileStore, *, log_identifiers: bool = False) -> None:
        self.engine = engine
        self.store = store
        self.log_identifiers = log_identifiers
        self._dialect = engine.dialect.name
        # (study UID, series UID) -> (study pk, series pk, the study's patient ID) of rows
        # this process indexed into.
        self._known: dict[tuple[str, str], tuple[int, int, str | None]] = {}
        self._writer = _WriterLock(engine)
        self._driver = _DriverConnections(engine)

    # --- entry points ------------------------------------------------------------------

    def ingest_network(
        self,
        dataset: bytes | memoryview,
        transfer_syntax: str,
        sop_class_uid: str,
        sop_instance_uid: str,
        source: Source,
        image: FileImage | None = None,
    ) -> IngestResult:
        """Ingest a dataset received by C-STORE (no file meta; encoded in ``transfer_syntax``).

        ``image``, if given, holds the file to store (its file meta, then ``dataset``) in an
        aligned buffer; it is written as it is when its file meta is the one this instance
        gets (see FileStore.put_image), else the file is put together from its parts.
        Raises QuarantinedError when the dataset is unusable, StorageError when it could
        not be kept (disk, database).
        """
        try:
            header = _read_header(dataset, transfer_syntax)
            for what, ours, requested in (
                ("SOP Instance UID", header.sop_uid, sop_instance_uid),
                ("SOP Class UID", header.sop_class, sop_class_uid),
            ):
                if ours != requested:
                    raise _Mismatch(
                        f"{what} in the dataset ({ours}) differs from the C-STORE request "
                        f"({requested})"
                    )
            # The header is read only up to group 0x0029: a dataset cut short after it (a
            # sender's truncated file) must not be acknowledged as stored.
            cut = unfinished_dataset(dataset, transfer_syntax)
            if cut is not None and cut.certain:
                raise ValueError(f"the dataset is truncated: {cut.reason}")
        except Exception as exc:  # any parse failure means the data is unusable as sent
            meta = file_meta_bytes(sop_class_uid, sop_instance_uid, transfer_syntax, "")
            reason = f"cannot index dataset: {_describe(exc)}"
            error = self._quarantine(
                (meta, dataset), reason, source, sop_instance_uid=sop_instance_uid
            )
            if isinstance(exc, _Mismatch):
                error.kind = "mismatch"
            raise error from exc
        meta = file_meta_bytes(
            header.sop_class, header.sop_uid, transfer_syntax, source.calling_ae or ""
        )
        if image is not None and (
            image.length != len(meta) + len(dataset) or image.view[: len(meta)] != meta
        ):
            image = None
        return self._store(header, transfer_syntax, (meta, dataset), source, image=image)

    def ingest_file(self, path: Path, source: Source, data: bytes | None = None) -> IngestResult:
        """Ingest a DICOM Part 10 file (or a bare dataset) from disk, stored as it is.

        ``data``, when given, is the file's content already read by the caller (the folder
        watcher reads through a descriptor that does not follow symbolic links).
        """
        if data is None:
            data = path.read_bytes()
        try:
            ds, transfer_syntax = _parse_file(data)
            header = _header_from(ds, "")
        except Exception as exc:
            reason = f"not a readable DICOM instance: {_describe(exc)}"
            raise self._quarantine((data,), reason, source, original=str(path)) from exc
        return self._store(header, transfer_syntax, (data,), source, original=str(path))

    def quarantine_file(
        self, path: Path, reason: str, source: Source, data: bytes | None = None
    ) -> None:
        """Move a file that is not to be stored into quarantine; always raises QuarantinedError."""
        if data is None:
            data = path.read_bytes()
        raise self._quarantine((data,), reason, source, original=str(path))

    def warm_up(self) -> None:
        """Compile the statements every instance runs, once, in a transaction that is rolled
        back. Serving processes forked afterwards inherit the engine's compiled forms (and
        the configured mappers) instead of each paying for them on its first instances."""
        configure_mappers()
        now = utcnow()
        with self.engine.connect() as conn:
            conn.execute(_FIND_INSTANCE, {"b_sop_uid": ""}).first()
            conn.execute(
                _ADD_TO_RECEIVING_STUDY, {"b_pk": -1, "b_uid": "", "b_size": 0, "b_now": now}
            ).all()
            conn.execute(_ADD_TO_SERIES, {"b_pk": -1, "b_uid": "", "b_size": 0, "b_now": now})
            conn.rollback()

    def touch(self, study_uids: Iterable[str]) -> None:
        """Restart the quiet period of these studies (an association that sent them ended)."""
        uids = list(set(study_uids))
        if not uids:
            return
        with self.engine.begin() as conn:
            conn.execute(
                update(Study)
                .where(Study.study_instance_uid.in_(uids), Study.state == StudyState.RECEIVING)
                .values(last_activity_at=utcnow())
            )

    # --- internals -----------------------------------------------------------------------

    def _quarantine(
        self,
        chunks: Iterable[bytes | memoryview],
        reason: str,
        source: Source,
        original: str | None = None,
        sop_instance_uid: str | None = None,
    ) -> QuarantinedError:
        """Keep rejected input with its reason; ``original`` is the file's path (watched
        folder), ``sop_instance_uid`` the C-STORE request's (network)."""
        now = utcnow()
        uid = sop_instance_uid[:64] if sop_instance_uid else None  # from the wire: bounded
        meta = {
            "received_at": now.isoformat(),
            "source": source.describe(),
            "calling_ae": source.calling_ae,
            "peer_address": source.peer_address,
            "original_name": original,
            "sop_instance_uid": uid,
        }
        target = self.store.quarantine(chunks, reason, meta)
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    insert(QuarantineRecord).values(
                        path=str(target),
                        reason=reason,
                        source=source.describe(),
                        size_bytes=target.stat().st_size,
                        received_at=now,
                        original_name=original,
                        sop_instance_uid=uid,
                        calling_ae=source.calling_ae,
                        peer_address=source.peer_address,
                    )
                )
        except SQLAlchemyError:
            logger.exception("quarantine record for %s not indexed (file kept)", target)
        logger.warning("quarantined input from %s: %s -> %s", source.describe(), reason, target)
        return QuarantinedError(reason, str(target))

    def _store(
        self,
        header: _Header,
        transfer_syntax: str,
        chunks: tuple[bytes | memoryview, ...],
        source: Source,
        original: str | None = None,
        image: FileImage | None = None,
    ) -> IngestResult:
        """Store and index one instance: ``chunks`` make the file, ``image`` holds the same
        bytes in an aligned buffer if the receive path gathered them so; ``original`` is the
        dropped file's path, if any."""
        relative = self.store.relative_path(header.study_uid, header.series_uid, header.sop_uid)
        try:
            # An indexed instance always has its file, so where there is none (the usual
            # case) the index need not be asked before storing.
            if self.store.exists(relative):
                indexed = self._indexed(header.sop_uid)
                if indexed is not None:
                    return self._resent(
                        header, transfer_syntax, chunks, source, indexed, relative, original
                    )
            if image is not None:
                size = self.store.put_image(relative, image)
            else:
                size = self.store.put(relative, chunks)
            try:
                self._index(header, transfer_syntax, relative, size, source)
            except IntegrityError:
                # The SOP Instance UID is indexed already: another association indexed it
                # meanwhile, or it came before under other study or series UIDs (then the
                # file just written is not the indexed one and goes again).
                indexed = self._indexed(header.sop_uid)
                if indexed is None:
                    raise
                if indexed.path != relative:
                    self.store.absolute(relative).unlink(missing_ok=True)
                return self._resent(
                    header, transfer_syntax, chunks, source, indexed, relative, original
                )
            except _PatientConflict as exc:
                self.store.absolute(relative).unlink(missing_ok=True)
                raise self._conflict(
                    chunks, str(exc), source, header, original, "other_patient"
                ) from None
        except (OSError, SQLAlchemyError) as exc:
            raise StorageError(f"could not keep {header.sop_uid}: {_describe(exc)}") from exc
        return IngestResult(
            False, header.study_uid, header.series_uid, header.sop_uid, size, relative
        )

    def _indexed(self, sop_uid: str) -> Any:
        """The index row (id, study_pk, path, transfer_syntax_uid) of an instance, or None."""
        with self.engine.connect() as conn:
            return conn.execute(_FIND_INSTANCE, {"b_sop_uid": sop_uid}).first()

    def _resent(
        self,
        header: _Header,
        transfer_syntax: str,
        chunks: tuple[bytes | memoryview, ...],
        source: Source,
        indexed: Any,
        relative: str,
        original: str | None,
    ) -> IngestResult:
        """An indexed SOP Instance UID came again (its copy would be stored at ``relative``):
        counted as a duplicate when it is the same instance, quarantined as a conflict when
        it is other content (see dicomnode.resend)."""
        try:
            stored = self.store.absolute(str(indexed.path)).read_bytes()
        except FileNotFoundError:
            stored = b""  # removed by hand: nothing to compare with; count it
        why = None
        if stored:
            why = conflict(
                stored,
                str(indexed.transfer_syntax_uid),
                chunks,
                transfer_syntax,
                same_place=str(indexed.path) == relative,
            )
        if why is not None:
            differs = _differences(stored, header)
            reason = (
                f"SOP Instance UID {header.sop_uid} is stored already with other content: "
                f"{why}{f' ({differs})' if differs else ''}; the copy stored first is kept"
            )
            raise self._conflict(chunks, reason, source, header, original)
        with self.engine.connect() as conn, self._writer:
            conn.execute(_COUNT_INSTANCE_DUPLICATE, {"b_pk": indexed.id})
            conn.execute(_COUNT_STUDY_DUPLICATE, {"b_pk": indexed.study_pk})
            conn.commit()
        logger.debug("duplicate instance %s", header.sop_uid)
        return IngestResult(
            True, header.study_uid, header.series_uid, header.sop_uid, 0, str(indexed.path)
        )

    def _conflict(
        self,
        chunks: tuple[bytes | memoryview, ...],
        reason: str,
        source: Source,
        header: _Header,
        original: str | None,
        kind: str = "conflict",
    ) -> QuarantinedError:
        error = self._quarantine(chunks, reason, source, original, header.sop_uid)
        error.kind = kind
        return error

    def _index_known(
        self, header: _Header, instance: dict[str, Any], size: int, now: datetime
    ) -> bool:
        """Index an instance of a series this process indexed into before, in three statements
        (the study and series rows exist). False when they no longer take it: the study
        completed meanwhile (it must be re-opened as a new version) or the rows are gone.
        Raises _PatientConflict, as the full path does, for an instance of another patient."""
        key = (header.study_uid, header.series_uid)
        pks = self._known.get(key)
        if pks is None:
            return False
        study_pk, series_pk, patient = pks
        why = _patient_conflict(patient, header)
        if why is not None:
            raise _PatientConflict(why)
        try:
            with self._hot_transaction() as run:
                version, _ = run(
                    _HOT_ADD_TO_STUDY,
                    {"b_pk": study_pk, "b_uid": header.study_uid, "b_size": size, "b_now": now},
                )
                if version is None:
                    raise _NotKnown
                _, added = run(
                    _HOT_ADD_TO_SERIES,
                    {"b_pk": series_pk, "b_uid": header.series_uid, "b_size": size, "b_now": now},
                )
                if added != 1:
                    raise _NotKnown
                run(
                    _HOT_INSERT_INSTANCE,
                    {
                        **instance,
                        "study_pk": study_pk,
                        "series_pk": series_pk,
                        "study_version": version,
                    },
                )
        except _NotKnown:
            self._known.pop(key, None)
            return False
        return True

    @contextmanager
    def _hot_transaction(self) -> Iterator[Callable[[_Hot, dict[str, Any]], tuple[Any, int]]]:
        """A transaction, under the writer lock, for the statements every instance runs; it
        yields a function that runs one and returns (first value returned, if any; rows
        changed). On a file SQLite index they go to a driver connection of this process."""
        with self._writer:
            if self._driver.usable:
                with self._driver.transaction() as driver:
                    yield lambda statement, values: _run_on_driver(driver, statement, values)
            else:
                with self.engine.begin() as conn:
                    yield lambda statement, values: _run_on_engine(conn, statement, values)

    def _index(
        self, header: _Header, transfer_syntax: str, relative: str, size: int, source: Source
    ) -> None:
        now = utcnow()
        src = {
            "source_kind": source.kind,
            "calling_ae": source.calling_ae,
            "called_ae": source.called_ae,
            "peer_address": source.peer_address,
            "source_folder": source.folder,
        }
        instance = {
            "sop_instance_uid": header.sop_uid,
            "sop_class_uid": header.sop_class,
            "transfer_syntax_uid": transfer_syntax,
            "instance_number": header.instance_number,
            "path": relative,
            "size_bytes": size,
            "received_at": now,
            "duplicates": 0,
            **src,
        }
        if self._index_known(header, instance, size, now):
            return
        with self._writer, self.engine.begin() as conn:
            conn.execute(
                _upsert(Study, self._dialect)
                .values(
                    study_instance_uid=header.study_uid,
                    state=StudyState.RECEIVING,
                    version=1,
                    instances=0,
                    size_bytes=0,
                    duplicates=0,
                    first_received_at=now,
                    last_received_at=now,
                    last_activity_at=now,
                    version_started_at=now,
                    **header.study,
                )
                .on_conflict_do_nothing(index_elements=["study_instance_uid"])
            )
            # FOR UPDATE (PostgreSQL; SQLite already holds the write lock): the completion
            # monitor must not complete this version between this read and the instance row.
            study = conn.execute(
                select(Study.id, Study.state, Study.version, Study.patient_id)
                .where(Study.study_instance_uid == header.study_uid)
                .with_for_update()
            ).one()
            why = _patient_conflict(study.patient_id, header)
            if why is not None:
                raise _PatientConflict(why)  # rolls the transaction back
            version = study.version
            if study.state == StudyState.COMPLETE:
                # Late arrival: a new version of the study that will complete again.
                version += 1
                conn.execute(
                    update(Study)
                    .where(Study.id == study.id)
                    .values(
                        state=StudyState.RECEIVING,
                        version=version,
                        version_started_at=now,
                        completed_at=None,
                    )
                )
                logger.info(
                    "study %s re-opened as version %d by a late instance",
                    header.study_uid,
                    version,
                )
            conn.execute(
                _upsert(Series, self._dialect)
                .values(
                    study_pk=study.id,
                    series_instance_uid=header.series_uid,
                    series_number=header.series_number,
                    sop_class_uid=header.sop_class,
                    attributes=header.extra,
                    instances=0,
                    size_bytes=0,
                    first_received_at=now,
                    last_received_at=now,
                    **header.series,
                    **src,
                )
                .on_conflict_do_nothing(index_elements=["series_instance_uid"])
            )
            series_pk = conn.execute(
                select(Series.id).where(Series.series_instance_uid == header.series_uid)
            ).scalar_one()
            conn.execute(
                _INSERT_INSTANCE,
                {
                    **instance,
                    "study_pk": study.id,
                    "series_pk": series_pk,
                    "study_version": version,
                },
            )
            conn.execute(
                update(Study)
                .where(Study.id == study.id)
                .values(
                    instances=Study.instances + 1,
                    size_bytes=Study.size_bytes + size,
                    last_received_at=now,
                    last_activity_at=now,
                )
            )
            conn.execute(
                update(Series)
                .where(Series.id == series_pk)
                .values(
                    instances=Series.instances + 1,
                    size_bytes=Series.size_bytes + size,
                    last_received_at=now,
                )
            )
        if len(self._known) >= _KNOWN_SERIES_LIMIT:
            self._known.clear()
        patient = study.patient_id or header.study["patient_id"]
        self._known[(header.study_uid, header.series_uid)] = (study.id, series_pk, patient)


def _parse_file(data: bytes) -> tuple[Dataset, str]:
    """Parse a file's header; returns the dataset and the transfer syntax its data set is
    encoded in (the file meta's, unless the data set itself says otherwise, see below)."""
    fp = io.BytesIO(data)
    if read_preamble(fp, force=True) is None:
        fp.seek(0)  # no preamble: file meta without it, or a bare data set (old exports)
    meta_ts: str | None = None
    if data[fp.tell() : fp.tell() + 2] == b"\x02\x00":
        from pydicom.filereader import _read_file_meta_info

        meta = _read_file_meta_info(fp)
        if "TransferSyntaxUID" not in meta:
            raise ValueError("file meta information has no Transfer Syntax UID")
        meta_ts = str(meta.TransferSyntaxUID).strip("\x00 ")
    elif fp.tell() == 132:
        raise ValueError("the file has a DICM prefix but no file meta information (group 0002)")
    start = fp.tell()
    ts = _encoding(data[start : start + 8], meta_ts)
    return _parse_dataset(memoryview(data)[start:], ts), ts


def _encoding(first: bytes, declared: str | None) -> str:
    """The transfer syntax of a data set that starts with ``first``: ``declared`` (from the
    file meta), except that an uncompressed little endian data set is taken as explicit or
    implicit VR by what its first element shows. pydicom reads such files by what it sees
    too, and a forward must name the encoding the bytes really have."""
    if declared is not None and declared not in (ImplicitVRLittleEndian, ExplicitVRLittleEndian):
        return declared
    if len(first) < 8:
        if declared is not None:
            return declared
        raise ValueError("file is too short to be DICOM")
    found = ExplicitVRLittleEndian if first[4:6] in KNOWN_VRS else ImplicitVRLittleEndian
    if declared is None:
        if found == ImplicitVRLittleEndian and struct.unpack("<H", first[:2])[0] not in (8, 2):
            raise ValueError("no DICM prefix and the data does not start like a DICOM dataset")
    elif found != declared:
        logger.warning(
            "file meta information says transfer syntax %s, but the data set is encoded in %s; "
            "indexed (and forwarded) as %s",
            declared,
            found,
            found,
        )
    return found


def _describe(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    if isinstance(exc, RecursionError):
        text = "sequences nested too deeply to parse"
    if isinstance(exc, OperationalError):
        text = f"database error: {exc.orig}"
    return text[:500]
