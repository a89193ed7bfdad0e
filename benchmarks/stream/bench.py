"""``fedsound bench stream``: the streaming detector's compute, latency and equality with offline processing.

All on one CPU thread, default frontend (22.05 kHz, 96 bands, 10 ms hop):

* Compute per 10 ms hop (median, p99): one hop of audio through the whole detector (streaming frontend, one
  model step, sigmoid, post-processing) for the default TCN and the paper-sized 256-channel TCN, 200 classes,
  on both engines: torch (the training frontend and ``TCN.step``) and the portable one (numpy frontend and the
  step exported to ONNX, run by onnxruntime); real-time factor = compute seconds per audio second.
* Portable against torch: max abs difference of per-frame probabilities over the test stream.
* The size of an environment that can only listen (fedsound with numpy, soundfile, onnxruntime and their
  dependencies) against this full install, from the installed distributions' file lists.
* Algorithmic latency: frontend delay (``n_fft - n_fft // 2`` samples) plus post-processing delay (minimum
  duration less one frame); a live input adds up to one block.
* Detection latency on a synthetic test stream: short impulsive "click" and tonal "whistle" events at known
  onsets in noise. A small TCN is trained for a few seconds on frames labelled by the events of another
  stream of the same kind; the test stream is fed in blocks of ``detector.block-size`` samples, and each
  true event's latency is the audio time at which its onset event was emitted minus its true onset.
* Streaming equals offline: max abs difference of per-frame probabilities (streamed in blocks of 1, 160 and
  997 samples vs ``Frontend.frames`` + ``forward`` + sigmoid on the whole signal).

Targets printed beside the figures: p99 compute per hop at most 1 ms (torch) and 0.5 ms (portable, default
TCN), median detection latency at most 50 ms, equality within 1e-4.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from packaging.requirements import Requirement
from torch import nn
from tqdm import tqdm

from benchmarks.common import machine_info, write_json
from clients.detector.bundle import write_bundle
from clients.detector.manifest import read_manifest
from clients.detector.portable import portable_parts
from clients.detector.postprocess import Event
from clients.detector.stream import StreamingDetector
from clients.detector.torch_stream import StreamEngine, offline_probabilities, single_thread, torch_detector
from fl.config import DetectorConfig, FrontendConfig
from fl.frontend import Frontend
from fl.models import TCN, ModelConfig, build_model

LABELS = ("click", "whistle")
BENCH_MODELS = {"tcn": ModelConfig(), "tcn-256": ModelConfig(channels=256)}
N_CLASSES = 200
EQUALITY_BLOCKS = (1, 160, 997)
TARGETS = {"p99_ms_per_hop": 1.0, "portable_p99_ms_per_hop": 0.5, "median_detection_latency_ms": 50.0,
           "max_abs_diff": 1e-4}
ENGINES = ("torch", "onnx")
LISTEN_ONLY = ("numpy", "soundfile", "onnxruntime", "sounddevice")  # what `fedsound listen --engine onnx` imports
MATCH_WINDOW_S = 0.3  # an onset emitted up to this long after a true event's offset still counts as its


@dataclass
class SyntheticStream:
    """A waveform with its ground-truth events ``(label, onset_s, offset_s)``."""

    wave: np.ndarray
    sample_rate: int
    events: list[tuple[str, float, float]]


def _click(rng: np.random.Generator, rate: int) -> np.ndarray:
    """An impulsive sound: a few damped resonances (2 to 5 kHz) excited by a noise burst, about 40 ms."""
    n = int(0.04 * rate)
    t = np.arange(n) / rate
    sound = np.zeros(n)
    for _ in range(3):
        freq = rng.uniform(2000.0, 5000.0)
        sound += np.sin(2 * np.pi * freq * t + rng.uniform(0, 2 * np.pi)) * np.exp(-t / rng.uniform(0.004, 0.01))
    sound += 0.5 * rng.standard_normal(n) * np.exp(-t / 0.003)
    return sound / np.max(np.abs(sound))


def _whistle(rng: np.random.Generator, rate: int) -> np.ndarray:
    """A tonal sound: a 0.8 to 1.6 kHz tone with a slight glide, 120 to 250 ms, 5 ms raised-cosine ramps."""
    n = int(rng.uniform(0.12, 0.25) * rate)
    freq = rng.uniform(800.0, 1600.0) * np.linspace(1.0, rng.uniform(0.9, 1.1), n)
    sound = np.sin(2 * np.pi * np.cumsum(freq) / rate)
    ramp = int(0.005 * rate)
    envelope = np.ones(n)
    envelope[:ramp] = 0.5 - 0.5 * np.cos(np.pi * np.arange(ramp) / ramp)
    envelope[-ramp:] = envelope[:ramp][::-1]
    return sound * envelope


def synthetic_event_stream(seconds: float, sample_rate: int, rng: np.random.Generator,
                           noise_level: float = 0.01) -> SyntheticStream:
    """Clicks and whistles (random order, levels 0.2 to 0.6) 0.4 to 0.9 s apart in pink noise.

    Everything is defined in Hz and seconds, so streams made at different sample rates sound alike.
    """
    n = int(seconds * sample_rate)
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1.0 / sample_rate)
    spectrum *= 1.0 / np.sqrt(np.maximum(freqs, 50.0))  # pink (1/f power) above 50 Hz
    noise = np.fft.irfft(spectrum, n)
    wave = noise_level * noise / np.std(noise)
    events: list[tuple[str, float, float]] = []
    cursor = rng.uniform(0.3, 0.6)
    while True:
        label = LABELS[int(rng.integers(len(LABELS)))]
        sound = (_click if label == "click" else _whistle)(rng, sample_rate) * rng.uniform(0.2, 0.6)
        start = int(cursor * sample_rate)
        if start + len(sound) >= n - sample_rate // 5:
            break
        wave[start : start + len(sound)] += sound
        events.append((label, start / sample_rate, (start + len(sound)) / sample_rate))
        cursor = (start + len(sound)) / sample_rate + rng.uniform(0.4, 0.9)
    return SyntheticStream(wave.astype(np.float32), sample_rate, events)


def frame_targets(stream: SyntheticStream, config: FrontendConfig, n_frames: int) -> np.ndarray:
    """Per-frame targets ``[n_frames, len(LABELS)]``: 1 where the central half of a frame's window overlaps
    an event (so the model learns to fire as soon as the onset is well inside the window)."""
    centres = np.arange(n_frames) * config.hop_length / config.sample_rate
    quarter = config.n_fft / 4 / config.sample_rate
    targets = np.zeros((n_frames, len(LABELS)), dtype=np.float32)
    for label, onset, offset in stream.events:
        inside = (centres + quarter >= onset) & (centres - quarter < offset)
        targets[inside, LABELS.index(label)] = 1.0
    return targets


def train_event_model(frames: np.ndarray, targets: np.ndarray, config: ModelConfig, steps: int, seed: int,
                      crop: int = 200, batch: int = 16, lr: float = 3e-3, progress: bool = False) -> TCN:
    """A TCN trained on random crops of one long labelled frame sequence (per-frame BCE, Adam)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = build_model(config, frames.shape[1], targets.shape[1])
    assert isinstance(model, TCN)
    x_all, y_all = torch.from_numpy(frames), torch.from_numpy(targets)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.BCEWithLogitsLoss()
    crop = min(crop, len(frames))
    model.train()
    for _ in tqdm(range(steps), desc="train detector", disable=not progress, leave=False):
        starts = rng.integers(0, len(frames) - crop + 1, size=batch)
        x = torch.stack([x_all[s : s + crop] for s in starts])
        y = torch.stack([y_all[s : s + crop] for s in starts])
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        optimizer.step()
    return model.eval()


