"""Federated training through Flower's Simulation Engine (Ray) on the tiny synthetic store.

Each simulation costs 10-25 s on two cores (Ray start, client actors importing torch), so the module runs three: one
uninterrupted 2-round run; one in which the real round loop (``run_federated``) runs one round of each of the nine
strategies in turn and one of FedAvg within ``max-pooling-rounds``, then one round over a store in which one
client's data raise and another's give NaN weights, then the first round of a run; and ``simulate`` resuming that
run to 2 rounds (it is also the repeat that must equal the uninterrupted run bit for bit). The resume runs use
FedAvgM, whose server momentum and current weights must survive the checkpoint for resume to be exact.
"""

from __future__ import annotations

import shutil
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, run_in_one_simulation, store_with_faults
from flwr.app import ArrayRecord
from flwr.common.config import get_fused_config_from_dir

from fedsound.cli import main as cli_main
from fedsound.simulate import simulate
from fl.config import STRATEGIES, Config, apply_flat
from fl.errors import ConfigError
from fl.federation import RUN_ENV, RunSettings, round_config, settings_from_run_config, update_problem
from fl.model_io import load_model
from fl.partition import PartitionPlan, build_partition
from fl.rundir import RunDir
from fl.runtime import configure_environment
from fl.store import FeatureStore, with_store_frontend
from fl.train import evaluate, new_model, train_epochs
from server.strategy import build_strategy, restore_strategy_state, sample_partitions

RECORD_KEYS = {"round", "mAP", "train_loss", "clients_sampled", "clients_rejected", "clients_failed",
               "train_seconds", "seconds"}
STATEFUL = {"fedadam": ("m_t", "v_t"), "fedyogi": ("m_t", "v_t"), "fedadagrad": ("m_t", "v_t"),
            "fedavgm": ("momentum_vector", "current_arrays")}
NAN_PARTITION, BROKEN_PARTITION = 1, 2  # clients of the faulty store (partitions by uploader, largest first)


def model_state(run: Path) -> dict[str, torch.Tensor]:
    model, _ = load_model(run / "model.pt")
    return model.state_dict()


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for key in a:
        diff = (a[key].double() - b[key].double()).abs().max().item() if a[key].numel() else 0.0
        assert diff <= atol, f"{key} differs by {diff}"


@pytest.fixture(scope="module")
def sim_config(tiny_config: Config, tmp_path_factory: pytest.TempPathFactory) -> Config:
    """The tiny config with FedAvgM; Flower and Ray write into a temporary workdir."""
    configure_environment(tmp_path_factory.mktemp("fedsound-work"))
    return apply_flat(tiny_config, {"federated.strategy": "fedavgm"}, "test")


def run_sim(store: Path, config: Config, out: Path, resume: bool = False) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return simulate(store, config, out, resume=resume, progress=False)


@pytest.fixture(scope="module")
def uninterrupted(tiny_store: Path, sim_config: Config, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    result = run_sim(tiny_store, sim_config, out)
    assert result["rounds"] == 2
    return out


@pytest.fixture(scope="module")
def resumed(tiny_store: Path, sim_config: Config, strategy_runs: dict) -> dict:
    """A 1-round run (in the shared simulation below), a stray record as a run killed after writing metrics but
    before its checkpoint, then resumed to 2 rounds by ``simulate``."""
    out = strategy_runs["first_round"]
    after_one = RunDir(out).records()
    RunDir(out).append({"round": 2, "mAP": -1.0})
    run_sim(tiny_store, sim_config, out, resume=True)
    return {"out": out, "after_one": after_one}


@pytest.mark.slow
def test_two_rounds_write_metrics_model_and_plot(uninterrupted: Path, sim_config: Config) -> None:
    records = RunDir(uninterrupted).records()
    assert [r["round"] for r in records] == [1, 2]
    n_clients = PartitionPlan.load(uninterrupted / "partition.json").n_clients
    for record in records:
        assert RECORD_KEYS <= record.keys()
        assert 0.0 <= record["mAP"] <= 1.0
        assert np.isfinite(record["train_loss"]) and record["train_loss"] > 0
        assert record["clients_sampled"] == sorted(set(record["clients_sampled"]))
        assert len(record["clients_sampled"]) == round(sim_config.federated.fraction * n_clients)
        assert all(0 <= p < n_clients for p in record["clients_sampled"])
        assert record["clients_rejected"] == [] and record["clients_failed"] == 0
        assert 0 < record["train_seconds"] and 0 < record["seconds"]
    for name in ("model.pt", "curves.png", "checkpoint.pt", "config.json", "partition.json"):
        assert (uninterrupted / name).stat().st_size > 0
    model, _ = load_model(uninterrupted / "model.pt")
    assert model.config.channels == sim_config.model.channels
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())
    assert RunDir(uninterrupted).load_checkpoint()["round"] == 2


