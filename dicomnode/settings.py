"""Typed configuration: one YAML file validated by pydantic, errors with file, line and field.

Settings are built once in ``main()`` and passed down; nothing here is read at import time.
"""

from __future__ import annotations

import ipaddress
import re
import ssl
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from dicomnode.errors import ConfigError
from routing.rules import Rule
from runners.demo_config import DEMO_MODELS, DEMO_RULES
from runners.modelspec import ModelSpec

__all__ = [
    "AllowedCaller",
    "BrokerSettings",
    "CompletionSettings",
    "DatabaseSettings",
    "DeliverySettings",
    "JobSettings",
    "LoggingSettings",
    "NodeSettings",
    "RemoteNode",
    "Settings",
    "StorageSettings",
    "WatchFolder",
    "embedded_settings",
    "field_path",
    "load_settings",
]

_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # any printable ASCII but backslash


def _check_ae(value: str) -> str:
    value = value.strip()
    if not _AE_RE.match(value):
        raise ValueError(
            f"{value!r} is not a valid AE title: "
            "use 1 to 16 printable ASCII characters, no backslash"
        )
    return value


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AllowedCaller(_Model):
    """A calling AE title allowed to associate, optionally only from one address or network."""

    ae_title: str
    host: str | None = None

    _v_ae = field_validator("ae_title")(_check_ae)

    @field_validator("host")
    @classmethod
    def _v_host(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                ipaddress.ip_network(value, strict=False)
            except ValueError as exc:
                raise ValueError(
                    f"{value!r} is not an IP address or network (e.g. 192.0.2.7 or 10.1.0.0/16)"
                ) from exc
        return value

    def admits(self, ae_title: str, address: str) -> bool:
        """Whether a caller with this AE title and peer address is allowed."""
        if ae_title.strip() != self.ae_title:
            return False
        if self.host is None:
            return True
        try:
            return ipaddress.ip_address(address) in ipaddress.ip_network(self.host, strict=False)
        except ValueError:
            return False


class NodeSettings(_Model):
    """The node's own DICOM identity and listener."""

    ae_title: str = "DICOMNODE"
    host: str = "0.0.0.0"
    port: int = Field(11112, ge=0, le=65535)
    allowed_calling_aes: list[AllowedCaller] = Field(default_factory=list)
    max_associations: int = Field(32, ge=1, le=1024)
    processes: int = Field(1, ge=1, le=64)
    network_timeout: float = Field(60.0, gt=0)
    maximum_pdu_size: int = Field(0, ge=0)

    _v_ae = field_validator("ae_title")(_check_ae)

    @field_validator("allowed_calling_aes", mode="before")
    @classmethod
    def _v_allowed(cls, value: Any) -> Any:
        # Plain strings are AE titles allowed from anywhere.
        if isinstance(value, list):
            return [{"ae_title": v} if isinstance(v, str) else v for v in value]
        return value

    def admits(self, ae_title: str, address: str) -> bool:
        """Whether the allow-list admits a caller; an empty list admits everyone."""
        if not self.allowed_calling_aes:
            return True
        return any(c.admits(ae_title, address) for c in self.allowed_calling_aes)


class StorageSettings(_Model):
    """Where instances are kept."""

    root: Path = Path("/var/lib/dicomnode")
    quarantine: Path | None = None
    fsync: bool = True

    @property
    def quarantine_dir(self) -> Path:
        return self.quarantine if self.quarantine is not None else self.root / "quarantine"


class DatabaseSettings(_Model):
    """The index database (SQLite by default, PostgreSQL for scale-out)."""

    url: str = "sqlite:////var/lib/dicomnode/index.db"

    @field_validator("url")
    @classmethod
    def _v_url(cls, value: str) -> str:
        if not re.match(r"^(sqlite|postgresql)(\+\w+)?://", value):
            raise ValueError(
                f"{value!r} is not a supported database URL: use sqlite:////path/index.db "
                "or postgresql://user@host:5432/dbname"
            )
        return value


class WatchFolder(_Model):
    """A drop folder whose files are ingested and then removed (times in seconds)."""

    path: Path
    recursive: bool = True
    stable_seconds: float = Field(1.0, ge=0, description="size must stay unchanged this long")
    poll_seconds: float = Field(2.0, gt=0, description="rescan interval for missed events")
    empty_folder_seconds: float = Field(
        60.0, ge=0, description="an emptied sub-folder unchanged this long is removed"
    )
    unfinished_seconds: float | None = Field(
        None,
        ge=0,
        description="a file no longer open for writing that still looks cut short waits this "
        "long after its last change before it is taken as it is (quarantined when truncated); "
        "default max(30, 3 x stable_seconds)",
    )
    abandoned_seconds: float | None = Field(
        None,
        ge=0,
        description="a file still open for writing by another process and unchanged this long "
        "is taken as it is; default max(300, 10 x stable_seconds)",
    )

    @property
    def unfinished_wait(self) -> float:
        """``unfinished_seconds``, or its default."""
        if self.unfinished_seconds is not None:
            return self.unfinished_seconds
        return max(30.0, 3 * self.stable_seconds)

    @property
    def abandoned_wait(self) -> float:
        """``abandoned_seconds``, or its default."""
        if self.abandoned_seconds is not None:
            return self.abandoned_seconds
        return max(300.0, 10 * self.stable_seconds)

    @model_validator(mode="after")
    def _v_waits(self) -> WatchFolder:
        for name in ("unfinished_seconds", "abandoned_seconds"):
            value = getattr(self, name)
            if value is not None and value < self.stable_seconds:
                raise ValueError(
                    f"{name} ({value:g}) is shorter than stable_seconds "
                    f"({self.stable_seconds:g}): a file must be waited for at least "
                    f"stable_seconds after its last change; raise {name} or leave it unset"
                )
        return self


class CompletionSettings(_Model):
    """When a study counts as complete (seconds)."""

    settle_seconds: float = Field(5.0, ge=0)
    force_seconds: float = Field(3600.0, gt=0)
    check_interval: float = Field(0.5, gt=0)

    @model_validator(mode="after")
    def _v_order(self) -> CompletionSettings:
        if self.force_seconds < self.settle_seconds:
            raise ValueError(
                f"force_seconds ({_number(self.force_seconds)}) must not be shorter than "
                f"settle_seconds ({_number(self.settle_seconds)}): raise force_seconds or "
                "lower settle_seconds"
            )
        return self


_TLS_FILES = {
    "tls_ca": "the CA certificate(s), PEM, that signed the peer's certificate",
    "tls_cert": "our client certificate, PEM (its key may follow in the same file)",
    "tls_key": "the private key, PEM, of tls_cert",
}


class RemoteNode(_Model):
    """A peer in the node registry. With ``tls`` the association runs over TLS (1.2 or newer):
    the peer's certificate is verified against ``tls_ca`` (the system CAs when unset) and, with
    ``tls_verify_hostname``, must name ``host``; ``tls_cert``/``tls_key`` authenticate us."""

    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    tls: bool = False
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_verify_hostname: bool = True

    _v_ae = field_validator("ae_title")(_check_ae)

    @field_validator("tls_ca", "tls_cert", "tls_key")
    @classmethod
    def _v_tls_file(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is not None and not value.is_file():
            what = _TLS_FILES[info.field_name or ""]
            state = "is not a file" if value.exists() else "does not exist"
            raise ValueError(f"{value} {state}: put {what} there, or fix the path")
        return value

    @model_validator(mode="after")
    def _v_tls(self) -> RemoteNode:
        if not self.tls:
            extra = [f for f in _TLS_FILES if getattr(self, f) is not None]
            if extra:
                raise ValueError(
                    f"{', '.join(extra)} set but tls is false: set 'tls: true' to use TLS, "
                    f"or remove {', '.join(extra)}"
                )
            return self
        if self.tls_key is not None and self.tls_cert is None:
            raise ValueError("tls_key is set without tls_cert: add the client certificate")
        self.ssl_context()  # unreadable or mismatched PEM files fail at load, not at delivery
        return self

    def ssl_context(self) -> ssl.SSLContext:
        """A client TLS context for this peer.

        Raises ValueError naming the field whose file cannot be used.
        """
        try:
            ctx = ssl.create_default_context(
                ssl.Purpose.SERVER_AUTH, cafile=str(self.tls_ca) if self.tls_ca else None
            )
        except (ssl.SSLError, OSError) as exc:
            raise ValueError(
                f"tls_ca {self.tls_ca}: cannot load CA certificates ({exc}); "
                "use a PEM file with one or more certificates"
            ) from exc
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.check_hostname = self.tls_verify_hostname
        if self.tls_cert is not None:
            try:
                ctx.load_cert_chain(self.tls_cert, self.tls_key)
            except (ssl.SSLError, OSError) as exc:
                raise ValueError(
                    f"tls_cert {self.tls_cert} / tls_key {self.tls_key}: cannot load the client "
                    f"certificate ({exc}); use PEM files, the key unencrypted and matching the "
                    "certificate"
                ) from exc
        return ctx


class BrokerSettings(_Model):
    """Job transport. ``embedded`` runs an in-process broker and worker threads inside
    ``dicomnode serve``; a redis:// or amqp:// URL lets ``dicomnode worker`` processes share it."""

    url: str = "embedded"
    worker_threads: int = Field(2, ge=1, le=64)
    namespace: str = Field("dicomnode", pattern=r"^[A-Za-z0-9_.-]{1,64}$")

    @field_validator("url")
    @classmethod
    def _v_url(cls, value: str) -> str:
        if value != "embedded" and not re.match(r"^(redis|rediss|amqp|amqps)://", value):
            raise ValueError(
                f"{value!r} is not a broker: use embedded, redis://127.0.0.1:6379/0 "
                "or amqp://guest:guest@127.0.0.1:5672/"
            )
        return value


class JobSettings(_Model):
    """Retries of jobs (seconds)."""

    max_attempts: int = Field(3, ge=1, le=100)
    retry_seconds: float = Field(10.0, ge=0)
    lease_seconds: float = Field(3600.0, gt=0, description="a running job is another's after")


class DeliverySettings(_Model):
    """The C-STORE outbox: retries with exponential back-off (seconds)."""

    max_attempts: int = Field(10, ge=1, le=1000)
    retry_seconds: float = Field(5.0, ge=0)
    retry_max_seconds: float = Field(600.0, ge=0)
    timeout: float = Field(30.0, gt=0, description="association and DIMSE timeout")
    lease_seconds: float = Field(120.0, gt=0, description="renewed with every instance sent")


class LoggingSettings(_Model):
    """Logging; patient identifiers stay out of logs unless allowed."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    patient_identifiers: bool = False


class Settings(_Model):
    """The whole configuration of one node."""

    node: NodeSettings = Field(default_factory=NodeSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    watch: list[WatchFolder] = Field(default_factory=list)
    completion: CompletionSettings = Field(default_factory=CompletionSettings)
    nodes: dict[str, RemoteNode] = Field(default_factory=dict)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    rules: list[Rule] = Field(default_factory=list)
    rules_dir: Path | None = None
    models: dict[str, ModelSpec] = Field(default_factory=dict)
    broker: BrokerSettings = Field(default_factory=BrokerSettings)
    jobs: JobSettings = Field(default_factory=JobSettings)
    delivery: DeliverySettings = Field(default_factory=DeliverySettings)
    source: str = Field("<defaults>", exclude=True)


def embedded_settings(data_dir: Path, port: int = 11112) -> Settings:
    """The embedded default: every piece of state under one local folder, the in-process
    broker, and the demo rule and model."""
    data_dir = data_dir.resolve()
    return Settings.model_validate(
        {
            "node": {"port": port},
            "storage": {"root": data_dir / "storage"},
            "database": {"url": f"sqlite:///{data_dir / 'index.db'}"},
            "watch": [{"path": data_dir / "incoming"}],
            "models": DEMO_MODELS,
            "rules": DEMO_RULES,
            "source": f"<embedded default in {data_dir}>",
        }
    )


# --- loading with line numbers -------------------------------------------------------------

_MAPPING = "use a mapping: 'key: value' lines indented below it, or {{key: value}}"
# pydantic error type -> what to write instead, formatted with the error's context and
# {range}, the field's allowed range (if any).
_HINTS = {
    "missing": "add this field",
    "int_parsing": "use a whole number{range}",
    "int_type": "use a whole number{range}",
    "int_from_float": "use a whole number{range}, without a fractional part",
    "float_parsing": "use a number{range}",
    "float_type": "use a number{range}",
    "bool_parsing": "use true or false",
    "bool_type": "use true or false",
    "string_type": "use text; put it in quotes if YAML reads it as a number, true/false or a date",
    "list_type": "use a list: one '- item' line per entry, or [a, b]",
    "dict_type": _MAPPING,
    "model_type": _MAPPING,
    "model_attributes_type": _MAPPING,
    "path_type": "use a file or folder path",
    "literal_error": "use one of these, exactly as written: case matters",
    "enum": "use one of these, exactly as written: case matters",
    "string_pattern_mismatch": "use a value that matches the regular expression {pattern}",
    "string_too_short": "use at least {min_length} character(s)",
    "string_too_long": "use at most {max_length} character(s)",
    "too_short": "use a list of at least {min_length} item(s)",
    "too_long": "use a list of at most {max_length} item(s)",
}
_BOUND_ERRORS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")
# Our own validators (value_error) say what to do in their message.
_SELF_EXPLAINED = ("value_error", "assertion_error")
_FALLBACK_HINT = "see the documented example config/dicomnode.yaml for what this field takes"


def _unwrap(tp: Any) -> Any:
    """``X`` of ``X | None`` and ``Annotated[X, ...]``; anything else as it is."""
    origin = get_origin(tp)
    if origin is Annotated:
        return _unwrap(get_args(tp)[0])
    if origin in (Union, UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return _unwrap(args[0])
    return tp


def _constraints(tp: Any) -> list[Any]:
    """The annotated-types constraints of ``Annotated[X, ...]`` (e.g. list items)."""
    if get_origin(tp) is Annotated:
        return [m for arg in get_args(tp)[1:] for m in getattr(arg, "metadata", [arg])]
    return []


def _field_at(loc: tuple[Any, ...]) -> tuple[Any, list[Any], tuple[Any, ...]]:
    """Follow ``loc`` (a pydantic error's location) through Settings: the type found there (a
    model class, ``int``, ...; None where it cannot be followed), its constraints, and the
    location without pydantic's union member tags (``study.dict[str,any]`` is ``study``)."""
    tp: Any = Settings
    metadata: list[Any] = []
    clean: list[Any] = []
    for part in loc:
        if tp is None:
            clean.append(part)
            continue
        tp = _unwrap(tp)
        origin = get_origin(tp)
        if origin in (Union, UnionType):  # several kinds of value: ``part`` names one
            tp, metadata = None, []
            continue
        clean.append(part)
        if isinstance(part, str) and isinstance(tp, type) and issubclass(tp, BaseModel):
            info = tp.model_fields.get(part)
            tp, metadata = (info.annotation, list(info.metadata)) if info else (None, [])
        elif isinstance(part, int) and origin in (list, tuple, set, frozenset):
            args = get_args(tp)
            tp, metadata = (args[0] if args else None), []
        elif origin is dict:
            args = get_args(tp)
            tp, metadata = (args[1] if len(args) == 2 else None), []
        else:
            tp, metadata = None, []
    return _unwrap(tp), metadata + _constraints(tp), tuple(clean)


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _range_text(metadata: list[Any], ctx: dict[str, Any]) -> str:
    """' from 0 to 65535', ' greater than 0', ... for a field's bounds ('' if it has none);
    the bound an error names (its ctx) wins over the field's."""
    bounds: dict[str, Any] = {}
    for item in metadata:
        for key in ("ge", "gt", "le", "lt"):
            if getattr(item, key, None) is not None:
                bounds[key] = getattr(item, key)
    bounds.update({k: v for k, v in ctx.items() if k in ("ge", "gt", "le", "lt")})
    if "ge" in bounds and "le" in bounds:
        return f" from {_number(bounds['ge'])} to {_number(bounds['le'])}"
    words = {"ge": "at least", "gt": "greater than", "le": "at most", "lt": "less than"}
    parts = [f"{words[k]} {_number(bounds[k])}" for k in ("ge", "gt", "le", "lt") if k in bounds]
    return " " + " and ".join(parts) if parts else ""


def _hint(err: Any, loc: tuple[Any, ...]) -> str:
    """What to do about one pydantic error at ``loc`` of Settings ("" for our own validators,
    whose messages say it)."""
    kind = err["type"]
    ctx: dict[str, Any] = dict(err.get("ctx") or {})
    if kind in _SELF_EXPLAINED:
        return ""
    tp, metadata, _ = _field_at(loc)
    if kind in _BOUND_ERRORS:
        what = "a whole number" if tp is int else "a value"
        return f"use {what}{_range_text(metadata, ctx)}"
    if kind == "extra_forbidden":
        parent, _, _ = _field_at(loc[:-1])
        if isinstance(parent, type) and issubclass(parent, BaseModel):
            known = [k for k, f in parent.model_fields.items() if not f.exclude]
            return f"remove it or check its spelling; allowed here: {', '.join(known)}"
        return "remove it or check its spelling"
    template = _HINTS.get(kind)
    if template is None:
        return _FALLBACK_HINT
    try:
        return template.format(range=_range_text(metadata, ctx), **ctx)
    except (KeyError, IndexError):
        return _FALLBACK_HINT


def field_path(loc: tuple[Any, ...]) -> str:
    """A field's path as it reads in messages: ``node.allowed_calling_aes[1].host`` (list
    entries counted from 0)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def _line_index(node: yaml.Node, path: tuple[Any, ...], out: dict[tuple[Any, ...], int]) -> None:
    out[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            k = key.value
            out[(*path, k)] = key.start_mark.line + 1
            _line_index(value, (*path, k), out)
            out[(*path, k)] = key.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _line_index(item, (*path, i), out)


def _line_for(loc: tuple[Any, ...], lines: dict[tuple[Any, ...], int]) -> int:
    for end in range(len(loc), -1, -1):
        key = tuple(loc[:end])
        if key in lines:
            return lines[key]
    return 1


def _resolve_paths(data: dict[str, Any], base: Path) -> None:
    """Make relative paths in the config relative to the config file's folder."""

    def fix(value: Any) -> Any:
        if isinstance(value, str) and value and not Path(value).is_absolute():
            return str(base / value)
        return value

    storage = data.get("storage")
    if isinstance(storage, dict):
        for key in ("root", "quarantine"):
            if key in storage:
                storage[key] = fix(storage[key])
    watch = data.get("watch")
    if isinstance(watch, list):
        for item in watch:
            if isinstance(item, dict) and "path" in item:
                item["path"] = fix(item["path"])
    models = data.get("models")
    if isinstance(models, dict):
        for spec in models.values():
            if isinstance(spec, dict) and isinstance(spec.get("path"), str):
                spec["path"] = fix(spec["path"])
    if isinstance(data.get("rules_dir"), str):
        data["rules_dir"] = fix(data["rules_dir"])
    nodes = data.get("nodes")
    if isinstance(nodes, dict):
        for item in nodes.values():
            if isinstance(item, dict):
                for key in _TLS_FILES:
                    if key in item:
                        item[key] = fix(item[key])
    db = data.get("database")
    if isinstance(db, dict) and isinstance(db.get("url"), str):
        m = re.match(r"^(sqlite(?:\+\w+)?:///)([^/].*)$", db["url"])
        if m and m.group(2) != ":memory:":
            db["url"] = m.group(1) + str(base / m.group(2))


def _compose(path: Path) -> tuple[Any, dict[tuple[Any, ...], int]]:
    """Parse a YAML file; returns the data and a map of key path -> line number."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read configuration: {exc.strerror}") from exc
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(
            f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}",
            [f"{where}: fix the YAML syntax (indentation, colons, quotes)"],
        ) from exc
    lines: dict[tuple[Any, ...], int] = {}
    if node is not None:
        _line_index(node, (), lines)
    return data, lines


def _problems(
    exc: ValidationError,
    path: Path,
    lines: dict[tuple[Any, ...], int],
    prefix: tuple[Any, ...] = (),
    within: tuple[Any, ...] = (),
) -> list[str]:
    """One ``file:line: field: problem (fix)`` line per error; ``prefix`` is where the
    validated data lies in the file, ``within`` where its model lies in Settings (a rule of a
    rules_dir file is validated alone: ``("rules", 0)``)."""
    problems: list[tuple[int, str]] = []
    for err in exc.errors():
        full = (*within, *err["loc"])
        loc = (*prefix, *_field_at(full)[2][len(within) :])
        hint = _hint(err, full)
        msg = err["msg"].removeprefix("Value error, ")
        line = _line_for(loc, lines)
        problem = f"{path}:{line}: {field_path(loc)}: {msg}"
        problems.append((line, f"{problem} ({hint})" if hint else problem))
    return [text for _, text in sorted(problems, key=lambda p: p[0])]


def _load_rules_dir(folder: Path) -> tuple[list[Rule], list[tuple[Path, int]], list[str]]:
    """Rules from every *.yaml / *.yml file in a folder (a list, or a mapping with 'rules')."""
    rules: list[Rule] = []
    origins: list[tuple[Path, int]] = []
    problems: list[str] = []
    if not folder.is_dir():
        return rules, origins, [f"{folder}: rules_dir is not a folder (create it or fix the path)"]
    files = sorted(p for p in folder.iterdir() if p.suffix in (".yaml", ".yml"))
    for path in files:
        data, lines = _compose(path)
        prefix: tuple[Any, ...] = ()
        if isinstance(data, dict) and set(data) == {"rules"}:
            data, prefix = data["rules"], ("rules",)
        if data is None:
            continue
        if not isinstance(data, list):
            problems.append(f"{path}:1: a rules file holds a list of rules (or 'rules: [...]')")
            continue
        for i, item in enumerate(data):
            try:
                rules.append(Rule.model_validate(item))
                origins.append((path, _line_for((*prefix, i), lines)))
            except ValidationError as exc:
                problems.extend(_problems(exc, path, lines, (*prefix, i), ("rules", i)))
    return rules, origins, problems


def load_settings(path: Path) -> Settings:
    """Read and validate a configuration file (and its rules folder).

    Raises ConfigError listing every problem as ``file:line: field: message (fix)``.
    """
    data, lines = _compose(path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}:1: the configuration must be a mapping of sections (node:, storage:, ...)"
        )
    _resolve_paths(data, path.resolve().parent)
    try:
        settings = Settings.model_validate({**data, "source": str(path)})
    except ValidationError as exc:
        found = _problems(exc, path, lines)
        raise ConfigError(f"{path}: {len(found)} configuration error(s)", found) from None
    origins = [(path, _line_for(("rules", i), lines)) for i in range(len(settings.rules))]
    rules = list(settings.rules)
    problems: list[str] = []
    if settings.rules_dir is not None:
        more, more_origins, problems = _load_rules_dir(settings.rules_dir)
        rules += more
        origins += more_origins
    seen: dict[str, tuple[Path, int]] = {}
    for rule, (file, line) in zip(rules, origins, strict=True):
        if rule.name in seen:
            first = seen[rule.name]
            problems.append(
                f"{file}:{line}: rules: the name {rule.name!r} is used again "
                f"(first at {first[0]}:{first[1]}); give every rule its own name"
            )
        seen.setdefault(rule.name, (file, line))
        for dest in rule.destinations:
            if dest != "origin" and dest not in settings.nodes:
                known = ", ".join(sorted(settings.nodes)) or "none registered"
                problems.append(
                    f"{file}:{line}: rules.{rule.name}.destinations: {dest!r} is not in the "
                    f"nodes registry ({known}); add it under 'nodes:' or use 'origin'"
                )
    if problems:
        raise ConfigError(f"{path}: {len(problems)} configuration error(s)", problems)
    return settings.model_copy(update={"rules": rules})
