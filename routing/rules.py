"""Rule models and their evaluation against a study, with an explanation of every decision.

```yaml
rules:
  - name: brain-tumour
    priority: urgent                  # urgent | normal | low
    study: {StudyDescription: {glob: "*BRAIN*"}, source.calling_ae: [PACS]}
    inputs:                           # named inputs, each picks series by its own condition
      t1:    {SeriesDescription: {regex: "(?i)\\bt1\\b(?!.*(post|gd|\\+c))"}}
      t1c:   {SeriesDescription: {regex: "(?i)t1.*(post|gd|\\+c)"}}
    missing_inputs: hold              # hold (until force timeout) | unmatched
    action: run
    pipeline: brats
    destinations: [PACS, origin]
  - name: ct-to-archive
    series: {Modality: CT}            # which series are forwarded (default: all)
    action: forward
    destinations: [ARCHIVE]
  - name: no-mr
    series: {Modality: MR}
    action: discard
```
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from routing.conditions import Condition, ConditionError, compile_condition

__all__ = [
    "PRIORITIES",
    "Decision",
    "Rule",
    "SeriesView",
    "StudyView",
    "evaluate_rules",
]

PRIORITIES = {"urgent": 0, "normal": 5, "low": 9}


@dataclass
class SeriesView:
    """What rules see of one series (DICOM keywords, ``instances`` and ``source.*``)."""

    series_instance_uid: str
    attributes: dict[str, Any]


@dataclass
class StudyView:
    """What rules see of one study: its attributes and its series."""

    study_instance_uid: str
    attributes: dict[str, Any]
    series: list[SeriesView] = field(default_factory=list)

    def series_attributes(self, series: SeriesView) -> dict[str, Any]:
        """Series attributes with the study's as fallback (a series condition may use both)."""
        return {**self.attributes, **series.attributes}


class Rule(BaseModel):
    """One routing rule."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=64)
    priority: Literal["urgent", "normal", "low"] = "normal"
    enabled: bool = True
    study: dict[str, Any] | list[Any] | None = None
    series: dict[str, Any] | list[Any] | None = None
    inputs: dict[str, dict[str, Any] | list[Any]] | None = None
    missing_inputs: Literal["hold", "unmatched"] = "hold"
    action: Literal["run", "forward", "discard"]
    pipeline: str | None = None
    destinations: list[str] = Field(default_factory=list)

    _study: Condition = PrivateAttr()
    _series: Condition = PrivateAttr()
    _inputs: dict[str, Condition] = PrivateAttr(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _v_name(cls, value: str) -> str:
        if not all(c.isalnum() or c in "-_." for c in value):
            raise ValueError("use letters, digits, '-', '_' or '.' in rule names")
        return value

    @model_validator(mode="after")
    def _v_rule(self) -> Rule:
        if self.action == "run" and not self.pipeline:
            raise ValueError("action 'run' needs 'pipeline: NAME'")
        if self.action != "run" and self.pipeline:
            raise ValueError(f"'pipeline' only goes with action 'run', not {self.action!r}")
        if self.action == "forward" and not self.destinations:
            raise ValueError("action 'forward' needs 'destinations: [NODE, ...]'")
        if self.action == "discard" and self.destinations:
            raise ValueError("action 'discard' takes no destinations")
        if self.inputs is not None and self.series is not None:
            raise ValueError("use either 'series' (one input) or 'inputs' (named), not both")
        try:
            self._study = compile_condition(self.study, "study")
            self._series = compile_condition(self.series, "series")
            self._inputs = {
                name: compile_condition(spec, f"inputs.{name}")
                for name, spec in (self.inputs or {}).items()
            }
        except ConditionError as exc:
            raise ValueError(str(exc)) from exc
        return self

    @property
    def priority_value(self) -> int:
        return PRIORITIES[self.priority]


@dataclass
class Decision:
    """What one rule decided for one study."""

    rule: Rule
    matched: bool
    reasons: list[str] = field(default_factory=list)
    # Input name ("series" for a rule without named inputs) -> selected series UIDs.
    inputs: dict[str, list[str]] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    held: bool = False

    @property
    def selected_series(self) -> list[str]:
        seen: dict[str, None] = {}
        for uids in self.inputs.values():
            for uid in uids:
                seen[uid] = None
        return list(seen)

    def explain(self) -> str:
        head = f"rule {self.rule.name} ({self.rule.action}, {self.rule.priority}): "
        if self.held:
            return head + f"held: waiting for input(s) {', '.join(self.missing)}"
        if not self.matched:
            return head + "no match: " + "; ".join(self.reasons)
        picked = ", ".join(f"{k}={len(v)} series" for k, v in self.inputs.items())
        return head + f"matched ({picked})"


def _select(study: StudyView, condition: Condition) -> tuple[list[str], list[str]]:
    picked, why = [], []
    for series in study.series:
        outcome = condition.evaluate(study.series_attributes(series))
        if outcome.matched:
            picked.append(series.series_instance_uid)
        else:
            label = series.attributes.get("SeriesDescription") or series.series_instance_uid
            why.append(f"series {label!s}: {'; '.join(outcome.reasons)}")
    return picked, why


def evaluate_rule(rule: Rule, study: StudyView, *, final: bool = True) -> Decision:
    """Evaluate one rule. ``final`` is False while the study may still receive more series;
    then a rule with ``missing_inputs: hold`` is held instead of unmatched."""
    decision = Decision(rule, matched=False)
    if not rule.enabled:
        decision.reasons.append("rule is disabled")
        return decision
    outcome = rule._study.evaluate(study.attributes)
    if not outcome.matched:
        decision.reasons.extend(outcome.reasons)
        return decision
    if rule.inputs:
        for name, condition in rule._inputs.items():
            picked, why = _select(study, condition)
            decision.inputs[name] = picked
            if not picked:
                decision.missing.append(name)
                decision.reasons.append(
                    f"input {name}: no series matches ({' | '.join(why) or 'no series'})"
                )
        if decision.missing:
            decision.held = rule.missing_inputs == "hold" and not final
            return decision
    else:
        picked, why = _select(study, rule._series)
        decision.inputs["series"] = picked
        if not picked:
            decision.reasons.append("no series matches: " + (" | ".join(why) or "no series"))
            return decision
    decision.matched = True
    return decision


def evaluate_rules(rules: list[Rule], study: StudyView, *, final: bool = True) -> list[Decision]:
    """Every rule's decision for ``study``, most urgent rules first."""
    ordered = sorted(rules, key=lambda r: r.priority_value)
    return [evaluate_rule(r, study, final=final) for r in ordered]


def flatten_source(source: Mapping[str, Any]) -> dict[str, Any]:
    """``{"calling_ae": X}`` -> ``{"source.calling_ae": X}``."""
    return {f"source.{k}": v for k, v in source.items() if v is not None}
