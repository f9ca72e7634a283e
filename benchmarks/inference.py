"""Sliding-window inference: ``runners.inference.sliding_window`` against MONAI's
``sliding_window_inference``, same model, same volume, same settings, in one run.

The model is a small 3D convolutional network with random weights, compiled to TorchScript
(three 3x3x3 convolutions, 16 features, 3 output channels); the volume is random noise of
``--size``³ voxels. Both implementations get the same TorchScript module as predictor, the
same patch size, overlap, Gaussian blending (sigma = patch / 8) and window batch size, and run
without autograd (MONAI inside ``torch.no_grad()``, as its users call it). After one warm-up
call each (TorchScript optimises on its first calls), rounds alternate the order (ABBA) so that
a busy machine slows both alike. Per implementation it reports the median and the fastest wall
time, and the median time spent outside the model's forward pass (windows, weights, stitching),
the only part an implementation controls; "x MONAI" is MONAI's median divided by ours (above 1:
ours is faster). Outputs are compared element by element.

Usage::

    python -m benchmarks.inference [--size 128] [--patch 64] [--overlap 0.5] [--batch-size 2]
                                   [--rounds 6] [--no-write]

A measurement, not a test: figures depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import torch

from runners.inference import sliding_window, window_starts

__all__ = ["main"]

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def _model(seed: int = 0) -> torch.jit.ScriptModule:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Conv3d(1, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv3d(16, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv3d(16, 3, 3, padding=1),
    ).eval()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"`torch\.jit\.script` is deprecated", DeprecationWarning)
        return torch.jit.script(net)


class _Timed:
    """The predictor, counting the seconds spent in its forward pass."""

    def __init__(self, module: torch.jit.ScriptModule) -> None:
        self.module = module
        self.seconds = 0.0

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        started = time.perf_counter()
        out: torch.Tensor = self.module(batch)
        self.seconds += time.perf_counter() - started
        return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=128, help="volume side, voxels")
    parser.add_argument("--patch", type=int, default=64, help="window side, voxels")
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--no-write", action="store_true", help="do not append to RESULTS.md")
    args = parser.parse_args(argv)

    from monai.inferers import sliding_window_inference

    module = _model()
    timed = _Timed(module)
    volume = torch.randn((1, 1, args.size, args.size, args.size), generator=torch.Generator())
    patch = (args.patch,) * 3

    def monai() -> torch.Tensor:
        with torch.no_grad():
            out: torch.Tensor = sliding_window_inference(
                volume, patch, args.batch_size, timed, overlap=args.overlap, mode="gaussian",
                sigma_scale=0.125,
            )  # fmt: skip
        return out

    def ours() -> torch.Tensor:
        return sliding_window(volume, timed, patch, args.overlap, "gaussian", args.batch_size)

    runs: dict[str, Callable[[], torch.Tensor]] = {"MONAI sliding_window_inference": monai,
                                                   "dicomnode sliding_window": ours}  # fmt: skip
    outputs = {name: run() for name, run in runs.items()}  # warm-up, and the outputs compared
    a, b = outputs.values()
    identical = torch.equal(a, b)
    max_diff = float((a - b).abs().max())

    wall: dict[str, list[float]] = {name: [] for name in runs}
    outside: dict[str, list[float]] = {name: [] for name in runs}
    order = list(runs)
    for r in range(args.rounds):
        for name in order if r % 2 == 0 else order[::-1]:
            timed.seconds = 0.0
            started = time.perf_counter()
            runs[name]()
            seconds = time.perf_counter() - started
            wall[name].append(seconds)
            outside[name].append(seconds - timed.seconds)
            print(f"round {r + 1}: {name}: {seconds:.3f} s", file=sys.stderr)

    reference = statistics.median(wall[order[0]])
    lines = [
        "| implementation | median s | fastest s | outside the model, median s | x MONAI |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in order:
        median = statistics.median(wall[name])
        lines.append(
            f"| {name} | {median:.3f} | {min(wall[name]):.3f} | "
            f"{statistics.median(outside[name]):.3f} | {reference / median:.2f} |"
        )
    table = "\n".join(lines)
    summary = (
        f"Outputs identical: {'yes' if identical else 'no'} (max abs difference {max_diff:.3g})."
    )
    print(table)
    print(summary)
    if not args.no_write:
        _append(args, argv, table, summary)
    return 0


def _append(args: argparse.Namespace, argv: Sequence[str] | None, table: str, summary: str) -> None:
    import monai

    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    command = " ".join([".venv/bin/python -m benchmarks.inference", *(argv or sys.argv[1:])])
    windows = len(window_starts(args.size, args.patch, args.overlap)) ** 3
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    python = f"{platform.python_implementation()} {platform.python_version()}"
    setup = (
        f"{args.size}³ random volume, {windows} windows of {args.patch}³, overlap "
        f"{args.overlap}, Gaussian blending, batch of {args.batch_size} windows; TorchScript 3D "
        f"conv net 1→16→16→3, random weights; CPU, {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} torch threads, load average {load} at the end; {python}, "
        f"torch {torch.__version__}, MONAI {monai.__version__}; medians of {args.rounds} "
        "alternating rounds after one warm-up each"
    )
    section = f"""
## Sliding-window inference: dicomnode vs MONAI (benchmarks/inference.py)

### {stamp}

Command: `{command}`
({setup}.)

{table}

{summary}
"""
    with RESULTS.open("a", encoding="utf-8") as f:
        f.write(section)


if __name__ == "__main__":
    raise SystemExit(main())
