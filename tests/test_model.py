"""run_model: TorchScript and ONNX models built here, on phantoms with real geometry; the
deepbet demo on the MNI152 head."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import SimpleITK
import torch
from scipy import ndimage

from runners.model import ModelError, load_predictor, run_model, select_device
from runners.modelspec import ModelSpec

sitk: Any = SimpleITK

pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated:DeprecationWarning"
)

BRAIN = [{"label": 1, "name": "Brain", "type": "brain"}]
SPHERE = [{"label": 1, "name": "Sphere", "type": "object"}]


# -- phantoms --------------------------------------------------------------------------------


def _rotation(axis: tuple[float, float, float], degrees: float) -> npt.NDArray[np.float64]:
    a = np.asarray(axis, dtype=float) / np.linalg.norm(axis)
    t = math.radians(degrees)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + math.sin(t) * k + (1 - math.cos(t)) * k @ k


# Sagittal-like axes (columns: posterior, inferior, left), tilted 20 degrees: oblique.
OBLIQUE = _rotation((1, 1, 0), 20) @ np.array([[0, 0, 1], [1, 0, 0], [0, -1, 0]], dtype=float)


def _grid(
    size: tuple[int, int, int],
    spacing: tuple[float, float, float],
    direction: npt.NDArray[np.float64] = OBLIQUE,
    centre: tuple[float, float, float] = (10.0, -20.0, 35.0),
) -> Any:
    """An empty float32 image of ``size`` (x, y, z) centred on ``centre`` (LPS, mm)."""
    image = sitk.Image([int(s) for s in size], sitk.sitkFloat32)
    image.SetSpacing(spacing)
    image.SetDirection(direction.ravel().tolist())
    half = direction @ ((np.asarray(size) - 1) * np.asarray(spacing) / 2)
    image.SetOrigin((np.asarray(centre) - half).tolist())
    return image


def _points(image: Any) -> npt.NDArray[np.float64]:
    """Physical coordinates (LPS, mm) of every voxel, shaped (z, y, x, 3)."""
    size = image.GetSize()
    k, j, i = np.meshgrid(*(np.arange(n) for n in reversed(size)), indexing="ij")
    index = np.stack([i, j, k], axis=-1) * np.asarray(image.GetSpacing())
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    return np.asarray(image.GetOrigin()) + index @ direction.T


def _ball(image: Any, centre: tuple[float, float, float], radius: float) -> npt.NDArray[np.bool_]:
    return np.asarray(np.linalg.norm(_points(image) - np.asarray(centre), axis=-1) <= radius)


def _filled(like: Any, array: npt.NDArray[Any]) -> Any:
    out = sitk.GetImageFromArray(np.ascontiguousarray(array))
    out.CopyInformation(like)
    return out


def _dice(a: npt.NDArray[Any], b: npt.NDArray[Any]) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def _same_grid_exactly(a: Any, b: Any) -> bool:
    return (
        a.GetSize() == b.GetSize()
        and a.GetOrigin() == b.GetOrigin()
        and a.GetSpacing() == b.GetSpacing()
        and a.GetDirection() == b.GetDirection()
    )


CENTRE = (14.0, -17.0, 31.0)  # the sphere, a little off the volume's centre (LPS, mm)


@pytest.fixture(scope="module")
def ct() -> tuple[Any, npt.NDArray[np.bool_]]:
    """A CT-like volume (HU) on an oblique, anisotropic grid with a 14 mm sphere of 200 HU."""
    image = _grid((56, 48, 22), (0.9, 1.2, 2.5))
    truth = _ball(image, CENTRE, 14.0)
    noise = np.random.default_rng(5).normal(0, 10, truth.shape)
    hu = np.where(truth, 200.0, -50.0) + noise
    return _filled(image, hu.astype(np.int16)), truth


# -- models ----------------------------------------------------------------------------------


class _Threshold(torch.nn.Module):
    """Smooths, then scores background/foreground as ``t - x`` and ``x - t``: a two-class
    softmax model that segments voxels brighter than ``t`` (normalised units)."""

    def __init__(self, threshold: float, channels: int = 1, kernel: int = 3) -> None:
        super().__init__()
        self.smooth = torch.nn.Conv3d(channels, 1, kernel, padding=kernel // 2, bias=False)
        self.score = torch.nn.Conv3d(1, 2, 1)
        with torch.no_grad():
            self.smooth.weight.fill_(1 / (kernel**3 * channels))
            self.score.weight.copy_(torch.tensor([-1.0, 1.0]).reshape(2, 1, 1, 1, 1))
            self.score.bias.copy_(torch.tensor([threshold, -threshold]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.score(self.smooth(x))


class _Levels(torch.nn.Module):
    """One sigmoid channel per threshold: channel c is ``x - thresholds[c]`` (scaled)."""

    def __init__(self, thresholds: list[float]) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(1, len(thresholds), 1)
        with torch.no_grad():
            self.conv.weight.fill_(10.0)
            self.conv.bias.copy_(torch.tensor([-10.0 * t for t in thresholds]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class _Identity(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class _FirstHalf(torch.nn.Module):
    """Label 1 on the first half of the tensor's D axis: shows which axis the model sees."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x[:, :1])
        out[:, :, : x.shape[2] // 2] = 1.0
        return out


def _save(module: torch.nn.Module, path: Path) -> Path:
    torch.jit.script(module.eval()).save(str(path))
    return path


def _spec(path: Path, **fields: Any) -> ModelSpec:
    base: dict[str, Any] = {
        "version": "1",
        "kind": "onnx" if path.suffix == ".onnx" else "torchscript",
        "path": path,
        "inputs": ["ct"],
        "structures": SPHERE,
    }
    return ModelSpec(**(base | fields))


CT_PRE = {
    "orientation": "LPS",
    "spacing": (1.0, 1.0, 1.0),
    "normalize": {"kind": "ct_window", "low": -100, "high": 300},
}
# Normalised: background -50 HU -> 0.125, sphere 200 HU -> 0.75; the midpoint separates them.
CT_THRESHOLD = (0.125 + 0.75) / 2


# -- declarative models ----------------------------------------------------------------------


def test_torchscript_segments_phantom_on_source_grid(
    tmp_path: Path, ct: tuple[Any, npt.NDArray[np.bool_]]
) -> None:
    image, truth = ct
    spec = _spec(_save(_Threshold(CT_THRESHOLD), tmp_path / "m.pt"), preprocessing=CT_PRE)
    label = run_model(spec, {"ct": image})
    assert _same_grid_exactly(label, image)
    assert label.GetPixelID() == sitk.sitkUInt8
    array = sitk.GetArrayFromImage(label)
    assert set(np.unique(array)) == {0, 1}
    assert _dice(array, truth) >= 0.95
    # The model grid (LPS, 1 mm) differs from the source grid: the check above is meaningful.
    assert image.GetDirection() != (1, 0, 0, 0, 1, 0, 0, 0, 1)


@pytest.mark.parametrize(
    ("kernel", "blending", "agreement"),
    [
        (1, "constant", 1.0),  # pointwise: every window predicts what the whole volume does
        (1, "gaussian", 1.0),
        (3, "gaussian", 0.99),  # zero padding at window edges: Gaussian weights damp it
    ],
)
def test_sliding_window_agrees_with_whole_volume(
    tmp_path: Path,
    ct: tuple[Any, npt.NDArray[np.bool_]],
    kernel: int,
    blending: str,
    agreement: float,
) -> None:
    image, truth = ct
    path = _save(_Threshold(CT_THRESHOLD, kernel=kernel), tmp_path / "m.pt")
    whole = sitk.GetArrayFromImage(run_model(_spec(path, preprocessing=CT_PRE), {"ct": image}))
    inference = {"patch_size": (24, 24, 24), "overlap": 0.5, "blending": blending,
                 "batch_size": 3}  # fmt: skip
    spec = _spec(path, preprocessing=CT_PRE, inference=inference)
    windowed = sitk.GetArrayFromImage(run_model(spec, {"ct": image}))
    assert _dice(windowed, whole) >= agreement
    assert _dice(windowed, truth) >= 0.95


# torch 2.13's default (dynamo) exporter needs onnxscript, which is not installed; the legacy
# TorchScript exporter works offline and warns that it is legacy.
@pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export")
@pytest.mark.filterwarnings("ignore:The feature will be removed:DeprecationWarning")
def test_onnx_model(tmp_path: Path, ct: tuple[Any, npt.NDArray[np.bool_]]) -> None:
    image, truth = ct
    module = _Threshold(CT_THRESHOLD).eval()
    path = tmp_path / "m.onnx"
    axes = {0: "n", 2: "d", 3: "h", 4: "w"}
    torch.onnx.export(
        module,
        (torch.zeros((1, 1, 8, 8, 8)),),
        str(path),
        dynamo=False,
        input_names=["image"],
        output_names=["logits"],
        dynamic_axes={"image": axes, "logits": axes},
    )
    torchscript = _save(module, tmp_path / "m.pt")
    inference = {"patch_size": (32, 32, 32), "batch_size": 2}
    onnx = run_model(_spec(path, preprocessing=CT_PRE, inference=inference), {"ct": image})
    script = run_model(_spec(torchscript, preprocessing=CT_PRE, inference=inference), {"ct": image})
    assert _same_grid_exactly(onnx, image)
    array = sitk.GetArrayFromImage(onnx)
    assert _dice(array, truth) >= 0.95
    assert _dice(array, sitk.GetArrayFromImage(script)) >= 0.999


def test_second_input_is_resampled_onto_the_first(tmp_path: Path) -> None:
    # t1 is flat; the sphere is only in t2, which lies on another grid (axial, 1.5 mm).
    t1 = _grid((50, 44, 20), (1.0, 1.1, 2.5))
    t1 = _filled(t1, np.full(sitk.GetArrayFromImage(t1).shape, 100, np.int16))
    t2 = _grid((40, 40, 40), (1.5, 1.5, 1.5), np.eye(3), centre=(12.0, -18.0, 33.0))
    t2 = _filled(t2, np.where(_ball(t2, CENTRE, 12.0), 300, 100).astype(np.int16))
    norm = {"kind": "ct_window", "low": 0, "high": 400}  # 100 -> 0.25, 300 -> 0.75
    # Both channels are averaged: flat 0.25 plus 0.25 or 0.75 -> 0.25 or 0.5.
    path = _save(_Threshold(0.375, channels=2), tmp_path / "m.pt")
    spec = _spec(path, inputs=["t1", "t2"], preprocessing={"normalize": norm})
    label = run_model(spec, {"t2": t2, "t1": t1})
    assert _same_grid_exactly(label, t1)
    assert _dice(sitk.GetArrayFromImage(label), _ball(t1, CENTRE, 12.0)) >= 0.95


def test_sigmoid_nested_labels(tmp_path: Path) -> None:
    # BraTS-like regions: whole tumour > tumour core > enhancing tumour, nested spheres.
    image = _grid((40, 40, 16), (1.0, 1.0, 3.0))
    whole, core, enhancing = (_ball(image, CENTRE, r) for r in (15.0, 10.0, 5.0))
    intensity = 0.1 + 0.3 * whole + 0.3 * core + 0.3 * enhancing  # 0.1, 0.4, 0.7, 1.0
    image = _filled(image, intensity.astype(np.float32))
    path = _save(_Levels([0.25, 0.55, 0.85]), tmp_path / "m.pt")
    structures = [
        {"label": v, "name": n, "type": "tumor"} for v, n in [(1, "C"), (2, "W"), (3, "E")]
    ]
    nested = _spec(
        path,
        output={"activation": "sigmoid"},
        postprocessing={"nested_labels": [2, 1, 3]},
        structures=structures,
    )
    array = sitk.GetArrayFromImage(run_model(nested, {"ct": image}))
    expected = np.zeros(array.shape, np.uint8)
    expected[whole], expected[core], expected[enhancing] = 2, 1, 3
    np.testing.assert_array_equal(array, expected)
    # Without nested_labels channel c becomes label c + 1, later channels on top.
    plain = _spec(path, output={"activation": "sigmoid", "threshold": 0.5}, structures=structures)
    array = sitk.GetArrayFromImage(run_model(plain, {"ct": image}))
    expected[whole], expected[core], expected[enhancing] = 1, 2, 3
    np.testing.assert_array_equal(array, expected)


def test_largest_component_and_min_size(tmp_path: Path) -> None:
    image = _grid((60, 40, 30), (1.0, 1.0, 2.0), np.eye(3), centre=(0.0, 0.0, 0.0))
    big = _ball(image, (-12.0, 0.0, 0.0), 8.0)
    island = _ball(image, (15.0, 0.0, 0.0), 4.0)  # label 1 again, away from the big one
    blob = _ball(image, (0.0, 12.0, 10.0), 6.0)  # label 2, ~900 mm3
    speck = _ball(image, (18.0, -12.0, -10.0), 2.0)  # label 2, ~30 mm3
    labels = np.zeros(big.shape, np.float32)
    labels[big | island], labels[blob | speck] = 1, 2
    image = _filled(image, labels)
    path = _save(_Identity(), tmp_path / "m.pt")
    structures = [{"label": 1, "name": "A"}, {"label": 2, "name": "B"}]
    kept = _spec(path, output={"activation": "none"}, structures=structures)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(run_model(kept, {"ct": image})), labels)
    spec = _spec(
        path,
        output={"activation": "none"},
        postprocessing={"largest_component": [1], "min_size_mm3": 100},
        structures=structures,
    )
    array = sitk.GetArrayFromImage(run_model(spec, {"ct": image}))
    expected = np.zeros(labels.shape, np.uint8)
    expected[big], expected[blob] = 1, 2
    np.testing.assert_array_equal(array, expected)


