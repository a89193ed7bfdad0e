"""Flower ClientApp: local training of the received global model on this node's own data.

In a simulation the node holds a partition (one Freesound uploader) of the feature store: its ``partition-id``
comes from its node config (set by the Simulation Engine or ``flower-supernode --node-config``), its clips from
the run's partition plan. On a laptop that joined a real federation (``fedsound join``) the node config names the
owner's ``profile``, which is trained on as patches made on the laptop (:mod:`clients.profile_training`; only
after the owner opted in); only weights leave it. The settings (epochs, batch size, learning rate, optimizer,
FedProx mu, the labels, the round's pooling) come from the server's train message. In a run with client-side DP
clipping the update is clipped here, before it leaves the node (:func:`clip_when_asked`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from clients.profile_training import patch_batches, profile_patches
from fl.config import Config, apply
from fl.federation import CONFIG_KEY, UNIFORM_WEIGHT_KEY, open_store, round_config
from fl.models import build_model
from fl.partition import PartitionPlan
from fl.runtime import pick_device
from fl.train import train_batches, train_epochs


def clip_when_asked(msg: Message, context: Context, call_next) -> Message:
    """Flower's ``fixedclipping_mod`` on the train messages of a run with client-side DP clipping (their config
    carries the clipping norm); other messages pass unchanged."""
    config = msg.content.config_records.get("config") if msg.metadata.message_type == MessageType.TRAIN else None
    if config is not None and KEY_CLIPPING_NORM in config:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


app = ClientApp(mods=[clip_when_asked])


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server which partition this node holds (so sampling is by partition, not by node id)."""
    record = MetricRecord({"partition-id": int(context.node_config["partition-id"])})
    return Message(content=RecordDict({"metrics": record}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global model for the configured local epochs on this node's data: its partition of the
    store in a simulation, its owner's profile on a laptop that joined (node config ``profile``)."""
    torch.set_num_threads(max(1, int(context.node_config.get("num-threads", 1))))
    cfg = msg.content["config"]
    server_round = int(cfg["server-round"])
    config = round_config(apply(Config(), json.loads(str(cfg[CONFIG_KEY])), "train message"), server_round)
    seed = [config.seed, server_round, int(context.node_id) % 2**31]
    started = time.perf_counter()
    if "profile" in context.node_config:
        labels = json.loads(str(cfg["labels"]))
        patches, targets = profile_patches(Path(str(context.node_config["profile"])), config.frontend, labels)
        model = build_model(config.model, config.frontend.n_mels, len(labels))
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        n_batches = (len(patches) + config.train.batch_size - 1) // config.train.batch_size
        loss = train_batches(model, lambda rng: patch_batches(patches, targets, config.train.batch_size, rng),
                             n_batches, config.train, config.federated.local_epochs, seed,
                             pick_device(config.train.device), proximal_mu=float(cfg.get("proximal-mu", 0.0)))
        examples, partition = len(patches), -1
    else:
        store = open_store(str(context.node_config.get("store", cfg["store"])))
        partition = int(context.node_config["partition-id"])
        clips = PartitionPlan.load(str(cfg["plan"])).clients[partition]
        model = build_model(config.model, store.frontend.n_mels, store.n_classes)
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        rows = store.patch_index("train", clips)
        seed[2] = partition  # the same shuffling whatever node holds the partition
        loss = train_epochs(model, store, "train", rows, config.train, config.federated.local_epochs, seed,
                            pick_device(config.train.device), proximal_mu=float(cfg.get("proximal-mu", 0.0)))
        examples = len(rows)
    model.cpu()
    metrics = MetricRecord({"train_loss": float(loss), "num-examples": examples, UNIFORM_WEIGHT_KEY: 1,
                            "partition-id": partition, "train_seconds": time.perf_counter() - started})
    return Message(content=RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}),
                   reply_to=msg)