def match_events(truth: list[tuple[str, float, float]], emitted: list[Event]) -> tuple[list[dict], int]:
    """Match each true event to the first unused onset of its label emitted within [onset, offset + 0.3 s].

    Returns one record per true event (``label``, ``onset_s``, ``latency_ms``: emission time minus true
    onset, ``reported_latency_ms``: the detector's own figure; both None when missed) and the number of
    onsets matched to no true event (false detections).
    """
    onsets = [e for e in emitted if e.type == "onset"]
    used: set[int] = set()
    records = []
    for label, onset, offset in truth:
        record: dict[str, Any] = {"label": label, "onset_s": onset, "latency_ms": None,
                                  "reported_latency_ms": None}
        for i, event in enumerate(onsets):
            if i not in used and event.label == label and onset <= event.emitted_s <= offset + MATCH_WINDOW_S:
                used.add(i)
                record["latency_ms"] = (event.emitted_s - onset) * 1000.0
                record["reported_latency_ms"] = event.latency_ms
                break
        records.append(record)
    return records, len(onsets) - len(used)


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] if ordered else float("nan")


def _detector(model: TCN, frontend: Frontend, labels: list[str], engine: str, folder: Path) -> StreamingDetector:
    """``model`` as a streaming detector on ``engine``; the portable one through a bundle written to ``folder``."""
    if engine == "torch":
        return torch_detector(model.eval(), frontend, labels, DetectorConfig())
    write_bundle(folder, model, frontend.config, labels, labels, DetectorConfig(), portable=True)
    frames, step = portable_parts(read_manifest(folder))
    return StreamingDetector(step, frames, labels, DetectorConfig())