@pytest.mark.parametrize(("axes", "axis"), [("zyx", 0), ("xyz", 2)])
def test_tensor_axis_order(tmp_path: Path, axes: str, axis: int) -> None:
    image = _grid((20, 14, 10), (1.0, 1.0, 1.0), np.eye(3))
    path = _save(_FirstHalf(), tmp_path / "m.pt")
    spec = _spec(path, output={"activation": "none"}, preprocessing={"axes": axes})
    array = sitk.GetArrayFromImage(run_model(spec, {"ct": image}))  # (z, y, x)
    half = array.shape[axis] // 2
    assert np.all(np.take(array, range(half), axis=axis) == 1)
    assert np.all(np.take(array, range(half, array.shape[axis]), axis=axis) == 0)


def test_missing_input_is_named(tmp_path: Path, ct: tuple[Any, npt.NDArray[np.bool_]]) -> None:
    spec = _spec(tmp_path / "absent.pt", inputs=["t1", "t1c", "flair"])
    with pytest.raises(ModelError, match=r"input\(s\) t1c, flair missing.*got ct, t1"):
        run_model(spec, {"t1": ct[0], "ct": ct[0]})


def test_unreadable_model_file(tmp_path: Path, ct: tuple[Any, npt.NDArray[np.bool_]]) -> None:
    with pytest.raises(ModelError, match=r"absent\.pt cannot be read"):
        run_model(_spec(tmp_path / "absent.pt"), {"ct": ct[0]})
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(ModelError, match="cannot load torchscript model"):
        run_model(_spec(tmp_path / "junk.pt"), {"ct": ct[0]})


