"""Local training and clip-level evaluation, shared by central training, Flower clients and the server.

Importable without Flower or Ray. Training order is a pure function of (seed, epoch), so a resumed run
shuffles and drops out exactly as an uninterrupted one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from fl.config import Config, TrainConfig, to_dict
from fl.errors import DataError
from fl.locks import exclusive
from fl.metrics import clip_metrics
from fl.model_io import load_model, save_model
from fl.models import build_model
from fl.rundir import RunDir, plot_curves
from fl.runtime import pick_device
from fl.store import FeatureStore, iter_batches, with_store_frontend

log = logging.getLogger("fedsound.train")


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """Adam (default, as fsd_fed) or SGD with momentum."""
    if config.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)


def train_epochs(
    model: nn.Module,
    store: FeatureStore,
    split: str,
    patches: np.ndarray,
    config: TrainConfig,
    epochs: int,
    seed: Sequence[int],
    device: torch.device,
    optimizer: torch.optim.Optimizer | None = None,
    proximal_mu: float = 0.0,
    progress: bool = False,
) -> float:
    """Train on the given patch rows of a store for ``epochs`` epochs; returns the mean BCE loss of the last epoch
    (:func:`train_batches`)."""
    n_batches = (len(patches) + config.batch_size - 1) // config.batch_size
    return train_batches(model, lambda rng: iter_batches(store, split, patches, config.batch_size, rng), n_batches,
                         config, epochs, seed, device, optimizer, proximal_mu, progress)


def train_batches(
    model: nn.Module,
    batches: Callable[[np.random.Generator], Iterable[tuple[torch.Tensor, torch.Tensor, Any]]],
    n_batches: int,
    config: TrainConfig,
    epochs: int,
    seed: Sequence[int],
    device: torch.device,
    optimizer: torch.optim.Optimizer | None = None,
    proximal_mu: float = 0.0,
    progress: bool = False,
) -> float:
    """Train on ``batches(rng)`` (patches ``[B, T, n_mels]``, multi-hot targets, anything) for ``epochs`` epochs, a
    fresh generator each epoch; returns the mean BCE loss of the last epoch.

    ``seed`` (e.g. ``[seed, round, client]``) fixes the shuffling and dropout. With ``proximal_mu > 0`` the
    FedProx term ``mu/2 * ||w - w_global||^2`` is added, ``w_global`` being the weights on entry.
    """
    model.to(device).train()
    optimizer = optimizer or make_optimizer(model, config)
    loss_fn = nn.BCEWithLogitsLoss()
    anchor = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else None
    mean_loss = float("nan")
    for epoch in range(epochs):
        rng = np.random.default_rng([*seed, epoch])
        torch.manual_seed(int(rng.integers(2**31)))
        total, count = 0.0, 0
        for x, y, _ in tqdm(batches(rng), total=n_batches, disable=not progress, leave=False, desc=f"epoch {epoch}"):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = loss_fn(model.clip_logits(x), y)
            objective = loss
            if anchor is not None:
                objective = loss + proximal_mu / 2 * sum(
                    (p - a).pow(2).sum() for p, a in zip(model.parameters(), anchor, strict=True))
            optimizer.zero_grad(set_to_none=True)
            objective.backward()
            optimizer.step()
            total += loss.item() * len(x)
            count += len(x)
        mean_loss = total / max(count, 1)
    return mean_loss


@torch.inference_mode()
def predict_clips(
    model: nn.Module, store: FeatureStore, split: str, device: torch.device, clip_indices: np.ndarray | None = None,
    batch_size: int = 256, progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Clip-level scores as fsd50k-pytorch: patch logits averaged over each clip, then sigmoid.

    Returns ``(y_true [n, C], y_score [n, C])`` for the given clips (default: all of the split).
    """
    model.to(device).eval()
    table = store.table(split)
    clips = np.arange(len(table.clips)) if clip_indices is None else np.asarray(clip_indices)
    patches = store.patch_index(split, clips)
    position = np.full(len(table.clips), -1, dtype=np.int64)
    position[clips] = np.arange(len(clips))
    sums = np.zeros((len(clips), store.n_classes), dtype=np.float64)
    n_batches = (len(patches) + batch_size - 1) // batch_size
    for x, _, clip in tqdm(iter_batches(store, split, patches, batch_size), total=n_batches,
                           disable=not progress, leave=False, desc=f"evaluate {split}"):
        logits = model.clip_logits(x.to(device)).float().cpu().numpy()
        np.add.at(sums, position[clip], logits)
    counts = table.clips["n_segs"].to_numpy()[clips][:, None]
    scores = 1.0 / (1.0 + np.exp(-sums / counts))
    return table.labels[clips].astype(np.int64), scores


