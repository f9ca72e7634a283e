"""The demo model: deepbet brain extraction on a T1-weighted MR head volume.

``deepbet`` ships its TorchScript weights inside its wheel (a bounding-box network at 128³ and
the mask network at 256³). :func:`deepbet_brain` runs deepbet's own ``BrainExtraction`` steps
(intensity normalisation, bounding box, mask, largest component, filled holes) on the image in
memory, without deepbet's file-based interface, and returns the brain as label 1 on the input's
grid. Declare it with :data:`DEMO_MODELS_YAML` (or :data:`DEMO_MODELS`).
"""

from __future__ import annotations

import threading
import warnings
from functools import lru_cache
from typing import Any

import numpy as np
import SimpleITK

from runners.modelspec import ModelSpec

__all__ = ["DEEPBET_VERSION", "DEMO_MODELS", "DEMO_MODELS_YAML", "deepbet_brain"]

sitk: Any = SimpleITK  # untyped C++ bindings

from runners.demo_config import DEEPBET_VERSION, DEMO_MODELS, DEMO_MODELS_YAML  # noqa: E402

# BrainExtraction keeps the last bounding box on the instance between its steps.
_lock = threading.Lock()


@lru_cache(maxsize=2)
def _extractor(device: str) -> Any:
    import torch
    from deepbet import BrainExtraction

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"`torch\.jit\.load` is deprecated", DeprecationWarning)
        bet = BrainExtraction(no_gpu=True)  # loads on the CPU; moved below
    bet.model.to(torch.device(device))
    bet.bbox_model.to(torch.device(device))
    return bet


def deepbet_brain(images: dict[str, Any], spec: ModelSpec) -> Any:
    """Brain mask (uint8, brain = 1) of the T1 volume ``images[spec.inputs[0]]``, on its grid.

    Runs on ``spec.device`` (``run_model`` fills it in; CPU when unset). deepbet works on the
    voxel grid as given, reoriented to RAS axes like ``nibabel.as_closest_canonical``.
    """
    import torch

    image = images[spec.inputs[0]]
    code = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())
    ras = sitk.DICOMOrient(sitk.Cast(image, sitk.sitkFloat32), "RAS")
    # SimpleITK arrays are (z, y, x); deepbet expects nibabel's (x, y, z).
    volume = np.ascontiguousarray(sitk.GetArrayFromImage(ras).transpose(2, 1, 0))
    bet = _extractor(spec.device or "cpu")
    with _lock, torch.inference_mode():
        probability = bet.run_model(volume)
        mask = bet.postprocess(probability > 0.5)
    label = sitk.GetImageFromArray(np.ascontiguousarray(mask.transpose(2, 1, 0), dtype=np.uint8))
    label.CopyInformation(ras)
    label = sitk.DICOMOrient(label, code)
    label.CopyInformation(image)
    return label