def test_softmax_needs_two_channels(tmp_path: Path, ct: tuple[Any, npt.NDArray[np.bool_]]) -> None:
    spec = _spec(_save(_Identity(), tmp_path / "m.pt"))
    with pytest.raises(ModelError, match="activation: sigmoid"):
        run_model(spec, {"ct": ct[0]})


def test_model_loaded_once_per_file_version(tmp_path: Path) -> None:
    path = _save(_Identity(), tmp_path / "m.pt")
    first = load_predictor("torchscript", path, "cpu")
    assert load_predictor("torchscript", path, "cpu") is first
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert load_predictor("torchscript", path, "cpu") is not first


@pytest.mark.skipif(torch.cuda.is_available(), reason="this host has a GPU")
def test_device_without_gpu() -> None:
    assert select_device(None) == "cpu"
    assert select_device("cpu") == "cpu"
    with pytest.raises(ModelError, match="sees no CUDA GPU"):
        select_device("cuda:1")


# -- entry points ----------------------------------------------------------------------------

SEEN: dict[str, Any] = {}


def threshold_entry(images: dict[str, Any], spec: ModelSpec) -> Any:
    """A test entry point that answers on its own grid (LPS, 1.5 mm isotropic)."""
    SEEN["inputs"], SEEN["device"] = sorted(images), spec.device
    image = sitk.DICOMOrient(images[spec.inputs[0]], "LPS")
    grid = sitk.Resample(
        image, [40, 40, 40], sitk.Transform(), sitk.sitkLinear,
        (np.asarray(CENTRE) - 30).tolist(), (1.5, 1.5, 1.5), np.eye(3).ravel().tolist(),
    )  # fmt: skip
    return sitk.BinaryThreshold(grid, 75.0, 1e6, 1, 0)