@pytest.mark.slow
def test_same_seed_same_partitions_and_weights(uninterrupted: Path, resumed: dict, sim_config: Config) -> None:
    """The resumed run is a second run with the same seed (its own Ray sessions): every figure and weight equal."""
    repeat = resumed["out"]
    assert (repeat / "partition.json").read_text() == (uninterrupted / "partition.json").read_text()
    a, b = RunDir(uninterrupted).records(), RunDir(repeat).records()
    n_clients = PartitionPlan.load(uninterrupted / "partition.json").n_clients
    fed = sim_config.federated
    for server_round, (ra, rb) in enumerate(zip(a, b, strict=True), start=1):
        expected = sample_partitions(n_clients, fed.fraction, fed.min_clients, sim_config.seed, server_round)
        assert ra["clients_sampled"] == rb["clients_sampled"] == expected
        assert ra["mAP"] == rb["mAP"] and ra["train_loss"] == rb["train_loss"]
    assert_same_weights(model_state(uninterrupted), model_state(repeat))


@pytest.mark.slow
def test_resume_equals_uninterrupted(uninterrupted: Path, resumed: dict) -> None:
    assert [r["round"] for r in resumed["after_one"]] == [1]
    records = RunDir(resumed["out"]).records()
    assert [r["round"] for r in records] == [1, 2]  # the stray record of the "killed" run is gone
    reference = RunDir(uninterrupted).records()
    for got, want in zip(records, reference, strict=True):
        assert got["clients_sampled"] == want["clients_sampled"]
        assert got["mAP"] == want["mAP"] and got["train_loss"] == want["train_loss"]
    assert_same_weights(model_state(resumed["out"]), model_state(uninterrupted), atol=0.0)


@pytest.mark.slow
def test_failing_and_nan_clients_do_not_stop_the_round(strategy_runs: dict) -> None:
    faulty_run = strategy_runs["faulty"]
    (record,) = RunDir(faulty_run).records()
    n_clients = PartitionPlan.load(faulty_run / "partition.json").n_clients
    assert record["clients_sampled"] == list(range(n_clients))
    assert record["clients_rejected"] == [NAN_PARTITION]
    assert record["clients_failed"] == 1
    assert 0.0 <= record["mAP"] <= 1.0 and np.isfinite(record["train_loss"])
    assert all(torch.isfinite(v).all() for v in model_state(faulty_run).values())


# --- the real round loop, one simulation: one round of each strategy, and one over the faulty store -----------