def _compute_per_hop(config: ModelConfig, frontend: Frontend, engine: str, hops: int, seed: int, folder: Path,
                     progress: bool, name: str) -> dict[str, float]:
    """Milliseconds per hop of audio through the whole detector (one hop-sized block per call).

    Wall-clock time and the thread's CPU time are both measured: on a shared machine the wall-clock tail
    includes time the process was descheduled, the CPU time does not.
    """
    torch.manual_seed(seed)
    model = build_model(config, frontend.config.n_mels, N_CLASSES)
    assert isinstance(model, TCN)
    labels = [f"class-{i}" for i in range(N_CLASSES)]
    detector = _detector(model, frontend, labels, engine, folder)
    hop = frontend.config.hop_length
    audio = synthetic_event_stream((hops + 100) * hop / frontend.config.sample_rate + 1.0,
                                   frontend.config.sample_rate, np.random.default_rng(seed)).wave
    for k in range(100):  # warm-up (also fills the frontend's first window)
        detector.feed(audio[k * hop : (k + 1) * hop])
    wall, cpu = [], []
    for k in tqdm(range(100, 100 + hops), desc=f"stream {name} {engine}", disable=not progress, leave=False):
        block = audio[k * hop : (k + 1) * hop]
        start, start_cpu = time.perf_counter_ns(), time.thread_time_ns()
        detector.feed(block)
        cpu.append((time.thread_time_ns() - start_cpu) / 1e6)
        wall.append((time.perf_counter_ns() - start) / 1e6)
    hop_ms = 1000.0 * hop / frontend.config.sample_rate
    return {"median_ms_per_hop": statistics.median(wall), "p99_ms_per_hop": _percentile(wall, 0.99),
            "max_ms_per_hop": max(wall), "cpu_median_ms_per_hop": statistics.median(cpu),
            "cpu_p99_ms_per_hop": _percentile(cpu, 0.99), "real_time_factor": statistics.fmean(wall) / hop_ms,
            "receptive_field_frames": model.receptive_field, "hops": hops}


def _distribution_closure(names: tuple[str, ...]) -> dict[str, metadata.Distribution]:
    """The installed distributions ``names`` need, with their dependencies (extras left out)."""
    found: dict[str, metadata.Distribution] = {}
    todo = list(names)
    while todo:
        name = todo.pop()
        key = name.lower().replace("_", "-")
        if key in found:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        found[key] = dist
        for line in dist.requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return found


def _distribution_bytes(dist: metadata.Distribution) -> int:
    total = 0
    for file in dist.files or []:
        path = Path(str(dist.locate_file(file)))
        if path.is_file():
            total += path.stat().st_size
    return total


def environment_sizes() -> dict[str, Any]:
    """Installed size of an environment that can only listen against this whole environment (MB, packages)."""
    # fedsound's own files, without the training dependencies it declares
    listen_only = {**_distribution_closure(LISTEN_ONLY), "fedsound": metadata.distribution("fedsound")}
    everything = {d.metadata["Name"].lower(): d for d in metadata.distributions()}
    missing = [name for name in LISTEN_ONLY if name not in listen_only]
    return {
        "listen_only": {"packages": sorted(listen_only), "mb": sum(map(_distribution_bytes, listen_only.values()))
                        / 1e6, "not_installed_here": missing},
        "full": {"packages": len(everything), "mb": sum(map(_distribution_bytes, everything.values())) / 1e6},
    }


