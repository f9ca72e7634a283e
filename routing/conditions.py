"""Conditions on attributes, with an explanation of every decision.

A condition is a mapping of attribute name to matcher; all entries must hold. The keys ``all``,
``any`` and ``not`` combine conditions. A matcher is

- a scalar: equality (text compared after trimming; numbers numerically),
- a list of scalars: any of them,
- a mapping with one or more of ``equals``, ``in``, ``regex``, ``glob``, ``gt``, ``ge``, ``lt``,
  ``le``, ``present``, ``not`` (all must hold).

A missing attribute never raises: it makes the matcher fail (except ``present: false``).
Multi-valued attributes (``ImageType = ORIGINAL\\PRIMARY\\AXIAL``) match when any value matches,
or when the whole backslash-joined text matches.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Condition", "ConditionError", "Outcome", "compile_condition"]

_OPS = ("equals", "in", "regex", "glob", "gt", "ge", "lt", "le", "present", "not")
_COMBINATORS = ("all", "any", "not")


class ConditionError(ValueError):
    """A condition in a rule is malformed; the message says what and how to fix it."""


@dataclass(frozen=True)
class Outcome:
    """Whether a condition held, and the reasons (what failed on which value)."""

    matched: bool
    reasons: tuple[str, ...] = field(default_factory=tuple)


def _values(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value]
    text = str(value).strip()
    parts = text.split("\\") if "\\" in text else []
    return [text, *parts]


def _number(value: Any) -> float | None:
    try:
        return float(str(value).strip())
    except (TypeError, ValueError):
        return None


def _same(expected: Any, actual: str) -> bool:
    if isinstance(expected, bool):
        return actual.lower() in (("true", "1", "yes") if expected else ("false", "0", "no"))
    if isinstance(expected, (int, float)):
        n = _number(actual)
        return n is not None and n == float(expected)
    return str(expected).strip() == actual


class _Matcher:
    """One attribute's test."""

    def __init__(self, spec: Any, where: str) -> None:
        self.where = where
        self.tests: list[tuple[str, Any]] = []
        if isinstance(spec, Mapping):
            unknown = [k for k in spec if k not in _OPS]
            if unknown:
                raise ConditionError(
                    f"{where}: unknown operator {unknown[0]!r}; use one of {', '.join(_OPS)}"
                )
            for op, arg in spec.items():
                self.tests.append((op, self._prepare(op, arg)))
        elif isinstance(spec, list):
            self.tests.append(("in", self._prepare("in", spec)))
        else:
            self.tests.append(("equals", spec))

    def _prepare(self, op: str, arg: Any) -> Any:
        if op == "regex":
            try:
                return re.compile(str(arg))
            except re.error as exc:
                raise ConditionError(f"{self.where}: invalid regex {arg!r}: {exc}") from exc
        if op in ("gt", "ge", "lt", "le"):
            if _number(arg) is None:
                raise ConditionError(f"{self.where}: {op} needs a number, got {arg!r}")
            return float(arg)
        if op == "in":
            if not isinstance(arg, list) or not arg:
                raise ConditionError(f"{self.where}: 'in' needs a non-empty list")
            return arg
        if op == "present":
            if not isinstance(arg, bool):
                raise ConditionError(f"{self.where}: 'present' takes true or false")
            return arg
        if op == "not":
            return _Matcher(arg, self.where + ".not")
        if op == "glob":
            return str(arg)
        return arg

    def check(self, name: str, value: Any) -> str | None:
        """None when it holds, else the reason it does not."""
        values = _values(value)
        shown = "missing" if value is None else repr(value)
        for op, arg in self.tests:
            if op == "present":
                if (value is not None and value != "") != arg:
                    return f"{name} is {shown}, expected it {'present' if arg else 'absent'}"
                continue
            if op == "not":
                if arg.check(name, value) is None:
                    return f"{name} is {shown}, which the 'not' excludes"
                continue
            if value is None or value == "":
                return f"{name} is missing (needed {op} {_show(arg)})"
            if not self._holds(op, arg, values):
                return f"{name} is {shown}, not {op} {_show(arg)}"
        return None

    @staticmethod
    def _holds(op: str, arg: Any, values: list[str]) -> bool:
        if op == "equals":
            return any(_same(arg, v) for v in values)
        if op == "in":
            return any(_same(a, v) for a in arg for v in values)
        if op == "regex":
            return any(arg.search(v) for v in values)
        if op == "glob":
            return any(fnmatch.fnmatchcase(v.upper(), arg.upper()) for v in values)
        numbers = [n for n in (_number(v) for v in values) if n is not None]
        if op == "gt":
            return any(n > arg for n in numbers)
        if op == "ge":
            return any(n >= arg for n in numbers)
        if op == "lt":
            return any(n < arg for n in numbers)
        if op == "le":
            return any(n <= arg for n in numbers)
        raise AssertionError(op)