def test_entrypoint_result_is_aligned(ct: tuple[Any, npt.NDArray[np.bool_]]) -> None:
    image, truth = ct
    spec = ModelSpec(
        version="1", kind="entrypoint", entrypoint="tests.test_model:threshold_entry",
        inputs=["ct"], structures=SPHERE,
    )  # fmt: skip
    label = run_model(spec, {"ct": image, "other": image})
    assert SEEN == {"inputs": ["ct"], "device": "cpu"}
    assert _same_grid_exactly(label, image)
    assert label.GetPixelID() == sitk.sitkUInt8
    assert _dice(sitk.GetArrayFromImage(label), truth) >= 0.95


def test_entrypoint_errors(ct: tuple[Any, npt.NDArray[np.bool_]]) -> None:
    for entry, message in [
        ("tests.no_such_module:f", "cannot import tests.no_such_module"),
        ("tests.test_model:no_such_function", "has no function no_such_function"),
        ("tests.test_model:_ball", "radius"),  # wrong signature: its own TypeError
    ]:
        spec = ModelSpec(version="1", kind="entrypoint", entrypoint=entry, structures=SPHERE)
        error = TypeError if message == "radius" else ModelError
        with pytest.raises(error, match=message):
            run_model(spec, {"series": ct[0]})


# -- the deepbet demo ------------------------------------------------------------------------