@pytest.fixture(scope="module")
def strategy_runs(tiny_store: Path, sim_config: Config, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Run ``run_federated`` for one round of each strategy (three clients per round), one round of every client
    over the faulty store, and the first round of the run :func:`resumed` resumes, inside one simulation."""
    base = tmp_path_factory.mktemp("strategies")
    config = apply_flat(sim_config, {"federated.rounds": 1, "federated.fraction": 0.1, "federated.min-clients": 3,
                                     "federated.proximal-mu": 1.0, "train.batch-size": 4}, "test")
    plan_path, _, _ = build_partition(tiny_store, config, base / "partition.json")
    runs = {}
    for name in STRATEGIES:
        out = base / name
        out.mkdir()
        shutil.copy(plan_path, out / "partition.json")
        runs[name] = RunSettings(replace(config, federated=replace(config.federated, strategy=name)),
                                 tiny_store, out)
    warmup = apply_flat(config, {"federated.strategy": "fedavg", "federated.max-pooling-rounds": 1}, "test")
    runs["max-pooling"] = RunSettings(warmup, tiny_store, base / "max-pooling")
    runs["max-pooling"].out.mkdir()
    shutil.copy(plan_path, runs["max-pooling"].out / "partition.json")
    faulty_store = store_with_faults(tiny_store, base / "faulty-store.h5", NAN_PARTITION, BROKEN_PARTITION)
    faulty = RunSettings(replace(sim_config, federated=replace(sim_config.federated, rounds=1, fraction=1.0)),
                         faulty_store, base / "faulty")
    one_round = replace(sim_config, federated=replace(sim_config.federated, rounds=1))
    first_round = RunSettings(with_store_frontend(one_round, FeatureStore(tiny_store)), tiny_store, base / "resumed")
    run_in_one_simulation([*runs.values(), faulty, first_round], PartitionPlan.load(plan_path).n_clients, config)
    return {"config": config, "plan": PartitionPlan.load(plan_path), "outs": {k: s.out for k, s in runs.items()},
            "faulty": faulty.out, "first_round": first_round.out}


@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_runs_one_round(strategy_runs: dict, tiny_store: Path, strategy: str) -> None:
    out = strategy_runs["outs"][strategy]
    (record,) = RunDir(out).records()
    assert len(record["clients_sampled"]) == 3
    assert record["clients_rejected"] == [] and record["clients_failed"] == 0
    assert 0.0 <= record["mAP"] <= 1.0 and np.isfinite(record["train_loss"])
    weights = model_state(out)
    initial = new_model(strategy_runs["config"], FeatureStore(tiny_store)).state_dict()
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert any(not torch.equal(weights[k], initial[k]) for k in weights)
    state = RunDir(out).load_checkpoint()["strategy"]
    assert set(STATEFUL.get(strategy, ())) <= state.keys()
    config = strategy_runs["config"]
    fresh = build_strategy(replace(config, federated=replace(config.federated, strategy=strategy)), 3)
    restore_strategy_state(fresh, state)
    for name in STATEFUL.get(strategy, ()):
        restored, saved = plain_arrays(getattr(fresh, name)), plain_arrays(state[name])
        assert len(restored) == len(saved) > 0
        assert all(np.array_equal(a, b) for a, b in zip(restored, saved, strict=True))


def plain_arrays(value: ArrayRecord | dict | list) -> list[np.ndarray]:
    """The arrays of a strategy's state attribute or of its checkpointed form, in order."""
    if isinstance(value, ArrayRecord):
        return [array.numpy() for array in value.values()]
    return [np.asarray(v) for v in (value.values() if isinstance(value, dict) else value)]


def replay_clients(strategy_runs: dict, store_path: Path, sampled: list[int],
                   pooling: str = "lse") -> tuple[list, np.ndarray]:
    """The sampled clients' round-1 updates recomputed in this process (same seeds, one thread), training with
    ``pooling``."""
    config, plan = strategy_runs["config"], strategy_runs["plan"]
    config = replace(config, model=replace(config.model, pooling=pooling))
    store = FeatureStore(store_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    updates, sizes = [], []
    try:
        for partition in sampled:
            model = new_model(config, store)
            patches = store.patch_index("train", plan.clients[partition])
            train_epochs(model, store, "train", patches, config.train, config.federated.local_epochs,
                         [config.seed, 1, partition], torch.device("cpu"))
            updates.append({k: v.double() for k, v in model.state_dict().items()})
            sizes.append(len(patches))
    finally:
        torch.set_num_threads(threads)
    return updates, np.array(sizes, dtype=np.float64)


@pytest.mark.slow
def test_aggregation_matches_the_strategies_definitions(strategy_runs: dict, tiny_store: Path) -> None:
    """FedAvg is the patch-weighted mean of the client updates, FedAvgM's first round equals it (momentum
    starts at the first pseudo-gradient, server lr 1), FedTrimmedAvg with nothing trimmed is the plain mean,
    FedMedian the element-wise median, Krum one of the updates; FedProx's proximal term changes the result."""
    outs = strategy_runs["outs"]
    (record,) = RunDir(outs["fedavg"]).records()
    updates, sizes = replay_clients(strategy_runs, tiny_store, record["clients_sampled"])
    keys = updates[0].keys()
    weighted = {k: sum(u[k] * (n / sizes.sum()) for u, n in zip(updates, sizes, strict=True)) for k in keys}
    mean = {k: sum(u[k] for u in updates) / len(updates) for k in keys}
    median = {k: torch.stack([u[k] for u in updates]).median(dim=0).values for k in keys}
    assert_same_weights(model_state(outs["fedavg"]), weighted, atol=1e-5)
    assert_same_weights(model_state(outs["fedavgm"]), weighted, atol=1e-5)
    assert_same_weights(model_state(outs["fedtrimmedavg"]), mean, atol=1e-5)
    assert_same_weights(model_state(outs["fedmedian"]), median, atol=1e-5)
    krum = model_state(outs["krum"])
    distances = [max((krum[k].double() - u[k]).abs().max().item() for k in keys) for u in updates]
    assert min(distances) <= 1e-5
    fedprox = model_state(outs["fedprox"])
    assert any((fedprox[k].double() - weighted[k]).abs().max() > 1e-6 for k in keys)


@pytest.mark.slow
def test_max_pooling_rounds_train_with_max_pooling_and_evaluate_with_the_models(strategy_runs: dict,
                                                                                  tiny_store: Path) -> None:
    """In a round within ``federated.max-pooling-rounds`` the clients train with max pooling (the FedAvg of
    max-pooled updates, not of the configured log-mean-exp ones); the saved model keeps ``model.pooling``, and the
    round's val mAP is that model's."""
    out = strategy_runs["outs"]["max-pooling"]
    (record,) = RunDir(out).records()
    assert record["clients_sampled"] == RunDir(strategy_runs["outs"]["fedavg"]).records()[0]["clients_sampled"]
    updates, sizes = replay_clients(strategy_runs, tiny_store, record["clients_sampled"], pooling="max")
    weighted = {k: sum(u[k] * (n / sizes.sum()) for u, n in zip(updates, sizes, strict=True)) for k in updates[0]}
    assert_same_weights(model_state(out), weighted, atol=1e-5)
    fedavg = model_state(strategy_runs["outs"]["fedavg"])
    assert any((fedavg[k].double() - weighted[k]).abs().max() > 1e-6 for k in weighted)
    model = load_model(out / "model.pt")[0]
    assert model.config.pooling == "lse"
    assert record["mAP"] == pytest.approx(evaluate(model, FeatureStore(tiny_store), "val", torch.device("cpu"))["mAP"])


# --- partitions, update checks, sampling, run config -------------------------------------------------------


def test_partition_by_uploader_honours_min_clips(tiny_store: Path, tmp_path: Path, capsys) -> None:
    counts = FeatureStore(tiny_store).table("train").clips.groupby("uploader").size()
    min_clips = int(counts.median()) + 1
    out = tmp_path / "plan.json"
    assert cli_main(["data", "partition", str(tiny_store), "--min-clips", str(min_clips), "--out", str(out),
                     "--workdir", str(tmp_path), "-q"]) == 0
    assert f"min_clips={min_clips}" in capsys.readouterr().out
    plan = PartitionPlan.load(out)
    kept = counts[counts >= min_clips]
    assert 0 < len(kept) < len(counts)
    assert sorted(plan.names) == sorted(kept.index)
    uploaders = FeatureStore(tiny_store).table("train").clips["uploader"].to_numpy()
    for name, clips in zip(plan.names, plan.clients, strict=True):
        assert len(clips) == kept[name] >= min_clips
        assert set(uploaders[clips]) == {name}
    assert [len(c) for c in plan.clients] == sorted((len(c) for c in plan.clients), reverse=True)


def global_arrays() -> dict[str, np.ndarray]:
    return {"w": np.ones((3, 2), dtype=np.float32), "b": np.zeros(2, dtype=np.float32),
            "steps": np.array(5, dtype=np.int64)}


def test_update_problem_accepts_a_close_update() -> None:
    update = global_arrays()
    update["w"] = update["w"] + 0.1
    assert update_problem(global_arrays(), update, max_norm=1.0) is None
    assert update_problem(global_arrays(), global_arrays(), max_norm=1e-9) is None


@pytest.mark.parametrize(("change", "reason"), [
    (lambda u: u.pop("b"), "wrong keys (missing ['b']"),
    (lambda u: u.update(extra=np.zeros(1, np.float32)), "unexpected ['extra']"),
    (lambda u: u.update(w=np.ones((2, 3), np.float32)), "wrong shape for w"),
    (lambda u: u["b"].__setitem__(0, np.nan), "non-finite values in b"),
    (lambda u: u["w"].__setitem__((1, 1), -np.inf), "non-finite values in w"),
    (lambda u: u.update(w=u["w"] + 10.0), "exceeds max-update-norm"),
])
def test_update_problem_names_the_reason(change, reason: str) -> None:
    update = global_arrays()
    change(update)
    problem = update_problem(global_arrays(), update, max_norm=1.0)
    assert problem is not None and reason in problem


def test_update_norm_is_the_distance_to_the_global_model() -> None:
    update = global_arrays()
    update["w"] = update["w"] + 0.5  # 6 entries: distance sqrt(6 * 0.25) = 1.2247
    assert update_problem(global_arrays(), update, max_norm=1.23) is None
    assert "1.22" in update_problem(global_arrays(), update, max_norm=1.2)


def test_round_config_pools_by_the_maximum_in_the_first_rounds_only(tiny_config: Config) -> None:
    config = apply_flat(tiny_config, {"federated.max-pooling-rounds": 2, "federated.rounds": 4}, "test")
    assert [round_config(config, r).model.pooling for r in (1, 2, 3, 4)] == ["max", "max", "lse", "lse"]
    assert replace(round_config(config, 1), model=config.model) == config  # nothing else changes
    assert round_config(replace(config, federated=replace(config.federated, max_pooling_rounds=0)), 1).model == \
        config.model


def test_sample_partitions_is_a_function_of_seed_and_round() -> None:
    draws = {(seed, r): sample_partitions(100, 0.1, 2, seed, r) for seed in (0, 1) for r in (1, 2, 3)}
    for (seed, r), sampled in draws.items():
        assert sampled == sample_partitions(100, 0.1, 2, seed, r)
        assert sampled == sorted(set(sampled)) and len(sampled) == 10
        assert all(0 <= p < 100 for p in sampled)
    assert len({tuple(s) for s in draws.values()}) == len(draws)


def test_sample_partitions_honours_min_clients_and_the_population() -> None:
    assert len(sample_partitions(100, 0.01, 5, 0, 1)) == 5
    assert sample_partitions(4, 0.5, 10, 0, 1) == [0, 1, 2, 3]
    assert len(sample_partitions(10, 0.35, 1, 0, 1)) == round(3.5)


def test_flwr_run_config_from_pyproject_builds_the_config(monkeypatch) -> None:
    monkeypatch.delenv(RUN_ENV, raising=False)
    run_config = get_fused_config_from_dir(REPO, {"federated.rounds": 7, "train.lr": 1})
    settings = settings_from_run_config(run_config)
    assert settings.config.federated.rounds == 7
    assert settings.config.train.lr == 1.0
    assert settings.config.federated.fraction == run_config["federated.fraction"]
    assert settings.config.model.channels == run_config["model.channels"]
    assert settings.config.partition.by == run_config["partition.by"]
    assert settings.store == Path(run_config["store"]) and settings.out == Path(run_config["out"])
    assert not settings.resume and settings.central is None


def test_flwr_run_config_errors_name_the_key(monkeypatch) -> None:
    monkeypatch.delenv(RUN_ENV, raising=False)
    with pytest.raises(ConfigError, match="federated.no-such-key: unknown key"):
        settings_from_run_config({"store": "s.h5", "federated.no-such-key": 1})
    with pytest.raises(ConfigError, match="federated.rounds: must be at least 1"):
        settings_from_run_config({"store": "s.h5", "federated.rounds": 0})
    with pytest.raises(ConfigError, match="'store'"):
        settings_from_run_config({"federated.rounds": 2})


def test_settings_file_wins_over_the_run_config(monkeypatch, tmp_path: Path, tiny_config: Config) -> None:
    settings = RunSettings(tiny_config, tmp_path / "store.h5", tmp_path / "run", resume=True)
    monkeypatch.setenv(RUN_ENV, str(settings.save()))
    loaded = settings_from_run_config({"store": "ignored.h5", "federated.rounds": 9})
    assert loaded.config == tiny_config
    assert (loaded.store, loaded.out, loaded.resume) == (settings.store, settings.out, True)