def _show(arg: Any) -> str:
    if isinstance(arg, re.Pattern):
        return repr(arg.pattern)
    if isinstance(arg, _Matcher):
        return "(condition)"
    if isinstance(arg, float) and arg.is_integer():
        return str(int(arg))
    return repr(arg)


class Condition:
    """A compiled condition; ``evaluate(attributes)`` says whether it holds and why not."""

    def __init__(self, kind: str, parts: list[Any]) -> None:
        self.kind = kind  # "all", "any", "not", "attr"
        self.parts = parts

    def evaluate(self, attributes: Mapping[str, Any]) -> Outcome:
        if self.kind == "attr":
            name, matcher = self.parts
            reason = matcher.check(name, _lookup(attributes, name))
            return Outcome(reason is None, (reason,) if reason else ())
        results = [p.evaluate(attributes) for p in self.parts]
        if self.kind == "all":
            failed = [r for res in results if not res.matched for r in res.reasons]
            return Outcome(not failed, tuple(failed))
        if self.kind == "any":
            if any(r.matched for r in results):
                return Outcome(True)
            reasons = [r for res in results for r in res.reasons]
            return Outcome(False, (f"none of: {'; '.join(reasons)}",))
        # not
        inner = results[0]
        if inner.matched:
            return Outcome(False, ("the 'not' condition matched",))
        return Outcome(True)


def _lookup(attributes: Mapping[str, Any], name: str) -> Any:
    if name in attributes:
        return attributes[name]
    lowered = name.lower()
    for key, value in attributes.items():
        if key.lower() == lowered:
            return value
    return None


def compile_condition(spec: Any, where: str = "condition") -> Condition:
    """Compile a condition from its YAML form; raises ConditionError naming ``where``."""
    if spec is None:
        return Condition("all", [])
    if isinstance(spec, list):
        return Condition("all", [compile_condition(s, f"{where}[{i}]") for i, s in enumerate(spec)])
    if not isinstance(spec, Mapping):
        raise ConditionError(
            f"{where}: a condition is a mapping of attribute: matcher "
            f"(or all/any/not), got {spec!r}"
        )
    parts: list[Condition] = []
    for key, value in spec.items():
        key = str(key)
        at = f"{where}.{key}"
        if key in ("all", "any"):
            if not isinstance(value, list) or not value:
                raise ConditionError(f"{at}: '{key}' takes a non-empty list of conditions")
            sub = [compile_condition(v, f"{at}[{i}]") for i, v in enumerate(value)]
            parts.append(Condition(key, sub))
        elif key == "not":
            parts.append(Condition("not", [compile_condition(value, at)]))
        else:
            if not re.match(r"^[A-Za-z][A-Za-z0-9_.]*$", key):
                raise ConditionError(f"{at}: {key!r} is not an attribute name")
            parts.append(Condition("attr", [key, _Matcher(value, at)]))
    return parts[0] if len(parts) == 1 else Condition("all", parts)
