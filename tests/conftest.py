"""Shared fixtures: a tiny synthetic feature store (built once per session) and a small configuration; helpers for
the tests that run Flower simulations over it."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from data_prep.prep import prep
from data_prep.synth import synthesize_corpus
from fl.config import Config, FrontendConfig, load_config

if TYPE_CHECKING:
    from fl.federation import RunSettings

REPO = Path(__file__).resolve().parent.parent
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


def store_with_faults(source: Path, store: Path, nan_partition: int, broken_partition: int | None = None) -> Path:
    """A copy of ``source`` in which every train frame of ``nan_partition`` (partitions by uploader, largest first)
    is NaN, so its update is non-finite, and, with ``broken_partition``, one clip of that partition points past the
    end of the frames, so its client raises. Its checksums describe what it now holds (a store written this way,
    not corrupted on disk)."""
    import h5py
    import numpy as np

    from fl.partition import partition_by_uploader
    from fl.store import FeatureStore
    from fl.store import _digest as store_digest

    shutil.copy(source, store)
    plan = partition_by_uploader(FeatureStore(source).table("train").clips)
    with h5py.File(store, "r+") as h5:
        frames, offsets, n_frames = h5["train/frames"], h5["train/clips/offset"], h5["train/clips/n_frames"]
        for clip in plan.clients[nan_partition]:
            frames[offsets[clip]:offsets[clip] + n_frames[clip]] = np.nan
        if broken_partition is not None:
            offsets[plan.clients[broken_partition][0]] = 10 * frames.shape[0]
        frames.attrs["sha256"] = store_digest(frames[()])
        offsets.attrs["sha256"] = store_digest(offsets[()])
    return store


def run_in_one_simulation(runs: Sequence[RunSettings], n_clients: int, config: Config) -> None:
    """The real round loop (``run_federated``) of each of ``runs`` in turn, inside one Flower simulation of
    ``n_clients`` supernodes (one Ray start for them all; ``config`` sets the client resources)."""
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from clients.client_app import app as client_app
    from fedsound.simulate import backend_config
    from server.server_app import run_federated

    server_app = ServerApp()

    @server_app.main()
    def every_run(grid: Grid, context: Context) -> None:
        for settings in runs:
            run_federated(grid, settings)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=n_clients,
                       backend_config=backend_config(config), verbose_logging=False)


def fedsound(*argv: str, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """Run ``python -m fedsound.cli ARGV`` from the repository to its end, capturing its output as text."""
    return subprocess.run([sys.executable, "-m", "fedsound.cli", *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, **kwargs)


def stop_when(args: Sequence[str], ready: Callable[[], bool], signum: int, within_s: float) -> tuple[int, str]:
    """Run ``python -m fedsound.cli ARGS`` from the repository, send it ``signum`` once ``ready()`` holds (failing
    if it exits first or ``within_s`` passes) and return its exit status and stderr."""
    process = subprocess.Popen([sys.executable, "-m", "fedsound.cli", *args], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + within_s
        while not ready():
            assert process.poll() is None, process.communicate()[1]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    return process.returncode, stderr
