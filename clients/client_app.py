"""Flower ClientApp: local training on one partition (one Freesound uploader) of the feature store.

The node's partition comes from its node config (``partition-id``, set by the Simulation Engine or by
``flower-supernode --node-config``); its clips from the run's partition plan; the settings (epochs, batch
size, learning rate, optimizer, FedProx mu) from the server's train message. In a run with client-side DP
clipping the update is clipped here, before it leaves the node (:func:`clip_when_asked`).
"""

from __future__ import annotations

import json
import time

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from fl.config import Config, apply
from fl.federation import CONFIG_KEY, UNIFORM_WEIGHT_KEY, open_store
from fl.models import build_model
from fl.partition import PartitionPlan
from fl.runtime import pick_device
from fl.train import train_epochs


def clip_when_asked(msg: Message, context: Context, call_next) -> Message:
    """Flower's ``fixedclipping_mod`` on the train messages of a run with client-side DP clipping (their config
    carries the clipping norm); other messages pass unchanged."""
    config = msg.content.config_records.get("config") if msg.metadata.message_type == MessageType.TRAIN else None
    if config is not None and KEY_CLIPPING_NORM in config:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


app = ClientApp(mods=[clip_when_asked])


def _setup(msg: Message, context: Context) -> tuple[Config, torch.nn.Module, int, np.ndarray, object]:
    """Config, model with the received weights, partition id, its clips and the store."""
    cfg = msg.content["config"]
    config = apply(Config(), json.loads(str(cfg[CONFIG_KEY])), "train message")
    store = open_store(str(context.node_config.get("store", cfg["store"])))
    partition = int(context.node_config["partition-id"])
    plan = PartitionPlan.load(str(cfg["plan"]))
    model = build_model(config.model, store.frontend.n_mels, store.n_classes)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    return config, model, partition, plan.clients[partition], store


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server which partition this node holds (so sampling is by partition, not by node id)."""
    record = MetricRecord({"partition-id": int(context.node_config["partition-id"])})
    return Message(content=RecordDict({"metrics": record}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global model on this node's clips for the configured local epochs."""
    torch.set_num_threads(max(1, int(context.node_config.get("num-threads", 1))))
    config, model, partition, clips, store = _setup(msg, context)
    cfg = msg.content["config"]
    server_round = int(cfg["server-round"])
    patches = store.patch_index("train", clips)
    started = time.perf_counter()
    loss = train_epochs(model, store, "train", patches, config.train, config.federated.local_epochs,
                        [config.seed, server_round, partition], pick_device(config.train.device),
                        proximal_mu=float(cfg.get("proximal-mu", 0.0)))
    model.cpu()
    metrics = MetricRecord({"train_loss": float(loss), "num-examples": len(patches), UNIFORM_WEIGHT_KEY: 1,
                            "partition-id": partition, "train_seconds": time.perf_counter() - started})
    return Message(content=RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}),
                   reply_to=msg)

