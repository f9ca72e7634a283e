"""The demo pipeline's configuration (no heavy imports: the settings module uses it).

Brain extraction with deepbet's bundled TorchScript weights on any MR series whose description
mentions T1; the SEG and RTSTRUCT are stored with the study.
"""

from __future__ import annotations

import importlib.metadata
from typing import Any

__all__ = ["DEEPBET_VERSION", "DEMO_MODELS", "DEMO_MODELS_YAML", "DEMO_RULES"]

try:
    DEEPBET_VERSION = importlib.metadata.version("deepbet")
except importlib.metadata.PackageNotFoundError:  # pragma: no cover - deepbet is a dependency
    DEEPBET_VERSION = "unknown"

DEMO_MODELS_YAML = f"""\
models:
  brain-extraction:
    kind: entrypoint
    entrypoint: runners.demo:deepbet_brain
    version: "{DEEPBET_VERSION}"
    inputs: [t1]
    structures:
      - {{label: 1, name: Brain, type: brain}}
    results: [seg, rtstruct]
"""

DEMO_MODELS: dict[str, dict[str, Any]] = {
    "brain-extraction": {
        "kind": "entrypoint",
        "entrypoint": "runners.demo:deepbet_brain",
        "version": DEEPBET_VERSION,
        "inputs": ["t1"],
        "structures": [{"label": 1, "name": "Brain", "type": "brain"}],
        "results": ["seg", "rtstruct"],
    }
}


DEMO_RULES: list[dict[str, Any]] = [
    {
        "name": "demo-brain-extraction",
        "series": {"Modality": "MR", "SeriesDescription": {"regex": "(?i)t1"}},
        "action": "run",
        "pipeline": "brain-extraction",
    }
]