def _max_stream_diff(model: TCN, frontend: Frontend, wave: np.ndarray, block: int) -> float:
    engine = StreamEngine(model, frontend)
    probs = [engine.push(wave[i : i + block]) for i in range(0, len(wave), block)]
    streamed = np.concatenate([*probs, engine.flush()])
    offline = offline_probabilities(model, frontend, wave)
    if streamed.shape != offline.shape:
        raise RuntimeError(f"streaming gave {streamed.shape} frames, offline {offline.shape}")
    return float(np.max(np.abs(streamed - offline)))


def run_stream_bench(workdir: Path, quick: bool = False, out_json: Path | None = None, progress: bool = False,
                     seed: int = 0) -> dict[str, Any]:
    """Run the benchmark (module docstring); print a table and write JSON (``out_json`` or
    ``workdir/stream.json``). ``quick`` uses tiny sizes (smoke test)."""
    hops, train_s, test_s, steps, equality_s = (50, 20.0, 8.0, 20, 0.3) if quick else (3000, 120.0, 60.0, 400,
                                                                                       2.0)
    with single_thread():
        frontend = Frontend(FrontendConfig())
        settings = DetectorConfig()
        compute = {engine: {name: _compute_per_hop(config, frontend, engine, hops, seed,
                                                   Path(workdir) / f"bundle-{name}", progress, name)
                            for name, config in BENCH_MODELS.items()} for engine in ENGINES}

        rate = frontend.config.sample_rate
        train = synthetic_event_stream(train_s, rate, np.random.default_rng(seed + 1))
        train_frames = frontend.frames(train.wave, rate)
        start = time.perf_counter()
        detector_config = ModelConfig(channels=32, dropout=0.0)
        model = train_event_model(train_frames, frame_targets(train, frontend.config, len(train_frames)),
                                  detector_config, steps, seed, progress=progress)
        train_seconds = time.perf_counter() - start

        test = synthetic_event_stream(test_s, rate, np.random.default_rng(seed + 2))
        detector = torch_detector(model, frontend, LABELS, settings)
        emitted = []
        for i in range(0, len(test.wave), settings.block_size):
            emitted += detector.feed(test.wave[i : i + settings.block_size])
        emitted += detector.finish()
        records, false_onsets = match_events(test.events, emitted)

        random_model = build_model(ModelConfig(), frontend.config.n_mels, N_CLASSES).eval()
        assert isinstance(random_model, TCN)
        excerpt = test.wave[: int(equality_s * rate)]
        equality = {f"block {block}": max(_max_stream_diff(model, frontend, excerpt, block),
                                          _max_stream_diff(random_model, frontend, excerpt, block))
                    for block in EQUALITY_BLOCKS}
        equality["whole test stream, block 160"] = _max_stream_diff(model, frontend, test.wave, 160)
        portable = _detector(model, frontend, list(LABELS), "onnx", Path(workdir) / "bundle-detector").engine
        test_frames = frontend.frames(test.wave, rate)
        torch_probs = StreamEngine(model, frontend).probabilities(test_frames)
        portable_diff = float(np.max(np.abs(portable.probabilities(test_frames) - torch_probs)))

    found = [r for r in records if r["latency_ms"] is not None]
    latencies = [r["latency_ms"] for r in found]
    report: dict[str, Any] = {
        "machine": machine_info(),
        "threads": 1,
        "quick": quick,
        "frontend": {"sample_rate": rate, "n_fft": frontend.config.n_fft, "hop": frontend.config.hop_length,
                     "n_mels": frontend.config.n_mels},
        "compute": compute,
        "algorithmic_latency_ms": {"frontend_delay": detector.frontend_delay_ms,
                                   "postprocess": detector.tracker.algorithmic_delay_ms,
                                   "total": detector.algorithmic_latency_ms,
                                   "block_buffering_max": 1000.0 * settings.block_size / rate},
        "detection": {
            "detector_model": f"TCN {detector_config.channels} channels, trained {steps} steps "
                              f"({train_seconds:.1f} s) on {train_s:.0f} s of synthetic stream",
            "test_stream_s": test_s,
            "block_size": settings.block_size,
            "settings": {"on": settings.on_threshold, "off": settings.off_threshold,
                         "min_duration_ms": settings.min_duration_ms, "refractory_ms": settings.refractory_ms},
            "true_events": len(records),
            "recall": len(found) / max(1, len(records)),
            "false_onsets": false_onsets,
            "median_latency_ms": _median(latencies),
            "p90_latency_ms": _percentile(latencies, 0.9),
            "median_reported_latency_ms": _median([r["reported_latency_ms"] for r in found]),
            "per_label_median_latency_ms": {
                label: _median([r["latency_ms"] for r in found if r["label"] == label]) for label in LABELS
            },
        },
        "equality_max_abs_diff": equality,
        "portable_vs_torch_max_abs_diff": portable_diff,
        "environment": environment_sizes(),
        "targets": TARGETS,
    }
    print(format_table(report))
    write_json(Path(out_json) if out_json is not None else Path(workdir) / "stream.json", report)
    return report


