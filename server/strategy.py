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
from fl.federation import UNIFORM_WEIGHT_KEY
from server.privacy import wrap_for_privacy

# Attributes in which Flower's strategies keep state across rounds (server optimiser moments, momentum).
STATE_ATTRIBUTES = ("m_t", "v_t", "momentum_vector", "current_arrays")


def build_strategy(config: Config, n_sampled: int) -> Strategy:
    """The configured Flower strategy, inside the DP wrapper ``federated.dp`` names (:mod:`server.privacy`;
    its average then weighs clients alike). Sampling is done by :func:`sample_partitions` (``n_sampled``
    partitions a round), so the strategy is told to take every node it is offered."""
    fed = config.federated
    common: dict[str, Any] = {"fraction_train": 1.0, "fraction_evaluate": 0.0, "min_train_nodes": 1,
                              "min_evaluate_nodes": 0, "min_available_nodes": 1}
    if fed.dp != "off":
        common["weighted_by_key"] = UNIFORM_WEIGHT_KEY
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
    return wrap_for_privacy(factories[fed.strategy](), fed, n_sampled)


def sample_size(n_partitions: int, fraction: float, min_clients: int) -> int:
    """Partitions trained per round: ``max(min_clients, round(fraction * n))``, at most ``n``."""
    return min(n_partitions, max(min_clients, round(fraction * n_partitions)))


def sample_partitions(n_partitions: int, fraction: float, min_clients: int, seed: int, server_round: int) -> list[int]:
    """The partitions trained in a round (:func:`sample_size` of them), drawn from ``(seed, round)`` alone, so
    the same seed samples the same partitions whatever node ids Flower assigns and a resumed run samples
    exactly as an uninterrupted one."""
    k = sample_size(n_partitions, fraction, min_clients)
    rng = np.random.default_rng([seed, server_round])
    return sorted(int(p) for p in rng.choice(n_partitions, size=k, replace=False))


def sample_nodes(node_ids: Iterable[int], k: int, seed: int, server_round: int) -> list[int]:
    """``k`` of the given (connected) nodes, drawn from ``(seed, round)`` over their sorted ids."""
    ids = sorted(node_ids)
    rng = np.random.default_rng([seed, server_round])
    return [ids[i] for i in sorted(rng.choice(len(ids), size=min(k, len(ids)), replace=False))]


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
    """Tensors of the strategy's cross-round state (inside a DP wrapper: the wrapped strategy's, and an adaptive
    wrapper's clipping norm), for a checkpoint loadable with ``weights_only``."""
    inner = getattr(strategy, "strategy", strategy)
    state = {name: _to_plain(getattr(inner, name)) for name in STATE_ATTRIBUTES
             if getattr(inner, name, None) is not None}
    if inner is not strategy and hasattr(strategy, "clipping_norm"):
        state["dp_clipping_norm"] = float(strategy.clipping_norm)
    return state


def restore_strategy_state(strategy: Strategy, state: dict[str, Any]) -> None:
    """Put state saved by :func:`strategy_state` back into a freshly built strategy."""
    inner = getattr(strategy, "strategy", strategy)
    for name, value in state.items():
        current = getattr(inner, name, None)
        if name == "dp_clipping_norm":
            strategy.clipping_norm = float(value)
        elif name == "current_arrays" and isinstance(inner, FedAvgM):
            setattr(inner, name, ArrayRecord(value))
        elif isinstance(value, dict):
            setattr(inner, name, {k: v.numpy() for k, v in value.items()})
        elif isinstance(value, list):
            setattr(inner, name, [v.numpy() for v in value])
        elif current is None:
            setattr(inner, name, value)
