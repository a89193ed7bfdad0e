"""The portable detector: a bundle exported with ``--onnx`` runs on numpy and onnxruntime alone, with the torch
engine's frames, probabilities and events."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import EVENT_FRONTEND, REPO

from benchmarks.stream.bench import synthetic_event_stream
from clients.detector.bundle import export_bundle, load_bundle
from clients.detector.listen import listen
from clients.detector.manifest import BundleError, read_manifest
from clients.detector.portable import portable_parts
from clients.detector.torch_stream import StreamEngine, single_thread
from fl.config import Config
from fl.frontend import Frontend

FRONTEND = EVENT_FRONTEND
# What a laptop that only listens lacks: the import of any of these fails in the child process below.
ABSENT = ("torch", "torchaudio", "flwr", "ray", "h5py", "pandas", "scipy", "sklearn", "matplotlib", "onnx", "tqdm")
BLOCKER = f"""
import sys
for name in {ABSENT!r}:
    sys.modules[name] = None  # as if not installed: importing it fails, find_spec finds nothing
from fedsound.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def portable_setup(event_model, tmp_path_factory):
    """The event model (``conftest.event_model``) exported with and without ``--onnx``, and a test WAV."""
    root = tmp_path_factory.mktemp("portable")
    portable = export_bundle(event_model, root / "portable", Config(), portable=True)
    plain = export_bundle(event_model, root / "plain", Config())
    test = synthetic_event_stream(8.0, FRONTEND.sample_rate, np.random.default_rng(7))
    wav = root / "test.wav"
    sf.write(wav, test.wave, FRONTEND.sample_rate, subtype="FLOAT")
    return portable, plain, wav, test


def test_numpy_frames_and_onnx_step_equal_the_torch_engine(portable_setup):
    bundle_path, _, _, test = portable_setup
    frames_np, step = portable_parts(read_manifest(bundle_path))
    frontend = Frontend(FRONTEND)
    reference = frontend.frames(test.wave, FRONTEND.sample_rate)
    pad = FRONTEND.n_fft // 2
    padded = np.pad(test.wave, (pad, pad), mode="reflect")
    np.testing.assert_allclose(frames_np.frames_of(padded, len(reference)), reference, atol=1e-4)
    with single_thread():
        torch_probs = StreamEngine(load_bundle(bundle_path).model, frontend).probabilities(reference)
    onnx_probs = step.probabilities(reference)
    assert np.abs(onnx_probs - torch_probs).max() < 1e-5
    step.reset()  # a new stream starts from zero caches
    np.testing.assert_allclose(step.probabilities(reference[:50]), torch_probs[:50], atol=1e-5)


def _events(out: str) -> list[tuple]:
    return [(e["type"], e["label"], e["onset_s"], round(e["score"], 3)) for e in map(json.loads, out.splitlines())]


def test_listen_with_the_onnx_engine_gives_the_torch_engines_events(portable_setup, capsys):
    bundle_path, _, wav, test = portable_setup
    assert listen(bundle_path, Config(), input_=str(wav), as_json=True, engine="torch") == 0
    with_torch = _events(capsys.readouterr().out)
    assert listen(bundle_path, Config(), input_=str(wav), as_json=True, engine="onnx") == 0
    with_onnx = _events(capsys.readouterr().out)
    assert with_onnx == with_torch
    assert [label for kind, label, _, _ in with_onnx if kind == "onset"] == [label for label, _, _ in test.events]


def test_a_laptop_without_torch_flower_or_ray_listens(portable_setup, tmp_path):
    """``fedsound listen`` in a process where torch, Flower, Ray and the other training packages cannot be
    imported: ``--engine auto`` picks the portable files, and the events are the torch engine's."""
    bundle_path, _, wav, _ = portable_setup
    argv = ["listen", str(bundle_path), "--input", str(wav), "--json", "--workdir", str(tmp_path / "w")]
    without = subprocess.run([sys.executable, "-c", BLOCKER, *argv], cwd=REPO, capture_output=True, text=True,
                             timeout=120)
    assert without.returncode == 0, without.stderr
    with_torch = subprocess.run([sys.executable, "-m", "fedsound.cli", *argv, "--engine", "torch"], cwd=REPO,
                                capture_output=True, text=True, timeout=120)
    assert _events(without.stdout) == _events(with_torch.stdout) != []


def test_the_onnx_engine_on_a_bundle_without_portable_files_is_a_one_line_error(portable_setup):
    _, plain, wav, _ = portable_setup
    with pytest.raises(BundleError, match=r"no portable files; export it with .*--onnx") as info:
        listen(plain, Config(), input_=str(wav), engine="onnx")
    assert "\n" not in str(info.value)
    assert read_manifest(plain).portable is None


def test_the_portable_files_are_covered_by_the_bundles_checksums(portable_setup, tmp_path):
    import shutil

    copy = tmp_path / "bundle"
    shutil.copytree(portable_setup[0], copy)
    step = copy / "step.onnx"
    data = bytearray(step.read_bytes())
    data[-10] ^= 0x01
    step.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"step\.onnx: checksum mismatch"):
        read_manifest(copy)


def test_export_onnx_from_the_command_line(event_model, tmp_path):
    result = subprocess.run([sys.executable, "-m", "fedsound.cli", "export", str(event_model), str(tmp_path / "b"),
                             "--onnx", "--workdir", str(tmp_path / "w")], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    portable = read_manifest(tmp_path / "b").portable
    assert portable["step"] == "step.onnx" and len(portable["caches"]) == 4
    assert torch.load(tmp_path / "b" / "weights.pt", weights_only=True).keys()