def _from_nibabel(nifti: Any) -> Any:
    """A NIfTI image (RAS+ world, (i, j, k) array) as a SimpleITK image (LPS, (k, j, i))."""
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ nifti.affine  # RAS -> LPS
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    image = sitk.GetImageFromArray(np.asarray(nifti.get_fdata(), np.float32).transpose(2, 1, 0))
    image.SetSpacing(spacing.tolist())
    image.SetOrigin(affine[:3, 3].tolist())
    image.SetDirection((affine[:3, :3] / spacing).ravel().tolist())
    return image


@pytest.mark.slow
def test_deepbet_brain_on_mni152_head() -> None:
    from nilearn.datasets import load_mni152_brain_mask, load_mni152_template

    from runners.demo import DEMO_MODELS

    head = _from_nibabel(load_mni152_template(resolution=2))
    reference = _from_nibabel(load_mni152_brain_mask(resolution=2))
    # As an MR series would arrive: integer intensities, sagittal slices (axes P, I, R).
    head = _filled(head, np.rint(sitk.GetArrayFromImage(head) * 1000).astype(np.int16))
    t1 = sitk.DICOMOrient(head, "PIR")
    reference = sitk.DICOMOrient(reference, "PIR")
    assert _same_grid_exactly(t1, reference)
    assert t1.GetDirection() == (0, 0, -1, 1, 0, 0, 0, -1, 0)

    spec = ModelSpec(**DEMO_MODELS["brain-extraction"])
    label = run_model(spec, {"t1": t1})
    assert _same_grid_exactly(label, t1)
    mask = sitk.GetArrayFromImage(label)
    assert set(np.unique(mask)) == {0, 1}
    litres = mask.sum() * np.prod(label.GetSpacing()) / 1e6
    # MNI152 is an enlarged average brain: nilearn's own brain mask holds 1.88 litres.
    assert 1.5 <= litres <= 2.2, litres
    assert _dice(mask, sitk.GetArrayFromImage(reference) > 0.5) >= 0.95
    # Inside the head: this template is zero outside the brain, so the head is taken as the
    # tissue grown by 4 mm (the CSF rim deepbet includes), cavities filled.
    tissue = sitk.GetArrayFromImage(t1) > 0
    head = ndimage.binary_fill_holes(ndimage.binary_dilation(tissue, iterations=2))
    # (0.3 % lie in the basal cisterns, which the template zeroes.)
    assert (mask.astype(bool) & ~head).sum() <= 0.005 * mask.sum()


def test_demo_config_is_a_valid_model() -> None:
    import yaml

    from runners.demo import DEEPBET_VERSION, DEMO_MODELS, DEMO_MODELS_YAML

    parsed = yaml.safe_load(DEMO_MODELS_YAML)["models"]
    assert parsed == DEMO_MODELS
    spec = ModelSpec(**parsed["brain-extraction"])
    assert spec.version == DEEPBET_VERSION == "1.0.2"
    assert spec.results == ["seg", "rtstruct"]
    assert [s.structure().name for s in spec.structures] == ["Brain"]
