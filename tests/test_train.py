"""Central training and clip-level evaluation on the tiny synthetic store."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fl.config import apply_flat
from fl.errors import DataError
from fl.model_io import ModelFileError, load_model, save_model
from fl.models import build_model
from fl.rundir import RunDir
from fl.store import FeatureStore
from fl.train import evaluate_model_file, new_model, predict_clips, train_central, train_epochs


def test_training_lowers_the_loss(tiny_store: Path, tiny_config) -> None:
    store = FeatureStore(tiny_store)
    model = new_model(tiny_config, store)
    patches = store.patch_index("train")
    cfg = apply_flat(tiny_config, {"train.lr": 3e-3}, "test").train
    first = train_epochs(model, store, "train", patches, cfg, 1, [0], torch.device("cpu"))
    later = train_epochs(model, store, "train", patches, cfg, 4, [1], torch.device("cpu"))
    assert later < first * 0.8


def test_clip_scores_average_patch_logits(tiny_store: Path, tiny_config) -> None:
    store = FeatureStore(tiny_store)
    model = new_model(tiny_config, store).eval()
    y_true, y_score = predict_clips(model, store, "val", torch.device("cpu"), batch_size=7)
    clip = int(np.argmax(store.table("val").clips["n_segs"].to_numpy()))
    with torch.no_grad():
        logits = model.clip_logits(torch.from_numpy(store.clip_patches("val", clip))).mean(0)
    np.testing.assert_allclose(y_score[clip], torch.sigmoid(logits).numpy(), rtol=1e-5, atol=1e-6)
    assert y_true.shape == y_score.shape == (len(store.table("val").clips), store.n_classes)


def test_run_directory_and_resume(tiny_store: Path, tiny_config, tmp_path: Path) -> None:
    config = apply_flat(tiny_config, {"train.epochs": 2, "train.patience": 0}, "test")
    full = train_central(tiny_store, config, tmp_path / "full", progress=False)
    run = RunDir(tmp_path / "full")
    records = run.records()
    assert [r["epoch"] for r in records] == [1, 2]
    assert {"train_loss", "mAP", "dprime", "lwlrap", "micro_pr_auc", "seconds"} <= set(records[0])
    assert json.loads((tmp_path / "full" / "config.json").read_text())["train"]["epochs"] == 2
    assert run.plot_path.exists() and run.model_path.exists()

    # A run killed after epoch 1 (with a stray record written after the checkpoint) resumes to the same result.
    one = apply_flat(config, {"train.epochs": 1}, "test")
    train_central(tiny_store, one, tmp_path / "cut", progress=False)
    cut = RunDir(tmp_path / "cut")
    cut.append({"epoch": 2, "mAP": 0.0})
    resumed = train_central(tiny_store, config, tmp_path / "cut", resume=True, progress=False)
    assert [r["epoch"] for r in cut.records()] == [1, 2]
    assert resumed["best_epoch"] == full["best_epoch"]
    a, _ = load_model(run.model_path)
    b, _ = load_model(cut.model_path)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=name)


def test_refuses_to_overwrite_a_run(tiny_store: Path, tiny_config, tmp_path: Path) -> None:
    train_central(tiny_store, tiny_config, tmp_path / "run", progress=False)
    with pytest.raises(DataError, match="already here"):
        train_central(tiny_store, tiny_config, tmp_path / "run", progress=False)
    with pytest.raises(DataError, match="nothing to resume"):
        train_central(tiny_store, tiny_config, tmp_path / "other", resume=True, progress=False)


def test_evaluate_model_file_errors(tiny_store: Path, tiny_config, tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a model at all")
    with pytest.raises(ModelFileError):
        evaluate_model_file(corrupt, tiny_store, "val", progress=False)
    store = FeatureStore(tiny_store)
    save_model(tmp_path / "ok.pt", new_model(tiny_config, store))
    metrics = evaluate_model_file(tmp_path / "ok.pt", tiny_store, "val", progress=False)
    assert 0 <= metrics["mAP"] <= 1 and len(metrics["per_class_ap"]) == store.n_classes
    wrong = build_model(tiny_config.model, store.frontend.n_mels, store.n_classes + 1)
    save_model(tmp_path / "wrong.pt", wrong)
    with pytest.raises(DataError, match="classes"):
        evaluate_model_file(tmp_path / "wrong.pt", tiny_store, "val", progress=False)
