"""Flower ServerApp: seeded sampling by partition, checked updates, global evaluation, resumable rounds."""

from __future__ import annotations

import json
import logging
import time

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from fl.config import Config, to_dict
from fl.federation import CONFIG_KEY, RunSettings, open_store, settings_from_run_config, update_problem
from fl.locks import exclusive
from fl.model_io import save_model
from fl.partition import PartitionPlan, build_partition
from fl.rundir import RunDir, plot_curves
from fl.runtime import pick_device
from fl.store import FeatureStore
from fl.train import evaluate, model_extra, new_model
from server.privacy import PrivacyLedger
from server.strategy import (
    SampledGrid,
    build_strategy,
    restore_strategy_state,
    sample_partitions,
    sample_size,
    strategy_state,
)

app = ServerApp()
log = logging.getLogger("fedsound.server")
REPLY_TIMEOUT_S = 3600.0
NODE_WAIT_S = 600.0  # how long to wait for a node of every partition to appear
NODE_POLL_S = 0.2


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the configured number of rounds (continuing a checkpoint when asked)."""
    run_federated(grid, settings_from_run_config(context.run_config))


def evaluate_global(model: torch.nn.Module, store: FeatureStore, config: Config) -> dict:
    """Clip-level metrics of the global model on the val split (same as ``fedsound evaluate``)."""
    return evaluate(model, store, "val", pick_device(config.train.device))


def map_partitions(grid: Grid, n_partitions: int, wait_s: float = NODE_WAIT_S) -> dict[int, int]:
    """Ask the nodes which partition each holds: partition id -> node id.

    Nodes may still be registering when the ServerApp starts (the Simulation Engine registers its supernodes
    while the ServerApp thread is already running; real SuperNodes connect when they connect), so nodes that
    appear later are asked too, until every partition has a node or ``wait_s`` has passed.
    """
    mapping: dict[int, int] = {}
    asked: set[int] = set()
    deadline = time.monotonic() + wait_s
    while not set(range(n_partitions)) <= mapping.keys() and time.monotonic() < deadline:
        new = [n for n in grid.get_node_ids() if n not in asked]
        if not new:
            time.sleep(NODE_POLL_S)
            continue
        asked.update(new)
        messages = [Message(content=RecordDict(), message_type=MessageType.QUERY, dst_node_id=n) for n in new]
        for reply in grid.send_and_receive(messages, timeout=REPLY_TIMEOUT_S):
            if reply.has_error():
                log.warning("node %d did not say which partition it holds: %s", reply.metadata.src_node_id,
                            reply.error.reason.splitlines()[0] if reply.error.reason else "?")
            else:
                mapping[int(reply.content["metrics"]["partition-id"])] = reply.metadata.src_node_id
    return mapping


def run_federated(grid: Grid, settings: RunSettings) -> None:
    """The round loop: sample -> train on clients -> check updates -> aggregate -> evaluate -> checkpoint. The run
    directory is locked meanwhile (shared with ``fedsound simulate``, which holds it in the same process)."""
    with exclusive(settings.out, "run directory"):
        _run_federated(grid, settings)


def _run_federated(grid: Grid, settings: RunSettings) -> None:
    config, run = settings.config, RunDir(settings.out)
    if not (run.path / "config.json").exists():  # `flwr run .` path: nothing prepared the run directory
        run.start(config, settings.resume)
    if not settings.plan.exists():
        build_partition(settings.store, config, settings.plan)
    store = open_store(str(settings.store))
    plan = PartitionPlan.load(settings.plan)
    fed = config.federated
    n_sampled = sample_size(plan.n_clients, fed.fraction, fed.min_clients)
    strategy = build_strategy(config, n_sampled)
    ledger = PrivacyLedger(fed, plan.n_clients, n_sampled) if fed.dp != "off" else None
    model = new_model(config, store)
    start = 1
    if settings.resume:
        ckpt = run.load_checkpoint()
        run.restore(model, ckpt["model"])
        restore_strategy_state(strategy, ckpt["strategy"])
        if ledger is not None:
            ledger.release(int(ckpt.get("dp_releases", 0)))
        start = int(ckpt["round"]) + 1
        run.truncate(start - 1, "round")
        run.record_config(config)
        log.info("resuming %s at round %d", settings.out, start)
    arrays = ArrayRecord(model.state_dict())
    nodes = map_partitions(grid, plan.n_clients)
    partition_of = {node: partition for partition, node in nodes.items()}
    missing = [p for p in range(plan.n_clients) if p not in nodes]
    if missing:
        raise RuntimeError(f"{len(missing)} partition(s) have no node (e.g. {missing[:5]}); "
                           "run one supernode per partition")
    train_config = {CONFIG_KEY: json.dumps(to_dict(config)), "store": str(settings.store), "plan": str(settings.plan)}
    for server_round in range(start, config.federated.rounds + 1):
        started = time.perf_counter()
        sampled = sample_partitions(plan.n_clients, config.federated.fraction, config.federated.min_clients,
                                    config.seed, server_round)
        messages = strategy.configure_train(server_round, arrays, ConfigRecord(dict(train_config)),
                                            SampledGrid(grid, [nodes[p] for p in sampled]))
        replies = list(grid.send_and_receive(messages, timeout=REPLY_TIMEOUT_S))
        reference = {k: np.asarray(v) for k, v in arrays.to_torch_state_dict().items()}
        good, rejected, train_seconds = [], [], 0.0
        failed = len(sampled) - len(replies)  # no reply before the timeout counts as a failure
        for reply in replies:
            if reply.has_error():
                failed += 1
                log.warning("round %d: partition %s failed: %s", server_round,
                            partition_of.get(reply.metadata.src_node_id, "?"),
                            reply.error.reason.splitlines()[0] if reply.error.reason else "?")
                continue
            train_seconds += float(reply.content["metrics"].get("train_seconds", 0.0))
            update = {k: np.asarray(v) for k, v in reply.content["arrays"].to_torch_state_dict().items()}
            problem = update_problem(reference, update, config.federated.max_update_norm)
            partition = int(reply.content["metrics"]["partition-id"])
            if problem:
                rejected.append(partition)
                log.warning("round %d: rejected update of partition %d: %s", server_round, partition, problem)
            else:
                good.append((partition, reply))
        good.sort(key=lambda item: item[0])  # fixed aggregation order -> identical weights for one seed
        if ledger is not None and len(good) < len(sampled):
            log.warning("round %d: %d of %d sampled updates arrived; a DP average needs them all, so the round "
                        "is not aggregated", server_round, len(good), len(sampled))
            good = []
        new_arrays, train_metrics = (strategy.aggregate_train(server_round, [r for _, r in good]) if good
                                     else (None, None))
        if new_arrays is not None and ledger is not None:
            ledger.release()
        if new_arrays is not None:
            model.load_state_dict(new_arrays.to_torch_state_dict())
            # the global model in the model's own dtypes, exactly as a checkpoint holds it (strategies may
            # return float64), so that a resumed run continues from the same arrays
            arrays = ArrayRecord(model.state_dict())
        evaluated = time.perf_counter()
        metrics = evaluate_global(model, store, config)
        eval_seconds = time.perf_counter() - evaluated
        record = {"round": server_round, **{k: metrics[k] for k in ("mAP", "dprime", "lwlrap", "micro_pr_auc")},
                  "train_loss": float(train_metrics["train_loss"]) if train_metrics else None,
                  "clients_sampled": sampled, "clients_rejected": rejected, "clients_failed": failed,
                  "train_seconds": train_seconds, "eval_seconds": eval_seconds,
                  "seconds": time.perf_counter() - started}
        if ledger is not None:
            record.update(epsilon=ledger.epsilon(), delta=ledger.delta, dp_releases=ledger.releases,
                          dp_clipping_norm=float(strategy.clipping_norm))
        run.append(record)
        run.save_checkpoint({"model": model.state_dict(), "round": server_round, "seed": config.seed,
                             "strategy": strategy_state(strategy),
                             "dp_releases": ledger.releases if ledger is not None else 0})
        log.info("round %d: val mAP %.4f, %d clients (%d rejected, %d failed)%s", server_round, metrics["mAP"],
                 len(sampled), len(rejected), failed,
                 f", epsilon {record['epsilon']:.3g} at delta {ledger.delta:g}" if ledger is not None else "")
    save_model(run.model_path, model, extra=model_extra(store))
    baseline = RunDir(settings.central).records() if settings.central else None
    plot_curves(run.records(), run.plot_path, "round",
                f"{config.federated.strategy} C={config.federated.fraction} E={config.federated.local_epochs}",
                baseline=baseline)
