"""Sliding-window inference: the same output as MONAI's ``sliding_window_inference``."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from monai.inferers import sliding_window_inference

from runners.inference import gaussian_importance_map, sliding_window, window_starts

pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated:DeprecationWarning"
)


@pytest.fixture(scope="module")
def net() -> torch.jit.ScriptModule:
    torch.manual_seed(1234)
    module = torch.nn.Sequential(
        torch.nn.Conv3d(2, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv3d(8, 3, 3, padding=1),
    ).eval()
    return torch.jit.script(module)


@pytest.mark.parametrize("blending", ["gaussian", "constant"])
@pytest.mark.parametrize(
    ("shape", "patch", "overlap", "batch_size"),
    [
        ((1, 2, 40, 36, 28), (16, 16, 16), 0.5, 4),
        ((1, 2, 40, 36, 28), (24, 16, 12), 0.25, 1),
        ((2, 2, 21, 30, 17), (16, 16, 16), 0.6, 3),  # two volumes in a batch
        ((1, 2, 10, 30, 7), (16, 16, 16), 0.5, 2),  # smaller than the patch: padded
        ((1, 2, 16, 16, 16), (16, 16, 16), 0.5, 2),  # exactly one window
    ],
)
def test_same_output_as_monai(
    net: torch.jit.ScriptModule,
    shape: tuple[int, ...],
    patch: tuple[int, int, int],
    overlap: float,
    batch_size: int,
    blending: str,
) -> None:
    volume = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = sliding_window_inference(
            volume, patch, batch_size, net, overlap=overlap, mode=blending, sigma_scale=0.125
        )
    got = sliding_window(volume, net, patch, overlap, blending, batch_size)  # type: ignore[arg-type]
    assert got.shape == expected.shape == (shape[0], 3, *shape[2:])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_identical_windows_blend_to_the_prediction() -> None:
    # A predictor that returns its input: any weighting must give back the volume itself.
    volume = torch.rand((1, 1, 33, 20, 45), generator=torch.Generator().manual_seed(3))
    for blending in ("gaussian", "constant"):
        out = sliding_window(volume, lambda x: x * 1.0, (16, 8, 16), 0.5, blending, 5)
        torch.testing.assert_close(out, volume)


def test_gaussian_weights_peak_in_the_middle() -> None:
    weights = gaussian_importance_map((16, 16, 16))
    assert weights.shape == (16, 16, 16)
    assert float(weights[7, 7, 7]) == pytest.approx(float(weights.max()))
    assert float(weights.min()) == pytest.approx(1e-3)  # corners floored, never zero
    # sigma = 16 / 8 = 2 voxels; voxel 7 lies 0.5 and voxel 5 lies 2.5 voxels from the centre.
    ratio = float(weights[7, 7, 5] / weights[7, 7, 7])
    assert ratio == pytest.approx(math.exp(-(2.5**2 - 0.5**2) / (2 * 2**2)), rel=1e-5)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 300), st.integers(1, 64), st.floats(0, 0.95))
def test_windows_cover_the_axis(size: int, patch: int, overlap: float) -> None:
    starts = window_starts(max(size, patch), patch, overlap)
    assert starts[0] == 0
    assert starts[-1] + patch == max(size, patch)
    assert starts == sorted(set(starts))
    step = max(int(patch * (1 - overlap)), 1)
    assert all(b - a <= step for a, b in itertools.pairwise(starts))


def test_runs_without_autograd(net: torch.jit.ScriptModule) -> None:
    volume = torch.randn((1, 2, 20, 20, 20), requires_grad=True)
    out = sliding_window(volume, net, (16, 16, 16), 0.5, "gaussian", 2)  # type: ignore[arg-type]
    assert not out.requires_grad


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"patch_size": (16, 16)}, "three positive sizes"),
        ({"overlap": 1.0}, "overlap"),
        ({"batch_size": 0}, "batch_size"),
        ({"blending": "median"}, "blending"),
    ],
)
def test_bad_arguments(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {
        "patch_size": (8, 8, 8), "overlap": 0.5, "blending": "gaussian", "batch_size": 1,
    }  # fmt: skip
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        sliding_window(torch.zeros((1, 1, 8, 8, 8)), lambda x: x, **args)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\(N, C, D, H, W\)"):
        sliding_window(torch.zeros((1, 8, 8, 8)), lambda x: x, (8, 8, 8))


def test_predictor_must_keep_the_window_size() -> None:
    with pytest.raises(ValueError, match="keep the batch and spatial sizes"):
        sliding_window(torch.zeros((1, 1, 16, 16, 16)), lambda x: x[..., ::2], (8, 8, 8))
