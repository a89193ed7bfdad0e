"""Central differential privacy: Flower's DP wrappers in the round loop, client-side clipping, the budget."""

from __future__ import annotations

import shutil
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_in_one_simulation, store_with_faults
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict

from clients.client_app import clip_when_asked
from fedsound.simulate import simulate
from fl.config import Config, apply_flat, load_config
from fl.errors import ConfigError
from fl.federation import RunSettings
from fl.model_io import load_model
from fl.partition import partition_by_uploader
from fl.rundir import RunDir
from fl.runtime import configure_environment
from fl.store import FeatureStore
from fl.train import new_model
from server.privacy import PrivacyLedger

NORM = 0.5
MODES = ("server-fixed", "client-fixed", "server-adaptive")


def _message(arrays: dict[str, np.ndarray], config: dict) -> Message:
    content = RecordDict({"arrays": ArrayRecord({k: Array(v.copy()) for k, v in arrays.items()}),
                          "config": ConfigRecord(config)})
    return Message(content=content, dst_node_id=1, message_type=MessageType.TRAIN)


def _context() -> Context:
    return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})


@pytest.fixture
def in_a_run(monkeypatch):
    """Messages outside Flower's runtime: the identity of a task of run 1 on node 1."""
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


def test_the_client_clips_its_update_when_the_server_asks(in_a_run) -> None:
    sent = {"w": np.zeros(4, np.float32), "b": np.ones(2, np.float32)}
    big = {"w": np.full(4, 3.0, np.float32), "b": np.full(2, -2.0, np.float32)}

    def train(msg: Message, context: Context) -> Message:
        arrays = ArrayRecord({k: Array(v) for k, v in big.items()})
        return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord({"loss": 1.0})}), reply_to=msg)

    clipped = clip_when_asked(_message(sent, {"clipping_norm": NORM}), _context(), train)
    update = [clipped.content["arrays"][k].numpy() - sent[k] for k in sent]
    assert np.sqrt(sum(float((u**2).sum()) for u in update)) == pytest.approx(NORM, rel=1e-5)
    untouched = clip_when_asked(_message(sent, {"server-round": 1}), _context(), train)
    assert np.array_equal(untouched.content["arrays"]["w"].numpy(), big["w"])  # no norm asked: as trained


def test_dp_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="federated.dp: needs a strategy that averages updates uniformly"):
        load_config(overrides={"federated.dp": "server-fixed", "federated.strategy": "fedadam"})
    with pytest.raises(ConfigError, match="federated.dp: needs the TCN"):
        load_config(overrides={"federated.dp": "client-fixed", "model.name": "vgg"})
    with pytest.raises(ConfigError, match="dp-delta"):
        load_config(overrides={"federated.dp": "server-fixed", "federated.dp-delta": 0.0})


def test_the_ledger_composes_one_release_per_aggregated_round() -> None:
    fed = load_config(overrides={"federated.dp": "server-fixed", "federated.dp-noise-multiplier": 2.0}).federated
    ledger = PrivacyLedger(fed, population=30, n_sampled=10)
    assert ledger.epsilon() == 0.0
    ledger.release()
    one = ledger.epsilon()
    ledger.release(3)
    assert ledger.releases == 4 and ledger.epsilon() > one > 0
    noisier = PrivacyLedger(replace(fed, dp_noise_multiplier=4.0), population=30, n_sampled=10)
    noisier.release(4)
    assert noisier.epsilon() < ledger.epsilon()


@pytest.fixture(scope="module")
def dp_config(tiny_config: Config, tmp_path_factory: pytest.TempPathFactory) -> Config:
    configure_environment(tmp_path_factory.mktemp("dp-work"))
    return apply_flat(tiny_config, {"federated.dp": "client-fixed", "federated.dp-clipping-norm": NORM,
                                    "federated.dp-noise-multiplier": 1.0}, "test")


def _simulate(store: Path, config: Config, out: Path, resume: bool = False) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        simulate(store, config, out, resume=resume, progress=False)


@pytest.fixture(scope="module")
def dp_runs(tiny_store: Path, dp_config: Config, tmp_path_factory: pytest.TempPathFactory) -> dict[str, RunSettings]:
    """One round of each DP mode, and one client-fixed round with every client sampled over a store in which one
    client's frames are NaN: each through the real round loop (``run_federated``), all in one simulation."""
    base = tmp_path_factory.mktemp("dp-runs")
    one_round = apply_flat(dp_config, {"federated.rounds": 1}, "test")
    runs = {mode: RunSettings(apply_flat(one_round, {"federated.dp": mode}, "test"), tiny_store, base / mode)
            for mode in MODES}
    nan_store = store_with_faults(tiny_store, base / "store.h5", nan_partition=1)
    runs["missing-update"] = RunSettings(apply_flat(one_round, {"federated.fraction": 1.0}, "test"), nan_store,
                                         base / "missing")
    n_clients = len(partition_by_uploader(FeatureStore(tiny_store).table("train").clips).clients)
    run_in_one_simulation(list(runs.values()), n_clients, one_round)
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_each_dp_mode_trains_and_accounts_every_round(dp_runs: dict[str, RunSettings], mode: str) -> None:
    config, out = dp_runs[mode].config, dp_runs[mode].out
    records = RunDir(out).records()
    ledger = PrivacyLedger(config.federated, population=10, n_sampled=len(records[0]["clients_sampled"]))
    for record in records:
        ledger.release()
        assert record["epsilon"] == pytest.approx(ledger.epsilon()) and record["delta"] == config.federated.dp_delta
        assert record["dp_releases"] == record["round"] and 0 <= record["mAP"] <= 1
    assert len(records) == 1 and records[0]["dp_clipping_norm"] == NORM  # the round used the initial norm
    next_norm = RunDir(out).load_checkpoint()["strategy"].get("dp_clipping_norm", NORM)
    assert (next_norm != NORM) == (mode == "server-adaptive")  # the adaptive norm follows the updates' norms


@pytest.mark.slow
def test_a_dp_run_resumes_with_its_budget(tiny_store: Path, dp_runs: dict[str, RunSettings], dp_config: Config,
                                          tmp_path: Path) -> None:
    """The one-round client-fixed run, resumed by ``fedsound simulate`` to two rounds, spends two releases."""
    out = tmp_path / "run"
    shutil.copytree(dp_runs["client-fixed"].out, out)
    _simulate(tiny_store, dp_config, out, resume=True)
    first, second = RunDir(out).records()
    assert second["dp_releases"] == 2 and second["epsilon"] > first["epsilon"] > 0
    ledger = PrivacyLedger(dp_config.federated, population=10, n_sampled=len(second["clients_sampled"]))
    ledger.release(2)
    assert second["epsilon"] == pytest.approx(ledger.epsilon())


@pytest.mark.slow
def test_a_dp_round_missing_an_update_is_not_aggregated_and_spends_nothing(dp_runs: dict[str, RunSettings]) -> None:
    """Every client sampled, one of them with NaN frames (its update is rejected): the noise is calibrated to the
    sampled count, so the round keeps the model as it was."""
    settings = dp_runs["missing-update"]
    (record,) = RunDir(settings.out).records()
    assert record["clients_rejected"] == [1] and record["dp_releases"] == 0 and record["epsilon"] == 0.0
    model, _ = load_model(settings.out / "model.pt")
    initial = new_model(settings.config, FeatureStore(settings.store)).state_dict()
    assert all(torch.equal(model.state_dict()[k], initial[k]) for k in initial)
