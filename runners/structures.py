"""Structures a model produces: label value, name, colour, SNOMED CT codes, RT ROI type.

Defaults cover common organs and tumour sub-regions, so a model config can say
``{label: 1, name: Brain, type: brain}`` and get codes and a colour.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ANATOMY", "DEFAULT_TYPES", "MORPHOLOGY", "Code", "Structure", "default_structure"]


@dataclass(frozen=True)
class Code:
    """A coded concept (SNOMED CT unless said otherwise)."""

    value: str
    meaning: str
    scheme: str = "SCT"


ANATOMY = Code("123037004", "Anatomical Structure")
MORPHOLOGY = Code("49755003", "Morphologically Altered Structure")
_PHYSICAL = Code("260787004", "Physical object")


@dataclass(frozen=True)
class Structure:
    """One label of a model's output."""

    label: int
    name: str
    color: tuple[int, int, int]
    category: Code
    type: Code
    rt_type: str = "ORGAN"  # RT ROI Interpreted Type: ORGAN, GTV, CTV, EXTERNAL, AVOIDANCE, ...


# type key -> (category, type code, colour, RT ROI interpreted type)
DEFAULT_TYPES: dict[str, tuple[Code, Code, tuple[int, int, int], str]] = {
    "brain": (ANATOMY, Code("12738006", "Brain"), (250, 200, 150), "ORGAN"),
    "liver": (ANATOMY, Code("10200004", "Liver"), (221, 130, 101), "ORGAN"),
    "spleen": (ANATOMY, Code("78961009", "Spleen"), (157, 108, 162), "ORGAN"),
    "kidney": (ANATOMY, Code("64033007", "Kidney"), (185, 102, 83), "ORGAN"),
    "lung": (ANATOMY, Code("39607008", "Lung"), (197, 165, 145), "ORGAN"),
    "heart": (ANATOMY, Code("80891009", "Heart"), (206, 110, 84), "ORGAN"),
    "bladder": (ANATOMY, Code("89837001", "Urinary bladder"), (222, 154, 132), "ORGAN"),
    "prostate": (ANATOMY, Code("41216001", "Prostate"), (230, 158, 140), "ORGAN"),
    "spinal_cord": (ANATOMY, Code("2748008", "Spinal cord"), (244, 214, 49), "AVOIDANCE"),
    "body": (ANATOMY, Code("38266002", "Entire body"), (177, 122, 101), "EXTERNAL"),
    "bone": (ANATOMY, Code("272673000", "Bone"), (241, 214, 145), "ORGAN"),
    "tumor": (MORPHOLOGY, Code("108369006", "Neoplasm"), (255, 0, 0), "GTV"),
    "enhancing_tumor": (MORPHOLOGY, Code("108369006", "Neoplasm"), (255, 255, 0), "GTV"),
    "tumor_core": (MORPHOLOGY, Code("108369006", "Neoplasm"), (255, 0, 0), "GTV"),
    "whole_tumor": (MORPHOLOGY, Code("108369006", "Neoplasm"), (0, 255, 0), "GTV"),
    "necrosis": (MORPHOLOGY, Code("6574001", "Necrosis"), (0, 0, 255), "GTV"),
    "edema": (MORPHOLOGY, Code("79654002", "Edema"), (0, 255, 0), "CTV"),
    "lesion": (MORPHOLOGY, Code("52988006", "Lesion"), (255, 128, 0), "GTV"),
    "object": (_PHYSICAL, _PHYSICAL, (128, 174, 128), "ORGAN"),
}


def default_structure(
    label: int,
    name: str,
    type_key: str = "object",
    color: tuple[int, int, int] | None = None,
    rt_type: str | None = None,
) -> Structure:
    """A structure with the default codes, colour and RT type of ``type_key``."""
    try:
        category, code, default_color, default_rt = DEFAULT_TYPES[type_key]
    except KeyError:
        known = ", ".join(sorted(DEFAULT_TYPES))
        raise ValueError(f"unknown structure type {type_key!r}; use one of {known}") from None
    return Structure(
        label=label,
        name=name,
        color=color or default_color,
        category=category,
        type=code,
        rt_type=rt_type or default_rt,
    )
