"""``fedsound bench stream``: the streaming detector's compute, latency and equality with offline processing.

All on one CPU thread (``torch.set_num_threads(1)``), default frontend (22.05 kHz, 96 bands, 10 ms hop):

* Compute per 10 ms hop (median, p99): one hop of audio through the whole detector (streaming frontend,
  ``TCN.step``, sigmoid, post-processing) for the default TCN and the paper-sized 256-channel TCN, 200
  classes; real-time factor = compute seconds per audio second.
* Algorithmic latency: frontend delay (``n_fft - n_fft // 2`` samples) plus post-processing delay (minimum
  duration less one frame); a live input adds up to one block.
* Detection latency on a synthetic test stream: short impulsive "click" and tonal "whistle" events at known
  onsets in noise. A small TCN is trained for a few seconds on frames labelled by the events of another
  stream of the same kind; the test stream is fed in blocks of ``detector.block-size`` samples, and each
  true event's latency is the audio time at which its onset event was emitted minus its true onset.
* Streaming equals offline: max abs difference of per-frame probabilities (streamed in blocks of 1, 160 and
  997 samples vs ``Frontend.frames`` + ``forward`` + sigmoid on the whole signal).

Targets printed beside the figures: p99 compute per hop at most 1 ms, median detection latency at most
50 ms, equality within 1e-4.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from benchmarks.common import machine_info, write_json
from clients.detector.postprocess import Event
from clients.detector.stream import StreamEngine, StreamingDetector, offline_probabilities, single_thread
from fl.config import DetectorConfig, FrontendConfig
from fl.frontend import Frontend
from fl.models import TCN, ModelConfig, build_model

LABELS = ("click", "whistle")
BENCH_MODELS = {"tcn": ModelConfig(), "tcn-256": ModelConfig(channels=256)}
N_CLASSES = 200
EQUALITY_BLOCKS = (1, 160, 997)
TARGETS = {"p99_ms_per_hop": 1.0, "median_detection_latency_ms": 50.0, "max_abs_diff": 1e-4}
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


def _compute_per_hop(config: ModelConfig, frontend: Frontend, hops: int, seed: int,
                     progress: bool, name: str) -> dict[str, float]:
    """Milliseconds per hop of audio through the whole detector (one hop-sized block per call).

    Wall-clock time and the thread's CPU time are both measured: on a shared machine the wall-clock tail
    includes time the process was descheduled, the CPU time does not.
    """
    torch.manual_seed(seed)
    model = build_model(config, frontend.config.n_mels, N_CLASSES)
    assert isinstance(model, TCN)
    labels = [f"class-{i}" for i in range(N_CLASSES)]
    detector = StreamingDetector(model.eval(), frontend, labels, DetectorConfig())
    hop = frontend.config.hop_length
    audio = synthetic_event_stream((hops + 100) * hop / frontend.config.sample_rate + 1.0,
                                   frontend.config.sample_rate, np.random.default_rng(seed)).wave
    for k in range(100):  # warm-up (also fills the frontend's first window)
        detector.feed(audio[k * hop : (k + 1) * hop])
    wall, cpu = [], []
    for k in tqdm(range(100, 100 + hops), desc=f"stream {name}", disable=not progress, leave=False):
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
        compute = {name: _compute_per_hop(config, frontend, hops, seed, progress, name)
                   for name, config in BENCH_MODELS.items()}

        rate = frontend.config.sample_rate
        train = synthetic_event_stream(train_s, rate, np.random.default_rng(seed + 1))
        train_frames = frontend.frames(train.wave, rate)
        start = time.perf_counter()
        detector_config = ModelConfig(channels=32, dropout=0.0)
        model = train_event_model(train_frames, frame_targets(train, frontend.config, len(train_frames)),
                                  detector_config, steps, seed, progress=progress)
        train_seconds = time.perf_counter() - start

        test = synthetic_event_stream(test_s, rate, np.random.default_rng(seed + 2))
        detector = StreamingDetector(model, frontend, LABELS, settings)
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
    lines.append(f"{'model':<8} {'wall ms/hop median':>18} {'p99':>7} {'max':>7} {'cpu ms/hop median':>18} "
                 f"{'p99':>7} {'RTF':>7}   target p99 <= {TARGETS['p99_ms_per_hop']} ms (wall, cpu)")
    for name, row in report["compute"].items():
        lines.append(f"{name:<8} {row['median_ms_per_hop']:>18.3f} {row['p99_ms_per_hop']:>7.3f} "
                     f"{row['max_ms_per_hop']:>7.3f} {row['cpu_median_ms_per_hop']:>18.3f} "
                     f"{row['cpu_p99_ms_per_hop']:>7.3f} {row['real_time_factor']:>7.4f}   "
                     f"{_mark(row['p99_ms_per_hop'], TARGETS['p99_ms_per_hop'])}, "
                     f"{_mark(row['cpu_p99_ms_per_hop'], TARGETS['p99_ms_per_hop'])}")
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
    return "\n".join(lines)
