"""Flower ServerApp: seeded sampling, checked updates, optional central DP, global evaluation, resumable rounds.

Two federations share the round loop (:mod:`fl.federation`):

* ``store`` (simulations): each node holds a partition of one feature store; the server asks every node which
  partition it holds, samples partitions from ``(seed, round)`` and evaluates on the store's val split.
* ``profiles`` (real laptops that joined with ``fedsound join``): each node trains on its owner's profile. The
  server starts from the ``initial`` model file, waits until ``min-clients`` nodes are connected, samples
  ``max(min-clients, round(fraction x connected))`` of the connected nodes each round (exactly ``min-clients``
  with DP, whose noise is calibrated to a fixed count) and evaluates on ``store`` when one is given.

A node that fails, crashes or is not back within ``round-timeout-s`` costs its round that update (logged, counted
in ``clients_failed``), not the run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from fl.config import Config, frontend_from_dict, to_dict
from fl.errors import DataError
from fl.federation import CONFIG_KEY, RunSettings, open_store, settings_from_run_config, update_problem
from fl.locks import exclusive
from fl.model_io import load_model, save_model
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
    sample_nodes,
    sample_partitions,
    sample_size,
    strategy_state,
)

app = ServerApp()
log = logging.getLogger("fedsound.server")
NODE_POLL_S = 0.2
METRICS = ("mAP", "dprime", "lwlrap", "micro_pr_auc")


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the configured number of rounds (continuing a checkpoint when asked)."""
    run_federated(grid, settings_from_run_config(context.run_config))


def evaluate_global(model: torch.nn.Module, store: FeatureStore, config: Config) -> dict:
    """Clip-level metrics of the global model on the val split (same as ``fedsound evaluate``)."""
    return evaluate(model, store, "val", pick_device(config.train.device))


def map_partitions(grid: Grid, n_partitions: int, wait_s: float) -> dict[int, int]:
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
        for reply in grid.send_and_receive(messages, timeout=wait_s):
            if reply.has_error():
                log.warning("node %d did not say which partition it holds: %s", reply.metadata.src_node_id,
                            reply.error.reason.splitlines()[0] if reply.error.reason else "?")
            else:
                mapping[int(reply.content["metrics"]["partition-id"])] = reply.metadata.src_node_id
    return mapping


class PlanPartitions:
    """Simulations: the partitions of the run's plan, each held by one node; a round samples partitions."""

    def __init__(self, grid: Grid, plan: PartitionPlan, config: Config) -> None:
        fed = config.federated
        self.population = plan.n_clients
        self.n_sampled = sample_size(plan.n_clients, fed.fraction, fed.min_clients)
        self.config = config
        self.nodes = map_partitions(grid, plan.n_clients, fed.node_wait_s)
        missing = [p for p in range(plan.n_clients) if p not in self.nodes]
        if missing:
            raise RuntimeError(f"{len(missing)} partition(s) have no node (e.g. {missing[:5]}); "
                               "run one supernode per partition")

    def pick(self, server_round: int) -> list[tuple[int, int]]:
        """(partition, node) of each client trained this round."""
        fed = self.config.federated
        return [(p, self.nodes[p]) for p in sample_partitions(self.population, fed.fraction, fed.min_clients,
                                                              self.config.seed, server_round)]


class ConnectedNodes:
    """Real laptops: the nodes connected at the start of each round; a round samples among them by node id."""

    def __init__(self, grid: Grid, config: Config) -> None:
        self.grid, self.config = grid, config
        self.n_sampled = config.federated.min_clients
        self.population = self.n_sampled  # the DP ledger's population (no amplification: it only bounds samples)

    def pick(self, server_round: int) -> list[tuple[int, int]]:
        """(node, node) of each client trained this round, after waiting for ``min-clients`` connected nodes."""
        fed = self.config.federated
        deadline = time.monotonic() + fed.node_wait_s
        while len(connected := sorted(self.grid.get_node_ids())) < fed.min_clients:
            if time.monotonic() > deadline:
                raise DataError(f"round {server_round}: {len(connected)} node(s) connected after "
                                f"{fed.node_wait_s:g} s, federated.min-clients is {fed.min_clients}")
            time.sleep(NODE_POLL_S)
        k = fed.min_clients if fed.dp != "off" else sample_size(len(connected), fed.fraction, fed.min_clients)
        return [(node, node) for node in sample_nodes(connected, k, self.config.seed, server_round)]


def run_federated(grid: Grid, settings: RunSettings) -> None:
    """The round loop: sample -> train on clients -> check updates -> aggregate -> evaluate -> checkpoint. The run
    directory is locked meanwhile (shared with ``fedsound simulate``, which holds it in the same process)."""
    with exclusive(settings.out, "run directory"):
        _run_federated(grid, settings)


