"""The model registry's configuration: ``models: {NAME: ModelSpec}``; a rule's ``pipeline``
names a model.

```yaml
models:
  brain-extraction:
    version: "1.0.2"
    kind: entrypoint                      # entrypoint | torchscript | onnx
    entrypoint: runners.demo:deepbet_brain
    inputs: [t1]                          # rule input names, stacked as channels in this order
    structures:
      - {label: 1, name: Brain, type: brain}
    results: [seg, rtstruct]
  organs:
    version: "2"
    kind: torchscript
    path: models/organs.pt
    inputs: [ct]
    preprocessing:
      orientation: LPS                    # LPS | RAS | none (keep the series' own axes)
      spacing: [1.5, 1.5, 2.0]            # millimetres (x, y, z) or null
      normalize: {kind: ct_window, low: -1000, high: 400}   # ct_window | zscore | percentile | none
      axes: zyx                           # tensor axis order: zyx (SimpleITK/nnU-Net) | xyz (MONAI)
    inference: {patch_size: [96, 96, 96], overlap: 0.5, blending: gaussian, batch_size: 2}
    output: {activation: softmax}         # softmax (argmax) | sigmoid (threshold) | none (labels)
    postprocessing: {largest_component: [1], min_size_mm3: 50}
    structures:
      - {label: 1, name: Liver, type: liver}
      - {label: 2, name: Spleen, type: spleen, color: [157, 108, 162]}
    results: [seg]
    seg_type: binary                      # binary | labelmap
```
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from runners.structures import DEFAULT_TYPES, Structure, default_structure

__all__ = [
    "InferenceSpec",
    "ModelSpec",
    "NormalizeSpec",
    "OutputSpec",
    "PostprocessingSpec",
    "PreprocessingSpec",
    "StructureSpec",
]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StructureSpec(_Model):
    label: int = Field(ge=1, le=65535)
    name: str = Field(min_length=1, max_length=64)
    type: str = "object"
    color: tuple[int, int, int] | None = None
    rt_type: str | None = None

    @field_validator("type")
    @classmethod
    def _v_type(cls, value: str) -> str:
        if value not in DEFAULT_TYPES:
            raise ValueError(
                f"unknown structure type {value!r}; use one of {', '.join(sorted(DEFAULT_TYPES))}"
            )
        return value

    def structure(self) -> Structure:
        return default_structure(self.label, self.name, self.type, self.color, self.rt_type)


class NormalizeSpec(_Model):
    kind: Literal["none", "ct_window", "zscore", "percentile"] = "none"
    low: float | None = None  # HU for ct_window, percent for percentile
    high: float | None = None

    @model_validator(mode="after")
    def _v_bounds(self) -> NormalizeSpec:
        bounded = self.kind in ("ct_window", "percentile")
        if bounded and (self.low is None or self.high is None or self.low >= self.high):
            raise ValueError(f"normalize {self.kind} needs low < high")
        return self


class PreprocessingSpec(_Model):
    orientation: Literal["LPS", "RAS", "none"] = "none"
    spacing: tuple[float, float, float] | None = None
    normalize: NormalizeSpec = Field(default_factory=NormalizeSpec)
    # Spatial order of the model's (N, C, D, H, W) tensor: zyx puts the volume's slice axis
    # first (SimpleITK array order, as nnU-Net reads it); xyz the column axis (nibabel and
    # MONAI's loaders).
    axes: Literal["zyx", "xyz"] = "zyx"


class InferenceSpec(_Model):
    # Voxels along the tensor's (D, H, W) axes (see PreprocessingSpec.axes); None: the whole
    # volume at once.
    patch_size: tuple[int, int, int] | None = None
    overlap: float = Field(0.5, ge=0, lt=1)
    blending: Literal["gaussian", "constant"] = "gaussian"
    batch_size: int = Field(1, ge=1, le=256)


class OutputSpec(_Model):
    activation: Literal["softmax", "sigmoid", "none"] = "softmax"
    threshold: float = Field(0.5, gt=0, lt=1)


class PostprocessingSpec(_Model):
    # Channels (sigmoid output) nested inside each other, outermost first, become one label
    # map: e.g. whole tumour > tumour core > enhancing tumour -> labels [2, 1, 3].
    nested_labels: list[int] | None = None
    largest_component: list[int] = Field(default_factory=list)
    min_size_mm3: float = Field(0, ge=0)


class ModelSpec(_Model):
    """One model: how to run it and what its labels mean."""

    version: str = Field(min_length=1, max_length=64)
    kind: Literal["entrypoint", "torchscript", "onnx"]
    entrypoint: str | None = None
    path: Path | None = None
    inputs: list[str] = Field(default_factory=lambda: ["series"], min_length=1)
    preprocessing: PreprocessingSpec = Field(default_factory=PreprocessingSpec)
    inference: InferenceSpec = Field(default_factory=InferenceSpec)
    output: OutputSpec = Field(default_factory=OutputSpec)
    postprocessing: PostprocessingSpec = Field(default_factory=PostprocessingSpec)
    structures: list[StructureSpec] = Field(min_length=1)
    results: list[Literal["seg", "rtstruct"]] = Field(
        default_factory=lambda: ["seg"],  # type: ignore[arg-type]
        min_length=1,
    )
    seg_type: Literal["binary", "labelmap"] = "binary"
    device: str | None = None  # e.g. cuda:0; default: cuda when the worker has a GPU, else cpu

    @model_validator(mode="after")
    def _v_kind(self) -> ModelSpec:
        if self.kind == "entrypoint":
            if not self.entrypoint or ":" not in self.entrypoint:
                raise ValueError("kind entrypoint needs 'entrypoint: module:function'")
        elif self.path is None:
            raise ValueError(f"kind {self.kind} needs 'path: FILE'")
        labels = [s.label for s in self.structures]
        if len(set(labels)) != len(labels):
            raise ValueError("structure labels must be unique")
        return self