def evaluate(model: nn.Module, store: FeatureStore, split: str, device: torch.device,
             clip_indices: np.ndarray | None = None, progress: bool = False) -> dict:
    """Clip-level metrics (mAP, d', lwlrap, micro PR-AUC, per-class AP) of ``model`` on ``split``."""
    y_true, y_score = predict_clips(model, store, split, device, clip_indices, progress=progress)
    return clip_metrics(y_true, y_score, labels=store.labels)


def evaluate_model_file(model_path: Path, store_path: Path, split: str, progress: bool = True) -> dict:
    """Load a saved model and evaluate it on a split of a store (checks that the two fit together)."""
    store = FeatureStore(store_path)
    model, _ = load_model(model_path)
    _check_fits(model, store, model_path)
    return evaluate(model, store, split, pick_device("auto"), progress=progress)


def _check_fits(model: nn.Module, store: FeatureStore, model_path: Path) -> None:
    if model.n_mels != store.frontend.n_mels or model.n_classes != store.n_classes:
        raise DataError(f"{model_path}: model expects {model.n_mels} bands / {model.n_classes} classes, "
                        f"store {store.path} has {store.frontend.n_mels} / {store.n_classes}")


def new_model(config: Config, store: FeatureStore) -> nn.Module:
    """A freshly initialised model for a store, seeded from the config's seed."""
    torch.manual_seed(config.seed)
    return build_model(config.model, store.frontend.n_mels, store.n_classes)


def model_extra(store: FeatureStore) -> dict:
    """What a saved model carries besides weights: label names, mids and the frontend configuration."""
    return {"labels": list(store.labels), "mids": list(store.mids), "frontend": to_dict(store.frontend)}


def train_central(store_path: Path, config: Config, out: Path, resume: bool = False, progress: bool = True,
                  allow_config_change: bool = False) -> dict:
    """Centralised baseline: Adam + BCE, val each epoch, early stopping on val mAP, checkpoint each epoch.

    The run directory is locked for the run (a second writer is refused), the store is verified against its
    checksums first, and a resume checks the checkpoint and the configuration (:meth:`RunDir.start`)."""
    with exclusive(Path(out), "run directory"):
        return _train_central(store_path, config, Path(out), resume, progress, allow_config_change)


def _train_central(store_path: Path, config: Config, out: Path, resume: bool, progress: bool,
                   allow_config_change: bool) -> dict:
    store = FeatureStore(store_path)
    config = with_store_frontend(config, store)
    store.verify(progress=progress)
    run = RunDir(out)
    run.start(config, resume, allow_config_change)
    device = pick_device(config.train.device)
    model = new_model(config, store).to(device)
    optimizer = make_optimizer(model, config.train)
    start_epoch, best_map, best_epoch, best_state = 1, -1.0, 0, None
    if resume:
        ckpt = run.load_checkpoint()
        run.restore(model, ckpt["model"])
        run.restore(optimizer, ckpt["optimizer"], "optimizer state")
        start_epoch = int(ckpt["epoch"]) + 1
        best_map, best_epoch, best_state = float(ckpt["best_map"]), int(ckpt["best_epoch"]), ckpt["best_model"]
        run.truncate(start_epoch - 1, "epoch")
        run.record_config(config)
        log.info("resuming %s at epoch %d", out, start_epoch)
    patches = store.patch_index("train")
    for epoch in range(start_epoch, config.train.epochs + 1):
        if config.train.patience and epoch - best_epoch > config.train.patience and best_epoch:
            log.info("early stopping: no val mAP gain for %d epochs", config.train.patience)
            break
        started = time.perf_counter()
        loss = train_epochs(model, store, "train", patches, config.train, 1, [config.seed, epoch], device,
                            optimizer, progress=progress)
        metrics = evaluate(model, store, "val", device)
        if metrics["mAP"] > best_map:
            best_map, best_epoch = metrics["mAP"], epoch
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        record = {"epoch": epoch, "train_loss": loss, **{k: metrics[k] for k in
                  ("mAP", "dprime", "lwlrap", "micro_pr_auc")}, "seconds": time.perf_counter() - started}
        run.append(record)
        run.save_checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                             "best_map": best_map, "best_epoch": best_epoch, "best_model": best_state})
        if progress:
            print(f"epoch {epoch}: loss {loss:.4f}  val mAP {metrics['mAP']:.4f}  d' {metrics['dprime']:.3f}")
    model.load_state_dict(best_state)
    save_model(run.model_path, model, extra={**model_extra(store), "best_epoch": best_epoch})
    plot_curves(run.records(), run.plot_path, "epoch", f"central {config.model.name} on {store.path.name}")
    return {"best_mAP": best_map, "best_epoch": best_epoch, "run": str(out)}
