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
