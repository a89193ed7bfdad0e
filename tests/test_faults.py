"""Faults and bad input: bounded waits, signals, writer locks, resume checks, store checksums, one-line errors."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import REPO, fedsound, stop_when

from fl.config import apply_flat, load_config
from fl.errors import ConfigError, DataError
from fl.locks import LockedError, exclusive
from fl.rundir import RunDir
from fl.store import FeatureStore
from fl.train import train_central

HOLD = ("import sys, time; from pathlib import Path; from fl.locks import exclusive\n"
        "with exclusive(Path(sys.argv[1]), 'test', is_dir=sys.argv[2] == 'dir'):\n"
        "    print('held', flush=True); time.sleep(600)\n")


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """The single stderr line of a failed command (no traceback)."""
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.fixture
def held_lock():
    """Start a process that holds a writer lock; yields a function (target, is_dir) -> that process."""
    started = []

    def hold(target: Path, is_dir: bool = True) -> subprocess.Popen:
        process = subprocess.Popen([sys.executable, "-c", HOLD, str(target), "dir" if is_dir else "file"],
                                   cwd=REPO, stdout=subprocess.PIPE, text=True)
        assert process.stdout.readline().strip() == "held"
        started.append(process)
        return process

    yield hold
    for process in started:
        process.kill()
        process.wait()


# --- bounded waits and signals ------------------------------------------------------------------------------


def test_a_ray_address_where_nothing_listens_fails_at_once(tiny_store: Path, tmp_path: Path) -> None:
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]  # closed again below: nothing listens there
    started = time.monotonic()
    result = fedsound("simulate", str(tiny_store), "--ray-address", f"127.0.0.1:{port}", "--rounds", "1",
                      "--out", str(tmp_path / "run"), "--workdir", str(tmp_path / "w"), timeout=120)
    line = one_line_error(result)
    assert "federated.ray-address: nothing answers at 127.0.0.1" in line
    assert time.monotonic() - started < 60
    assert not (tmp_path / "run" / "config.json").exists()


def test_a_ray_address_that_never_answers_gives_up_after_the_timeout(tiny_store: Path, tmp_path: Path) -> None:
    """A port that accepts connections but never speaks Ray: the join gives up after --ray-timeout-s."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        port = silent.getsockname()[1]
        started = time.monotonic()
        result = fedsound("simulate", str(tiny_store), "--ray-address", f"127.0.0.1:{port}", "--ray-timeout-s", "4",
                          "--rounds", "1", "--out", str(tmp_path / "run"), "--workdir", str(tmp_path / "w"),
                          timeout=120)
    line = one_line_error(result)
    assert f"no Ray cluster answered at 127.0.0.1:{port} within 4 s" in line
    assert time.monotonic() - started < 45


@pytest.mark.parametrize(("signum", "status", "word"), [(signal.SIGTERM, 143, "terminated"),
                                                        (signal.SIGINT, 130, "interrupted")])
def test_a_signal_stops_training_cleanly_and_the_run_resumes(tiny_store: Path, tmp_path: Path, signum: int,
                                                             status: int, word: str) -> None:
    out = tmp_path / "run"
    returncode, stderr = stop_when(["train", str(tiny_store), "--epochs", "200", "--out", str(out), "--workdir",
                                    str(tmp_path / "w"), "--device", "cpu", "-q"],
                                   (out / "checkpoint.pt").exists, signum, 120)
    assert returncode == status and word in stderr and "Traceback" not in stderr
    RunDir(out).load_checkpoint()  # intact
    with exclusive(out, "run directory"):  # the lock went with the process
        pass


