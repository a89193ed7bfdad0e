"""Flower strategies from our config, seeded sampling by partition, and strategy state for checkpoints."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    Strategy,
)

from fl.config import Config

# Attributes in which Flower's strategies keep state across rounds (server optimiser moments, momentum).
STATE_ATTRIBUTES = ("m_t", "v_t", "momentum_vector", "current_arrays")


def build_strategy(config: Config) -> Strategy:
    """The configured Flower strategy. Sampling is done by :func:`sample_partitions`, so the strategy is
    told to take every node it is offered."""
    fed = config.federated
    common: dict[str, Any] = {"fraction_train": 1.0, "fraction_evaluate": 0.0, "min_train_nodes": 1,
                              "min_evaluate_nodes": 0, "min_available_nodes": 1}
    adaptive = {"eta": fed.server_lr, "eta_l": config.train.lr, "beta_1": fed.beta_1, "beta_2": fed.beta_2,
                "tau": fed.tau}
    factories = {
        "fedavg": lambda: FedAvg(**common),
        "fedprox": lambda: FedProx(**common, proximal_mu=fed.proximal_mu),
        "fedadam": lambda: FedAdam(**common, **adaptive),
        "fedyogi": lambda: FedYogi(**common, **adaptive),
        "fedadagrad": lambda: FedAdagrad(**common, eta=fed.server_lr, eta_l=config.train.lr, tau=fed.tau),
        "fedavgm": lambda: FedAvgM(**common, server_momentum=fed.server_momentum),
        "fedmedian": lambda: FedMedian(**common),
        "fedtrimmedavg": lambda: FedTrimmedAvg(**common, beta=fed.trim_beta),
        "krum": lambda: Krum(**common, num_malicious_nodes=fed.num_malicious),
    }
    return factories[fed.strategy]()


def sample_partitions(n_partitions: int, fraction: float, min_clients: int, seed: int, server_round: int) -> list[int]:
    """The partitions trained in a round: ``max(min_clients, round(fraction * n))`` of them, drawn from
    ``(seed, round)`` alone, so the same seed samples the same partitions whatever node ids Flower assigns
    and a resumed run samples exactly as an uninterrupted one."""
    k = min(n_partitions, max(min_clients, round(fraction * n_partitions)))
    rng = np.random.default_rng([seed, server_round])
    return sorted(int(p) for p in rng.choice(n_partitions, size=k, replace=False))


class SampledGrid:
    """A view of a Grid that offers only the sampled nodes to the strategy's own configure step."""

    def __init__(self, grid: Grid, node_ids: Iterable[int]) -> None:
        self._grid = grid
        self._node_ids = list(node_ids)

    def get_node_ids(self) -> list[int]:
        """Only the nodes sampled for this round."""
        return list(self._node_ids)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def _to_plain(value: Any) -> Any:
    if isinstance(value, ArrayRecord):
        return {k: torch.from_numpy(np.array(v)) for k, v in value.to_torch_state_dict().items()}
    if isinstance(value, dict):
        return {k: torch.from_numpy(np.array(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [torch.from_numpy(np.array(v)) for v in value]
    return value


def strategy_state(strategy: Strategy) -> dict[str, Any]:
    """Tensors of the strategy's cross-round state, for a checkpoint loadable with ``weights_only``."""
    return {name: _to_plain(getattr(strategy, name)) for name in STATE_ATTRIBUTES
            if getattr(strategy, name, None) is not None}


def restore_strategy_state(strategy: Strategy, state: dict[str, Any]) -> None:
    """Put state saved by :func:`strategy_state` back into a freshly built strategy."""
    for name, value in state.items():
        current = getattr(strategy, name, None)
        if name == "current_arrays" and isinstance(strategy, FedAvgM):
            setattr(strategy, name, ArrayRecord(value))
        elif isinstance(value, dict):
            setattr(strategy, name, {k: v.numpy() for k, v in value.items()})
        elif isinstance(value, list):
            setattr(strategy, name, [v.numpy() for v in value])
        elif current is None:
            setattr(strategy, name, value)