def _start(grid: Grid, settings: RunSettings) -> tuple[Config, Any, torch.nn.Module, FeatureStore | None, dict,
                                                       dict]:
    """The run's config, node sampler, initial model, evaluation store, saved-model extras and the train config
    sent with every message."""
    config = settings.config
    if settings.federation == "profiles":
        model, extra = load_model(settings.initial)
        missing = [key for key in ("labels", "frontend") if key not in extra]
        if missing:
            raise DataError(f"{settings.initial}: model file lacks {', '.join(missing)}")
        config = dataclasses.replace(config, model=model.config,
                                     frontend=frontend_from_dict(extra["frontend"], str(settings.initial)))
        store = open_store(str(settings.store)) if settings.store else None
        if store is not None and list(store.labels) != list(extra["labels"]):
            raise DataError(f"{settings.store}: its vocabulary is not the initial model's labels")
        train_config = {CONFIG_KEY: json.dumps(to_dict(config)), "labels": json.dumps(list(extra["labels"]))}
        return config, ConnectedNodes(grid, config), model, store, extra, train_config
    if not settings.plan.exists():
        build_partition(settings.store, config, settings.plan)
    store = open_store(str(settings.store))
    plan = PartitionPlan.load(settings.plan)
    train_config = {CONFIG_KEY: json.dumps(to_dict(config)), "store": str(settings.store), "plan": str(settings.plan)}
    return (config, PlanPartitions(grid, plan, config), new_model(config, store), store, model_extra(store),
            train_config)


def _run_federated(grid: Grid, settings: RunSettings) -> None:
    config, nodes, model, store, extra, train_config = _start(grid, settings)
    run = RunDir(settings.out)
    if not (run.path / "config.json").exists():  # `flwr run .` path: nothing prepared the run directory
        run.start(config, settings.resume)
    fed = config.federated
    strategy = build_strategy(config, nodes.n_sampled)
    ledger = PrivacyLedger(fed, nodes.population, nodes.n_sampled) if fed.dp != "off" else None
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
    for server_round in range(start, fed.rounds + 1):
        started = time.perf_counter()
        picked = nodes.pick(server_round)
        sampled = [label for label, _ in picked]
        label_of = {node: label for label, node in picked}
        messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(dict(train_config)),
                                                 SampledGrid(grid, [node for _, node in picked])))
        replies = list(grid.send_and_receive(messages, timeout=fed.round_timeout_s))
        # a reply's node is the one its message went to (the SuperLink answers for a node that is gone)
        sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        node_of = {id(r): sent_to.get(r.metadata.reply_to_message_id, r.metadata.src_node_id) for r in replies}
        reference = {k: np.asarray(v) for k, v in arrays.to_torch_state_dict().items()}
        good, rejected, train_seconds = [], [], 0.0
        late = [label for label, node in picked if node not in node_of.values()]
        if late:
            log.warning("round %d: no update from %s within %g s (late, or the node is gone)", server_round, late,
                        fed.round_timeout_s)
        failed = len(late)
        for reply in replies:
            source = label_of.get(node_of[id(reply)], node_of[id(reply)])
            if reply.has_error():
                failed += 1
                log.warning("round %d: client %s failed: %s", server_round, source,
                            reply.error.reason.splitlines()[0] if reply.error.reason else "?")
                continue
            train_seconds += float(reply.content["metrics"].get("train_seconds", 0.0))
            update = {k: np.asarray(v) for k, v in reply.content["arrays"].to_torch_state_dict().items()}
            problem = update_problem(reference, update, fed.max_update_norm)
            if problem:
                rejected.append(source)
                log.warning("round %d: rejected update of client %s: %s", server_round, source, problem)
            else:
                good.append((source, reply))
        good.sort(key=lambda item: item[0])  # fixed aggregation order -> identical weights for one seed
        if ledger is not None and len(good) < len(sampled):
            log.warning("round %d: %d of %d sampled updates arrived; a DP average needs them all, so the round "
                        "is not aggregated", server_round, len(good), len(sampled))
            good = []
        norm_used = getattr(strategy, "clipping_norm", None)  # a DP wrapper's, before an adaptive one moves it
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
        metrics = evaluate_global(model, store, config) if store is not None else dict.fromkeys(METRICS)
        eval_seconds = time.perf_counter() - evaluated
        record = {"round": server_round, **{k: metrics[k] for k in METRICS},
                  "train_loss": float(train_metrics["train_loss"]) if train_metrics else None,
                  "clients_sampled": sampled, "clients_rejected": rejected, "clients_failed": failed,
                  "train_seconds": train_seconds, "eval_seconds": eval_seconds,
                  "seconds": time.perf_counter() - started}
        if ledger is not None:
            record.update(epsilon=ledger.epsilon(), delta=ledger.delta, dp_releases=ledger.releases,
                          dp_clipping_norm=float(norm_used))
        run.append(record)
        run.save_checkpoint({"model": model.state_dict(), "round": server_round, "seed": config.seed,
                             "strategy": strategy_state(strategy),
                             "dp_releases": ledger.releases if ledger is not None else 0})
        log.info("round %d: %s, %d clients (%d rejected, %d failed)%s", server_round,
                 "no evaluation store" if metrics["mAP"] is None else f"val mAP {metrics['mAP']:.4f}",
                 len(sampled), len(rejected), failed,
                 f", epsilon {record['epsilon']:.3g} at delta {ledger.delta:g}" if ledger is not None else "")
    save_model(run.model_path, model, extra=extra)
    baseline = RunDir(settings.central).records() if settings.central else None
    plot_curves(run.records(), run.plot_path, "round",
                f"{fed.strategy} C={fed.fraction} E={fed.local_epochs}", baseline=baseline)