def _mark(value: float, target: float) -> str:
    return "ok" if value <= target else "MISSED"


def format_table(report: dict[str, Any]) -> str:
    """A text summary of :func:`run_stream_bench`'s figures with the targets beside them."""
    lines = ["streaming detector, 1 thread" + (" (quick)" if report["quick"] else "")]
    lines.append(f"{'engine':<6} {'model':<8} {'wall ms/hop median':>18} {'p99':>7} {'max':>7} "
                 f"{'cpu ms/hop median':>18} {'p99':>7} {'RTF':>7}   target p99 (wall, cpu)")
    for engine, rows in report["compute"].items():
        for name, row in rows.items():
            target = TARGETS["portable_p99_ms_per_hop"] if engine == "onnx" and name == "tcn" else \
                TARGETS["p99_ms_per_hop"]
            lines.append(f"{engine:<6} {name:<8} {row['median_ms_per_hop']:>18.3f} {row['p99_ms_per_hop']:>7.3f} "
                         f"{row['max_ms_per_hop']:>7.3f} {row['cpu_median_ms_per_hop']:>18.3f} "
                         f"{row['cpu_p99_ms_per_hop']:>7.3f} {row['real_time_factor']:>7.4f}   <= {target} ms: "
                         f"{_mark(row['p99_ms_per_hop'], target)}, {_mark(row['cpu_p99_ms_per_hop'], target)}")
    alg = report["algorithmic_latency_ms"]
    lines.append(f"algorithmic latency {alg['total']:.1f} ms (frontend {alg['frontend_delay']:.1f} + "
                 f"post-processing {alg['postprocess']:.1f}; live input adds up to {alg['block_buffering_max']:.1f})")
    det = report["detection"]
    per_label = ", ".join(f"{k} {v:.1f}" for k, v in det["per_label_median_latency_ms"].items())
    lines.append(f"detection latency median {det['median_latency_ms']:.1f} ms, p90 {det['p90_latency_ms']:.1f} ms "
                 f"({per_label}); recall {det['recall']:.2f} of {det['true_events']} events, "
                 f"{det['false_onsets']} false onsets   target median <= "
                 f"{TARGETS['median_detection_latency_ms']:.0f} ms "
                 f"{_mark(det['median_latency_ms'], TARGETS['median_detection_latency_ms'])}")
    worst = max(report["equality_max_abs_diff"].values())
    lines.append(f"streaming vs offline max abs diff {worst:.2e}   target <= {TARGETS['max_abs_diff']:.0e} "
                 f"{_mark(worst, TARGETS['max_abs_diff'])}")
    portable = report["portable_vs_torch_max_abs_diff"]
    lines.append(f"portable (onnx) vs torch probabilities max abs diff {portable:.2e}   target <= "
                 f"{TARGETS['max_abs_diff']:.0e} {_mark(portable, TARGETS['max_abs_diff'])}")
    env = report["environment"]
    missing = f" ({', '.join(env['listen_only']['not_installed_here'])} not installed here)" \
        if env["listen_only"]["not_installed_here"] else ""
    lines.append(f"an environment that only listens: {len(env['listen_only']['packages'])} packages, "
                 f"{env['listen_only']['mb']:.0f} MB{missing}; this full install: {env['full']['packages']} "
                 f"packages, {env['full']['mb']:.0f} MB")
    return "\n".join(lines)
