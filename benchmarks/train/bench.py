"""Training / inference / streaming benchmark of the models on random log-mel patches.

For the TCN (default width and the paper-sized 256 channels) and the VGG-like baseline, 200 classes, random
[batch, 101, 96] patches: parameter counts, training patches per second (forward + BCE + backward + Adam
step), inference patches per second, multiply-accumulates per second of audio, and the TCN's streaming
``step`` time per frame on one thread (median and p99).

MACs are counted with forward hooks on Conv1d / Conv2d / Linear (the weight multiplications only; norms,
activations, pooling and residual additions are left out).

Run: ``python -m benchmarks.train.bench [--out bench.json] [--quick]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from benchmarks.common import machine_info, write_json
from fl.models import ModelConfig, build_model

N_MELS = 96
N_CLASSES = 200
PATCH_FRAMES = 101
FRAMES_PER_SECOND = 100  # 10 ms hop
PATCHES_PER_SECOND = 2  # the FSD50K protocol's 1-s patches with 50% overlap

BENCH_MODELS: dict[str, ModelConfig] = {
    "tcn": ModelConfig(),
    "tcn-256": ModelConfig(channels=256),
    "vgg": ModelConfig(name="vgg"),
}


def count_macs(model: nn.Module, x: Tensor) -> int:
    """Multiply-accumulates of one forward pass of ``model.clip_logits`` on ``x`` (Conv1d/Conv2d/Linear)."""
    total = 0

    def conv_hook(module: nn.Module, _inputs: tuple, output: Tensor) -> None:
        nonlocal total
        weight = module.weight
        total += output.numel() * weight[0].numel()  # each output value: C_in/groups * kernel MACs

    def linear_hook(module: nn.Module, _inputs: tuple, output: Tensor) -> None:
        nonlocal total
        total += output.numel() * module.in_features

    hooks = []
    for module in model.modules():
        if isinstance(module, nn.Conv1d | nn.Conv2d):
            hooks.append(module.register_forward_hook(conv_hook))
        elif isinstance(module, nn.Linear):
            hooks.append(module.register_forward_hook(linear_hook))
    try:
        with torch.inference_mode():
            model.clip_logits(x)
    finally:
        for hook in hooks:
            hook.remove()
    return total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rate(fn: Callable[[], None], iters: int, items: int, device: torch.device, desc: str,
          progress: bool) -> float:
    """Items per second of ``fn`` (one warm-up call first)."""
    fn()
    _sync(device)
    start = time.perf_counter()
    for _ in tqdm(range(iters), desc=desc, disable=not progress, leave=False):
        fn()
    _sync(device)
    return items * iters / (time.perf_counter() - start)


def _train_rate(model: nn.Module, x: Tensor, y: Tensor, iters: int, progress: bool, name: str) -> float:
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-4)
    loss_fn = nn.BCEWithLogitsLoss()

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model.clip_logits(x), y).backward()
        optimizer.step()

    return _rate(train_step, iters, x.shape[0], x.device, f"train {name}", progress)


def _infer_rate(model: nn.Module, x: Tensor, iters: int, progress: bool, name: str) -> float:
    model.eval()

    def infer() -> None:
        with torch.inference_mode():
            model.clip_logits(x)

    return _rate(infer, iters, x.shape[0], x.device, f"infer {name}", progress)


def _stream_step_ms(model: nn.Module, steps: int, generator: torch.Generator, progress: bool,
                    name: str) -> tuple[float, float]:
    """Median and p99 milliseconds of one ``step`` on one CPU thread."""
    model = model.cpu().eval()
    frames = torch.randn(steps + 50, 1, model.n_mels, generator=generator)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        state = model.init_state(1)
        for frame in frames[:50]:  # warm-up
            _, state = model.step(frame, state)
        times = []
        for frame in tqdm(frames[50:], desc=f"stream {name}", disable=not progress, leave=False):
            start = time.perf_counter_ns()
            _, state = model.step(frame, state)
            times.append(time.perf_counter_ns() - start)
    finally:
        torch.set_num_threads(threads)
    times.sort()
    p99 = times[min(len(times) - 1, int(round(0.99 * (len(times) - 1))))]
    return statistics.median(times) / 1e6, p99 / 1e6


def run_train_bench(out_json: Path | None = None, quick: bool = False, progress: bool = False, seed: int = 0,
                    device: str = "cpu", workdir: Path | None = None) -> dict[str, Any]:
    """Benchmark the models (see the module docstring); print a table, write JSON to ``out_json`` if given.

    ``quick`` uses a batch of 2 and a few iterations (for tests); otherwise a batch of 64, 5 timed training
    and inference iterations and 2000 streaming steps. ``device`` is used for training and inference; the
    streaming step always runs on one CPU thread. ``workdir`` is unused (all data is generated in memory);
    it is accepted so that every ``fedsound bench`` stage has the same call.
    """
    batch, iters, steps = (2, 1, 10) if quick else (64, 5, 2000)
    dev = torch.device(device)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, PATCH_FRAMES, N_MELS, generator=generator).to(dev)
    y = (torch.rand(batch, N_CLASSES, generator=generator) < 0.05).float().to(dev)
    results: dict[str, Any] = {}
    for name, config in BENCH_MODELS.items():
        torch.manual_seed(seed)
        model = build_model(config, N_MELS, N_CLASSES)
        row: dict[str, Any] = {"config": name, "params": sum(p.numel() for p in model.parameters())}
        macs_per_patch = count_macs(model.eval(), torch.zeros(1, PATCH_FRAMES, N_MELS))
        row["macs_per_patch"] = macs_per_patch
        if config.name == "tcn":
            # Causal and frame by frame: every frame costs the same, streamed or offline.
            row["receptive_field_frames"] = model.receptive_field
            row["macs_per_audio_second"] = macs_per_patch // PATCH_FRAMES * FRAMES_PER_SECOND
        else:
            row["macs_per_audio_second"] = macs_per_patch * PATCHES_PER_SECOND
        model.to(dev)
        row["train_patches_per_s"] = _train_rate(model, x, y, iters, progress, name)
        row["infer_patches_per_s"] = _infer_rate(model, x, iters, progress, name)
        if config.name == "tcn":
            row["stream_step_ms_median"], row["stream_step_ms_p99"] = _stream_step_ms(
                model, steps, generator, progress, name
            )
        results[name] = row
    report = {
        "machine": machine_info(),
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "batch": batch,
        "patch_frames": PATCH_FRAMES,
        "n_mels": N_MELS,
        "n_classes": N_CLASSES,
        "timed_iterations": iters,
        "stream_steps": steps,
        "mac_counting": "forward hooks on Conv1d/Conv2d/Linear; TCN per audio second = 100 frames, "
        "VGG per audio second = 2 patches (50% overlap)",
        "models": results,
    }
    print(format_table(report))
    if out_json is not None:
        write_json(out_json, report)
    return report


def format_table(report: dict[str, Any]) -> str:
    """A small text table of :func:`run_train_bench`'s results."""
    head = (f"{'model':<8} {'params':>10} {'train p/s':>10} {'infer p/s':>10} {'MMAC/s audio':>13} "
            f"{'step ms (med/p99)':>18}")
    lines = [f"device {report['device']}, {report['threads']} threads, batch {report['batch']}", head]
    for name, row in report["models"].items():
        step = (f"{row['stream_step_ms_median']:.3f}/{row['stream_step_ms_p99']:.3f}"
                if "stream_step_ms_median" in row else "-")
        lines.append(f"{name:<8} {row['params']:>10,} {row['train_patches_per_s']:>10.1f} "
                     f"{row['infer_patches_per_s']:>10.1f} {row['macs_per_audio_second'] / 1e6:>13.1f} "
                     f"{step:>18}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry: ``python -m benchmarks.train.bench``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--quick", action="store_true", help="tiny batch and iteration counts")
    parser.add_argument("--device", default="cpu", help="training/inference device (default cpu)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    run_train_bench(args.out, quick=args.quick, progress=True, seed=args.seed, device=args.device)


if __name__ == "__main__":
    main()
