"""Streaming frontend and engine: the same frames and probabilities as offline processing, whatever the block
size, after the documented delay."""

import numpy as np
import pytest
import torch

from clients.detector.stream import StreamingFrontend
from clients.detector.torch_stream import (
    StreamEngine,
    TorchFrames,
    offline_probabilities,
    single_thread,
    torch_detector,
)
from fl.config import DetectorConfig, FrontendConfig
from fl.frontend import Frontend
from fl.models import ModelConfig, build_model

CONFIGS = {
    "default": FrontendConfig(),  # 22.05 kHz, n_fft 660, hop 220, 96 bands
    "odd": FrontendConfig(sample_rate=8000, n_fft=201, win_length=160, hop_length=80, n_mels=20,
                          scale="linear", store_dtype="float32"),
}
BLOCKS = [1, 160, 1000, 37, 997]


def signal(n: int, rate: int, seed: int = 0) -> np.ndarray:
    """Noise with a few tone bursts: quiet and loud frames, so the log compression is exercised."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / rate
    wave = 0.01 * rng.standard_normal(n)
    for start in rng.uniform(0, n / rate, 3):
        wave += 0.5 * np.sin(2 * np.pi * 700 * t) * ((t >= start) & (t < start + 0.03))
    return wave.astype(np.float32)


def stream_frames(frontend: Frontend, wave: np.ndarray, block: int) -> np.ndarray:
    streaming = StreamingFrontend(TorchFrames(frontend))
    out = [streaming.push(wave[i : i + block]) for i in range(0, len(wave), block)]
    return np.concatenate([*out, streaming.flush()])


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("block", BLOCKS)
def test_streamed_frames_equal_offline_frames(name, block):
    config = CONFIGS[name]
    frontend = Frontend(config)
    for n in (config.n_fft // 2 + 1, 3 * config.hop_length + 7, int(0.25 * config.sample_rate) + 3):
        wave = signal(n, config.sample_rate, seed=n)
        offline = frontend.frames(wave, config.sample_rate)
        streamed = stream_frames(frontend, wave, block)
        assert streamed.shape == offline.shape
        np.testing.assert_allclose(streamed, offline, rtol=1e-5, atol=1e-5)  # float rounding only


def test_each_frame_comes_out_after_the_documented_delay():
    config = CONFIGS["odd"]
    frontend = StreamingFrontend(TorchFrames(Frontend(config)))
    wave = signal(1000, config.sample_rate)
    ready_at = []  # samples received when each frame came out
    for i in range(len(wave)):
        ready_at += [i + 1] * len(frontend.push(wave[i : i + 1]))
    pad = config.n_fft // 2
    assert frontend.delay_samples == config.n_fft - pad
    expected = [max(t * config.hop_length + frontend.delay_samples, pad + 1) for t in range(len(ready_at))]
    assert ready_at == expected
    assert len(ready_at) + len(frontend.flush()) == 1 + (len(wave) + 2 * pad - config.n_fft) // config.hop_length


def test_short_stream_flush_and_reset():
    config = CONFIGS["odd"]
    streaming = StreamingFrontend(TorchFrames(Frontend(config)))
    assert len(streaming.push(np.zeros(config.n_fft // 2, np.float32))) == 0
    assert len(streaming.flush()) == 0  # shorter than the reflection needs: no frame at all
    with pytest.raises(RuntimeError, match="flushed"):
        streaming.push(np.zeros(10, np.float32))
    streaming.reset()
    wave = signal(900, config.sample_rate)
    first = np.concatenate([streaming.push(wave), streaming.flush()])
    streaming.reset()
    np.testing.assert_array_equal(np.concatenate([streaming.push(wave), streaming.flush()]), first)
    streaming.reset()
    with pytest.raises(ValueError, match="mono"):
        streaming.push(np.zeros((4, 2), np.float32))


@pytest.mark.parametrize("name", CONFIGS)
def test_streamed_probabilities_equal_offline_within_1e4(name):
    config = CONFIGS[name]
    frontend = Frontend(config)
    torch.manual_seed(0)
    model = build_model(ModelConfig(channels=24, dilations=(1, 2, 4)), config.n_mels, 3).eval()
    wave = signal(int(0.4 * config.sample_rate), config.sample_rate, seed=3)
    offline = offline_probabilities(model, frontend, wave)
    for block in (1, 160, 1000, 997):
        engine = StreamEngine(model, frontend)
        with single_thread():
            probs = [engine.push(wave[i : i + block]) for i in range(0, len(wave), block)]
            streamed = np.concatenate([*probs, engine.flush()])
        assert streamed.shape == offline.shape
        assert np.max(np.abs(streamed - offline)) <= 1e-4
    assert offline.min() < 0.5 < offline.max() or offline.std() > 1e-3  # a non-trivial output was compared


def test_engine_refuses_a_model_without_streaming_step_and_mismatched_bands():
    frontend = Frontend(CONFIGS["odd"])
    with pytest.raises(TypeError, match="TCN"):
        StreamEngine(build_model(ModelConfig(name="vgg"), 20, 2), frontend)
    with pytest.raises(ValueError, match="mel bands"):
        StreamEngine(build_model(ModelConfig(channels=8), 32, 2), frontend)


def test_detector_reports_its_algorithmic_latency():
    config = CONFIGS["default"]
    model = build_model(ModelConfig(channels=8), config.n_mels, 2)
    detector = torch_detector(model, Frontend(config), ["a", "b"], DetectorConfig(min_duration_ms=30))
    assert detector.frontend_delay_ms == pytest.approx(330 / 22050 * 1000)
    assert detector.algorithmic_latency_ms == pytest.approx((330 + 2 * 220) / 22050 * 1000)
