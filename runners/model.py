"""Run a configured model on SimpleITK volumes and return a label map on the source grid.

Declarative models (TorchScript, ONNX) go through: inputs onto the first input's grid ->
orientation and spacing of the model grid -> intensity normalisation -> channels stacked ->
whole volume or sliding window -> activation -> label post-processing -> nearest-neighbour back
onto the first input's grid. Entry-point models get the input images and return a label image,
which is aligned to the first input's grid the same way.
"""

from __future__ import annotations

import importlib
import logging
import time
import warnings
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import SimpleITK
import torch
from scipy import ndimage

from dicomnode.errors import DicomNodeError
from runners.inference import sliding_window
from runners.modelspec import ModelSpec, NormalizeSpec, PostprocessingSpec
from runners.volumes import to_model_grid, to_source_grid

__all__ = ["ModelError", "load_predictor", "run_model", "select_device"]

logger = logging.getLogger(__name__)
sitk: Any = SimpleITK  # untyped C++ bindings

Image = Any  # SimpleITK.Image
_JIT_LOAD_DEPRECATED = r"`torch\.jit\.load` is deprecated"
EntryPoint = Callable[[dict[str, Image], ModelSpec], Image]


class ModelError(DicomNodeError):
    """A model cannot run as configured or on these inputs (retrying will not help)."""


class Predictor(Protocol):
    def __call__(self, batch: torch.Tensor) -> torch.Tensor: ...


def select_device(requested: str | None = None) -> str:
    """The torch device to run on: ``requested`` if given, else ``cuda:0`` when this process
    sees a GPU (the worker narrows what it sees with ``CUDA_VISIBLE_DEVICES``), else ``cpu``."""
    if requested:
        try:
            device = torch.device(requested)
        except RuntimeError as exc:
            raise ModelError(f"device {requested!r} is not a torch device: {exc}") from exc
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise ModelError(
                    f"device {requested!r} requested but this worker sees no CUDA GPU; "
                    "remove 'device:' to fall back to the CPU"
                )
            if device.index is not None and device.index >= torch.cuda.device_count():
                raise ModelError(
                    f"device {requested!r} requested but this worker sees "
                    f"{torch.cuda.device_count()} GPU(s) (CUDA_VISIBLE_DEVICES)"
                )
        return requested
    return "cuda:0" if torch.cuda.is_available() else "cpu"


# -- model loading ---------------------------------------------------------------------------


class _TorchScript:
    def __init__(self, path: Path, device: str) -> None:
        with warnings.catch_warnings():
            # torch 2.9+ deprecates TorchScript, yet it is how most segmentation models ship.
            warnings.filterwarnings("ignore", _JIT_LOAD_DEPRECATED, DeprecationWarning)
            self.module = torch.jit.load(str(path), map_location=device)  # type: ignore[no-untyped-call]
        self.module.eval()

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return _first_tensor(self.module(batch))


class _Onnx:
    def __init__(self, path: Path, device: str) -> None:
        import onnxruntime as ort

        providers: list[Any] = ["CPUExecutionProvider"]
        dev = torch.device(device)
        if dev.type == "cuda":
            if "CUDAExecutionProvider" in ort.get_available_providers():
                providers.insert(0, ("CUDAExecutionProvider", {"device_id": dev.index or 0}))
            else:
                logger.warning("onnxruntime has no CUDA provider here; running %s on CPU", path)
        self.session = ort.InferenceSession(str(path), providers=providers)
        self.input = self.session.get_inputs()[0].name

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(batch.detach().to("cpu", torch.float32).numpy())
        out = self.session.run(None, {self.input: array})[0]
        return torch.from_numpy(np.asarray(out)).to(batch.device)


def _first_tensor(out: Any) -> torch.Tensor:
    # Deep-supervision networks return several outputs; the first is full resolution.
    if isinstance(out, (tuple, list)):
        out = out[0]
    elif isinstance(out, dict):
        out = next(iter(out.values()))
    if not isinstance(out, torch.Tensor):
        raise ModelError(f"the model returned {type(out).__name__}, not a tensor")
    return out


@lru_cache(maxsize=4)
def _load(kind: str, path: str, mtime_ns: int, device: str) -> Predictor:
    started = time.perf_counter()
    predictor: Predictor = (
        _TorchScript(Path(path), device) if kind == "torchscript" else _Onnx(Path(path), device)
    )
    logger.info("loaded %s model %s on %s in %.1f s", kind, path, device,
                time.perf_counter() - started)  # fmt: skip
    return predictor


