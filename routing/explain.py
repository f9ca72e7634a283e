"""``dicomnode route test``: every rule's decision for files or folders, and why."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from routing.rules import Decision, Rule, StudyView, evaluate_rules
from routing.views import study_views_from_files

__all__ = ["explain_files", "planned_jobs"]


def planned_jobs(decisions: list[Decision]) -> list[dict[str, Any]]:
    """The jobs matched rules would create (discards are recorded, not run)."""
    jobs = []
    for d in decisions:
        if not d.matched:
            continue
        jobs.append(
            {
                "rule": d.rule.name,
                "action": d.rule.action,
                "pipeline": d.rule.pipeline,
                "priority": d.rule.priority,
                "inputs": d.inputs,
                "destinations": list(d.rule.destinations),
            }
        )
    return jobs


def _study_report(view: StudyView, rules: list[Rule]) -> dict[str, Any]:
    decisions = evaluate_rules(rules, view, final=True)
    waiting = evaluate_rules(rules, view, final=False)
    return {
        "study_instance_uid": view.study_instance_uid,
        "patient_id": view.attributes.get("PatientID"),
        "series": [
            {
                "series_instance_uid": s.series_instance_uid,
                "modality": s.attributes.get("Modality"),
                "series_description": s.attributes.get("SeriesDescription"),
                "instances": s.attributes.get("instances"),
            }
            for s in view.series
        ],
        "rules": [
            {
                "rule": d.rule.name,
                "matched": d.matched,
                "held_while_receiving": w.held,
                "reasons": d.reasons,
                "inputs": d.inputs,
                "missing_inputs": d.missing,
                "explanation": d.explain(),
            }
            for d, w in zip(decisions, waiting, strict=True)
        ],
        "jobs": planned_jobs(decisions),
        "unmatched": not any(d.matched for d in decisions),
    }


def explain_files(
    rules: list[Rule], paths: Iterable[Path], source: dict[str, Any]
) -> tuple[list[dict[str, Any]], list[str]]:
    """A report per study found in ``paths``, and the files that could not be read."""
    views, skipped = study_views_from_files(paths, source)
    return [_study_report(v, rules) for v in views], skipped


def format_report(reports: list[dict[str, Any]], skipped: list[str]) -> str:
    """The human-readable form of ``explain_files``."""
    lines: list[str] = []
    for rep in reports:
        lines.append(f"study {rep['study_instance_uid']} (patient {rep['patient_id'] or '-'})")
        for s in rep["series"]:
            lines.append(
                f"  series {s['modality'] or '--'} {s['series_description'] or ''} "
                f"({s['instances']} instances) [{s['series_instance_uid']}]"
            )
        for r in rep["rules"]:
            lines.append(f"  {r['explanation']}")
            if not r["matched"] and r["held_while_receiving"]:
                lines.append("      (while the study is still receiving, this rule waits)")
        if rep["unmatched"]:
            lines.append("  => no rule matches: the study is kept and recorded as unmatched")
        for job in rep["jobs"]:
            what = job["pipeline"] if job["action"] == "run" else job["action"]
            series = sum(len(v) for v in job["inputs"].values())
            dest = ", ".join(job["destinations"]) or "-"
            if job["action"] == "discard":
                lines.append(f"  => discard {series} series (recorded) by rule {job['rule']}")
            else:
                lines.append(
                    f"  => job: rule {job['rule']} {what} ({job['priority']}) on {series} "
                    f"series -> {dest}"
                )
        lines.append("")
    for s in skipped:
        lines.append(f"not read: {s}")
    return "\n".join(lines).rstrip() + "\n"