def test_a_forked_worker_keeps_the_default_signal_handling() -> None:
    """prep's pool stops its forked workers with SIGTERM: a worker dies of it quietly, as by default, instead of
    raising KeyboardInterrupt through the CLI's handler (a traceback per worker)."""
    code = ("import os, signal, time\nfrom fedsound.cli import _Interrupts\nwith _Interrupts():\n"
            "    pid = os.fork()\n    if pid == 0:\n        try:\n            time.sleep(60)\n"
            "        except KeyboardInterrupt:\n            os._exit(3)\n        os._exit(0)\n"
            "    time.sleep(0.5)\n    os.kill(pid, signal.SIGTERM)\n    _, status = os.waitpid(pid, 0)\n"
            "    print(os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "True", result.stderr


def test_ray_keeps_the_sigterm_handler_a_command_installed() -> None:
    """ray.init replaces the SIGTERM handler with one that exits wherever the main thread is; after
    keep_sigterm_handler a command's own handler stays, and Ray's is installed only where there was none."""
    import ray._private.utils as ray_utils

    from fedsound.simulate import keep_sigterm_handler

    def ours(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    def rays(signum: int, frame: object) -> None:
        sys.exit(signum)

    previous = signal.getsignal(signal.SIGTERM)
    try:
        keep_sigterm_handler()
        signal.signal(signal.SIGTERM, ours)
        ray_utils.set_sigterm_handler(rays)
        assert signal.getsignal(signal.SIGTERM) is ours
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        ray_utils.set_sigterm_handler(rays)
        assert signal.getsignal(signal.SIGTERM) is rays
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.slow
def test_sigterm_stops_a_simulation_and_leaves_it_resumable(tiny_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    returncode, stderr = stop_when(["simulate", str(tiny_store), "--rounds", "50", "--out", str(out), "--workdir",
                                    str(tmp_path / "w"), "-q"], lambda: bool(RunDir(out).records()),
                                   signal.SIGTERM, 180)
    assert returncode == 128 + signal.SIGTERM and "terminated" in stderr and "Traceback" not in stderr
    assert "Warning" not in stderr  # -q: nothing but the one line (no tips from Ray)
    assert RunDir(out).load_checkpoint()["round"] >= 1  # intact: --resume continues from it
    with exclusive(out, "run directory"):  # the lock went with the process
        pass


# --- writer locks -------------------------------------------------------------------------------------------


def test_a_second_writer_of_a_run_directory_is_refused_naming_the_holder(tiny_store, tiny_config, tmp_path,
                                                                        held_lock) -> None:
    out = tmp_path / "run"
    holder = held_lock(out)
    with pytest.raises(LockedError) as info:
        train_central(tiny_store, tiny_config, out, progress=False)
    message = str(info.value)
    assert f"pid {holder.pid}" in message and "run directory" in message and "\n" not in message
    assert not (out / "config.json").exists() and not (out / "metrics.jsonl").exists()
    holder.kill()
    holder.wait()  # a killed holder leaves no stale lock
    assert train_central(tiny_store, tiny_config, out, progress=False)["best_epoch"] == 1


def test_two_trains_into_one_folder_at_once_one_refuses(tiny_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "fedsound.cli", "train", str(tiny_store), "--epochs", "3", "--out", str(out),
            "--workdir", str(tmp_path / "w"), "--device", "cpu", "-q"]
    first = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not (out / ".fedsound.lock").exists() or not (out / ".fedsound.lock").stat().st_size:
        assert first.poll() is None
        time.sleep(0.05)
    second = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)
    first_out, first_err = first.communicate(timeout=300)
    assert first.returncode == 0, first_err
    assert "is in use by pid" in one_line_error(second)
    assert [r["epoch"] for r in RunDir(out).records()] == [1, 2, 3]


def test_stores_sweeps_and_profiles_are_locked_too(tiny_store, tmp_path, held_lock) -> None:
    from clients.detector.enroll import enroll
    from data_prep.prep import prep
    from fedsound.sweep import run_sweep
    from fl.config import FrontendConfig

    store = tmp_path / "store.h5"
    held_lock(store, is_dir=False)
    with pytest.raises(LockedError, match="feature store is in use by pid"):
        prep(tmp_path / "no-corpus-needed", store, FrontendConfig(), progress=False)
    sweep = tmp_path / "sweep"
    held_lock(sweep)
    config = load_config(REPO / "configs" / "sweep" / "tiny.toml")
    with pytest.raises(LockedError, match="sweep directory is in use"):
        run_sweep(tiny_store, config, sweep, progress=False)
    profile = tmp_path / "me"
    held_lock(profile, is_dir=False)
    with pytest.raises(LockedError, match="profile is in use"):
        enroll(profile, sound="pop", from_files=[tmp_path / "x.wav"], progress=False)


def test_the_lock_is_reentrant_within_a_process(tmp_path: Path) -> None:
    """The simulate driver and the ServerApp thread it starts hold the same run directory's lock."""
    done = []

    def server_thread() -> None:
        with exclusive(tmp_path / "run", "run directory") as path:
            done.append(path)

    with exclusive(tmp_path / "run", "run directory"):
        worker = threading.Thread(target=server_thread)
        worker.start()
        worker.join()
        assert done == [tmp_path.resolve() / "run" / ".fedsound.lock"]
    holder = subprocess.run([sys.executable, "-c", HOLD.replace("time.sleep(600)", "pass"), str(tmp_path / "run"),
                             "dir"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert holder.stdout.strip() == "held"  # released once the last holder in this process let go


# --- resume checks ------------------------------------------------------------------------------------------


@pytest.fixture
def one_epoch_run(tiny_store: Path, tiny_config, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    train_central(tiny_store, apply_flat(tiny_config, {"train.epochs": 1}, "test"), out, progress=False)
    return out


def test_resume_refuses_a_changed_config_naming_the_keys(tiny_store, tiny_config, one_epoch_run) -> None:
    before = (one_epoch_run / "config.json").read_text()
    changed = apply_flat(tiny_config, {"train.epochs": 2, "train.lr": 1e-2, "model.channels": 8}, "test")
    with pytest.raises(ConfigError) as info:
        train_central(tiny_store, changed, one_epoch_run, resume=True, progress=False)
    assert "model.channels: 16 -> 8" in str(info.value) and "train.lr: 0.0005 -> 0.01" in str(info.value)
    assert "train.epochs" not in str(info.value)  # a resumed run may go on longer
    assert (one_epoch_run / "config.json").read_text() == before
    # told to go on anyway, a checkpoint that cannot fit the new model is a one-line error; nothing is lost
    with pytest.raises(DataError, match="the checkpoint's model does not fit the configured one"):
        train_central(tiny_store, changed, one_epoch_run, resume=True, progress=False, allow_config_change=True)
    assert (one_epoch_run / "config.json").read_text() == before
    # a changed learning rate alone, allowed: resumes and records the new setting
    lr = apply_flat(tiny_config, {"train.epochs": 2, "train.lr": 1e-2}, "test")
    train_central(tiny_store, lr, one_epoch_run, resume=True, progress=False, allow_config_change=True)
    assert json.loads((one_epoch_run / "config.json").read_text())["train"]["lr"] == 1e-2


def test_resume_takes_a_key_the_recorded_config_lacks_as_its_default(tiny_store, tiny_config, one_epoch_run) -> None:
    """A run recorded before a key existed resumes with that key at its default, and not with another value."""
    saved = one_epoch_run / "config.json"
    recorded = json.loads(saved.read_text())
    del recorded["federated"]["max-pooling-rounds"]
    saved.write_text(json.dumps(recorded))
    with pytest.raises(ConfigError, match=r"federated.max-pooling-rounds: 0 -> 5"):
        train_central(tiny_store, apply_flat(tiny_config, {"train.epochs": 2, "federated.max-pooling-rounds": 5},
                                             "test"), one_epoch_run, resume=True, progress=False)
    RunDir(one_epoch_run).start(apply_flat(tiny_config, {"train.epochs": 2}, "test"), resume=True)  # no error


def test_resume_verifies_the_checkpoint(tiny_store, tiny_config, one_epoch_run) -> None:
    checkpoint = one_epoch_run / "checkpoint.pt"
    good = checkpoint.read_bytes()
    data = bytearray(good)
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside the weights
    checkpoint.write_bytes(bytes(data))
    config = apply_flat(tiny_config, {"train.epochs": 2}, "test")
    with pytest.raises(DataError, match=r"not a fedsound checkpoint: .*checkpoint\.pt \(corrupt"):
        train_central(tiny_store, config, one_epoch_run, resume=True, progress=False)
    torch.save({"model": object()}, checkpoint, _use_new_zipfile_serialization=True)  # a pickle of an object
    with pytest.raises(DataError, match="holds objects other than plain data and tensors"):
        train_central(tiny_store, config, one_epoch_run, resume=True, progress=False)
    checkpoint.write_bytes(good)
    assert train_central(tiny_store, config, one_epoch_run, resume=True, progress=False)["run"]


# --- one-line errors for bad flags and configs ---------------------------------------------------------------


def test_bad_config_files_and_seeds_are_one_line_errors(tiny_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    common = ["--out", str(out), "--workdir", str(tmp_path / "w")]
    assert "is a folder, not a config file" in one_line_error(
        fedsound("train", str(tiny_store), "--config", str(tmp_path), *common))
    latin = tmp_path / "latin.toml"
    latin.write_bytes("# café\n[train]\nepochs = 1\n".encode("latin-1"))
    assert "not UTF-8 text" in one_line_error(fedsound("train", str(tiny_store), "--config", str(latin), *common))
    assert "seed: must be a non-negative integer" in one_line_error(
        fedsound("train", str(tiny_store), "--seed", "-1", *common))
    assert not out.exists()


def test_a_frontend_table_that_contradicts_the_store_is_refused(tiny_store, tiny_config, tmp_path) -> None:
    other = apply_flat(tiny_config, {"frontend.n-mels": 64}, "test")
    with pytest.raises(ConfigError, match=r"frontend: .*\(n-mels = 64 where the store has 96\)"):
        train_central(tiny_store, other, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "config.json").exists()
    store_frontend = apply_flat(tiny_config, {"frontend.n-mels": 96}, "test")  # agreeing keys are fine
    train_central(tiny_store, store_frontend, tmp_path / "run", progress=False)
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())["frontend"]
    assert recorded["n-mels"] == FeatureStore(tiny_store).frontend.n_mels


def test_a_closed_stdout_stops_a_command_quietly(tiny_store: Path, tmp_path: Path) -> None:
    """`fedsound data verify STORE | head -0`: the reader is gone before the first line."""
    reader_gone = subprocess.Popen([sys.executable, "-m", "fedsound.cli", "data", "verify", str(tiny_store),
                                    "--workdir", str(tmp_path / "w")], cwd=REPO, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE)
    reader_gone.stdout.close()
    stderr = reader_gone.stderr.read().decode()
    reader_gone.wait(timeout=120)
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr
    assert reader_gone.returncode == 128 + signal.SIGPIPE


# --- store checksums ----------------------------------------------------------------------------------------


@pytest.fixture
def store_copy(tiny_store: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "store.h5"
    shutil.copy(tiny_store, copy)
    return copy


def test_verify_passes_on_a_prepared_store(store_copy: Path, tmp_path: Path) -> None:
    status = FeatureStore(store_copy).verify()
    assert set(status.values()) == {"ok"} and "train/frames" in status and "vocabulary/label" in status
    result = fedsound("data", "verify", str(store_copy), "--workdir", str(tmp_path / "w"))
    assert result.returncode == 0 and f"{len(status)} datasets match their checksums" in result.stdout


def test_flipped_frame_data_is_found_by_verify_and_refused_by_training(store_copy, tiny_config, tmp_path):
    with h5py.File(store_copy, "r") as h5:
        offset = h5["train/frames"].id.get_offset()
    with open(store_copy, "r+b") as fh:  # 4 KB of flipped bits inside the train frames
        fh.seek(offset + 8192)
        chunk = np.frombuffer(fh.read(4096), np.uint8)
        fh.seek(offset + 8192)
        fh.write((chunk ^ 0xFF).tobytes())
    result = fedsound("data", "verify", str(store_copy), "--workdir", str(tmp_path / "w"))
    assert "corrupt (checksum mismatch): train/frames" in one_line_error(result)
    with pytest.raises(DataError, match="train/frames"):
        train_central(store_copy, tiny_config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "config.json").exists()


def test_a_changed_clip_table_is_refused_when_read(store_copy: Path) -> None:
    with h5py.File(store_copy, "r+") as h5:
        h5["train/clips/n_segs"][0] += 1
    with pytest.raises(DataError, match="/train/clips/n_segs does not match its checksum"):
        FeatureStore(store_copy).table("train")