def load_predictor(kind: str, path: Path, device: str) -> Predictor:
    """The model at ``path`` as a callable on ``(N, C, D, H, W)`` tensors, loaded once per
    process and kept while the file's modification time stays the same."""
    resolved = path.expanduser().resolve()
    try:
        mtime = resolved.stat().st_mtime_ns
    except OSError as exc:
        raise ModelError(f"model file {path} cannot be read: {exc.strerror}") from exc
    try:
        return _load(kind, str(resolved), mtime, device)
    except ModelError:
        raise
    except Exception as exc:  # torch and onnxruntime raise their own runtime errors
        raise ModelError(f"cannot load {kind} model {path}: {exc}") from exc


def _entrypoint(name: str) -> EntryPoint:
    module_name, _, function_name = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelError(f"entry point {name}: cannot import {module_name}: {exc}") from exc
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ModelError(f"entry point {name}: {module_name} has no function {function_name}")
    return function  # type: ignore[no-any-return]


# -- geometry --------------------------------------------------------------------------------


def _same_grid(a: Image, b: Image) -> bool:
    if a.GetSize() != b.GetSize():
        return False
    spacing = np.asarray(b.GetSpacing())
    return bool(
        np.allclose(a.GetSpacing(), spacing, rtol=1e-5, atol=0)
        and np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-5)
        and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-3 * float(spacing.min()))
    )


def _as_float(image: Image, name: str) -> Image:
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ModelError(
            f"input {name!r} must be a 3D scalar volume, got {image.GetDimension()}D with "
            f"{image.GetNumberOfComponentsPerPixel()} component(s) per voxel"
        )
    return sitk.Cast(image, sitk.sitkFloat32)


def _onto(image: Image, reference: Image) -> Image:
    if _same_grid(image, reference):
        out = sitk.Image(image)
        out.CopyInformation(reference)
        return out
    return sitk.Resample(image, reference, sitk.Transform(), sitk.sitkLinear, 0.0)


# -- intensities and labels ------------------------------------------------------------------


def _normalize(array: npt.NDArray[np.float32], norm: NormalizeSpec) -> npt.NDArray[np.float32]:
    x: npt.NDArray[np.float32] = np.asarray(array, dtype=np.float32)
    if norm.kind == "none":
        return x
    if norm.kind == "zscore":
        std = max(float(x.std()), 1e-8)
        return ((x - np.float32(x.mean())) / np.float32(std)).astype(np.float32)
    assert norm.low is not None and norm.high is not None  # checked by NormalizeSpec
    if norm.kind == "percentile":
        low, high = (float(v) for v in np.percentile(x, [norm.low, norm.high]))
    else:  # ct_window, Hounsfield units
        low, high = norm.low, norm.high
    return ((np.clip(x, low, high) - low) / max(high - low, 1e-8)).astype(np.float32)


