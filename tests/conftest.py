"""Shared fixtures: a tiny synthetic feature store (built once per session) and a small configuration."""

from __future__ import annotations

from pathlib import Path

import pytest

from data_prep.prep import prep
from data_prep.synth import synthesize_corpus
from fl.config import Config, FrontendConfig, load_config

TINY_CLIPS = 60
TINY_UPLOADERS = 10
TINY_CLASSES = 5
EVENT_FRONTEND = FrontendConfig(sample_rate=16000, n_fft=400, hop_length=160, n_mels=32, patch_frames=50,
                               patch_hop=25)


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A feature store of a 60-clip, 10-uploader, 5-class synthetic corpus (default frontend); ~4 s."""
    root = tmp_path_factory.mktemp("tiny_corpus")
    synthesize_corpus(root / "fsd", n_clips=TINY_CLIPS, n_uploaders=TINY_UPLOADERS, n_classes=TINY_CLASSES,
                      seed=0, progress=False)
    store = root / "store.h5"
    prep(root / "fsd", store, FrontendConfig(), workers=0, progress=False)
    return store


@pytest.fixture(scope="session")
def tiny_config() -> Config:
    """A fast configuration: 16-channel TCN on CPU, 2 federated rounds of half the clients, 1 local epoch."""
    return load_config(overrides={
        "seed": 0,
        "model.channels": 16,
        "train.batch-size": 32,
        "train.epochs": 1,
        "train.device": "cpu",
        "federated.rounds": 2,
        "federated.fraction": 0.5,
        "federated.min-clients": 2,
        "federated.local-epochs": 1,
    })


@pytest.fixture(scope="session")
def event_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``model.pt`` of a 16-channel TCN trained for 100 steps on 40 s of synthetic clicks and whistles (16 kHz,
    32 bands), with its labels and frontend: the model the listening tests export."""
    import numpy as np

    from benchmarks.stream.bench import LABELS, frame_targets, synthetic_event_stream, train_event_model
    from clients.detector.torch_stream import single_thread
    from fl.config import to_dict
    from fl.frontend import Frontend
    from fl.model_io import save_model
    from fl.models import ModelConfig

    path = tmp_path_factory.mktemp("event_model") / "model.pt"
    with single_thread():
        frontend = Frontend(EVENT_FRONTEND)
        train = synthetic_event_stream(40.0, EVENT_FRONTEND.sample_rate, np.random.default_rng(1))
        frames = frontend.frames(train.wave, EVENT_FRONTEND.sample_rate)
        model = train_event_model(frames, frame_targets(train, EVENT_FRONTEND, len(frames)),
                                  ModelConfig(channels=16, dropout=0.0), steps=100, seed=0)
    save_model(path, model, {"labels": list(LABELS), "mids": ["/t/click", "/t/whistle"],
                             "frontend": to_dict(EVENT_FRONTEND)})
    return path