def _labels(out: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    """``(K, D, H, W)`` model output -> ``(D, H, W)`` int64 labels."""
    channels = out.shape[0]
    activation = spec.output.activation
    nested = spec.postprocessing.nested_labels
    if activation == "softmax":
        if channels < 2:
            raise ModelError(
                "activation softmax needs at least two output channels (background first); "
                "a one-channel model needs 'output: {activation: sigmoid}'"
            )
        return out.argmax(0)
    if activation == "sigmoid":
        values = nested or list(range(1, channels + 1))
        if len(values) != channels:
            raise ModelError(
                f"nested_labels lists {len(values)} labels but the model has {channels} "
                "output channels; give one label per channel, outermost region first"
            )
        inside = torch.sigmoid(out) > spec.output.threshold
        labels = torch.zeros(out.shape[1:], dtype=torch.int64, device=out.device)
        for channel, value in enumerate(values):  # inner regions overwrite outer ones
            labels[inside[channel]] = value
        return labels
    if channels == 1:
        return out[0].round().clamp(min=0).to(torch.int64)
    return out.argmax(0)


def _postprocess(
    labels: npt.NDArray[np.int64], post: PostprocessingSpec, voxel_mm3: float
) -> npt.NDArray[np.int64]:
    connectivity = ndimage.generate_binary_structure(3, 3)  # 26-connected, like cc3d
    for value in post.largest_component:
        components, count = ndimage.label(labels == value, connectivity)
        if count > 1:
            sizes = np.bincount(components.ravel())
            sizes[0] = 0
            labels[(components != 0) & (components != sizes.argmax())] = 0
    if post.min_size_mm3 > 0:
        min_voxels = post.min_size_mm3 / voxel_mm3
        for value in np.unique(labels):
            if value == 0:
                continue
            components, _ = ndimage.label(labels == value, connectivity)
            small = np.bincount(components.ravel()) < min_voxels
            small[0] = False
            labels[small[components]] = 0
    return labels


def _label_image(array: npt.NDArray[Any], spec: ModelSpec, what: str) -> Image:
    if not np.issubdtype(array.dtype, np.integer):
        array = np.rint(array)
    top = max(int(array.max(initial=0)), max(s.label for s in spec.structures))
    if (array.size and int(array.min()) < 0) or top > 65535:
        raise ModelError(f"{what} has label values outside 0..65535")
    return sitk.GetImageFromArray(array.astype(np.uint8 if top <= 255 else np.uint16))


# -- running ---------------------------------------------------------------------------------


def run_model(spec: ModelSpec, images: dict[str, Image], *, device: str | None = None) -> Image:
    """Run ``spec`` on ``images`` (input name -> volume) and return its label map (uint8, or
    uint16 above label 255) on exactly the grid of ``images[spec.inputs[0]]``.

    ``device`` overrides ``spec.device``; by default a GPU is used when this process sees one.
    """
    missing = [name for name in spec.inputs if name not in images]
    if missing:
        raise ModelError(
            f"model input(s) {', '.join(missing)} missing: the model needs "
            f"{', '.join(spec.inputs)}, got {', '.join(sorted(images)) or 'none'}"
        )
    reference = images[spec.inputs[0]]
    chosen = select_device(device or spec.device)
    started = time.perf_counter()
    if spec.kind == "entrypoint":
        assert spec.entrypoint is not None  # checked by ModelSpec
        function = _entrypoint(spec.entrypoint)
        result = function(
            {name: images[name] for name in spec.inputs}, spec.model_copy(update={"device": chosen})
        )
        if not isinstance(result, sitk.Image) or result.GetDimension() != 3:
            raise ModelError(f"entry point {spec.entrypoint} must return a 3D SimpleITK image")
        label = _label_image(sitk.GetArrayFromImage(result), spec, spec.entrypoint)
        label.CopyInformation(result)
    else:
        label = _run_declarative(spec, images, reference, chosen)
    out = to_source_grid(label, reference)
    logger.info("model ran on %s in %.1f s", chosen, time.perf_counter() - started)
    return out


def _run_declarative(
    spec: ModelSpec, images: dict[str, Image], reference: Image, device: str
) -> Image:
    assert spec.path is not None  # checked by ModelSpec
    pre = spec.preprocessing
    grid: Image | None = None
    arrays = []
    for name in spec.inputs:
        image = _as_float(images[name], name)
        if grid is not None:
            image = _onto(image, reference)
        image = to_model_grid(image, pre.orientation, pre.spacing)
        if grid is None:
            grid = image
        arrays.append(_normalize(sitk.GetArrayViewFromImage(image), pre.normalize))
    assert grid is not None
    volume = torch.from_numpy(np.stack(arrays))[None]  # (1, C, z, y, x)
    if pre.axes == "xyz":
        volume = volume.permute(0, 1, 4, 3, 2)
    predictor = load_predictor(spec.kind, spec.path, device)
    inf = spec.inference
    with torch.inference_mode():
        if inf.patch_size is None:
            out = predictor(volume.contiguous().to(device)).float()
        else:
            out = sliding_window(
                volume, predictor, inf.patch_size, inf.overlap, inf.blending, inf.batch_size,
                device,
            )  # fmt: skip
        if out.ndim != 5 or tuple(out.shape[2:]) != tuple(volume.shape[2:]):
            raise ModelError(
                f"the model returned shape {tuple(out.shape)} for input {tuple(volume.shape)}; "
                "it must keep the spatial size (set inference.patch_size for a fixed-size model)"
            )
        labels = _labels(out[0], spec).cpu()
    if pre.axes == "xyz":
        labels = labels.permute(2, 1, 0)
    array = np.ascontiguousarray(labels.numpy())
    array = _postprocess(array, spec.postprocessing, float(np.prod(grid.GetSpacing())))
    label = _label_image(array, spec, f"model {spec.path}")
    label.CopyInformation(grid)
    return label
