"""Detector bundles: export from a model file and a store, verified load, tampering and version refusal."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from clients.detector.bundle import MAX_BACKGROUND_BYTES, ExtraBackground, export_bundle, load_bundle
from clients.detector.manifest import BACKGROUND, BACKGROUND_LABELS, MANIFEST, WEIGHTS, BundleError, resolve_bundle
from fl.config import Config, DetectorConfig, to_dict
from fl.errors import ConfigError, FedsoundError
from fl.model_io import save_model
from fl.models import ModelConfig, build_model
from fl.store import FeatureStore

SETTINGS = DetectorConfig(on_threshold=0.6, off_threshold=0.4, min_duration_ms=20, refractory_ms=150)


def model_file(path: Path, store: FeatureStore, config: ModelConfig, extra: dict | None = None) -> Path:
    torch.manual_seed(0)
    model = build_model(config, store.frontend.n_mels, store.n_classes)
    save_model(path, model, extra if extra is not None else {
        "labels": store.labels, "mids": store.mids, "frontend": to_dict(store.frontend)})
    return path


@pytest.fixture(scope="module")
def exported(tiny_store, tmp_path_factory):
    root = tmp_path_factory.mktemp("bundle")
    store = FeatureStore(tiny_store)
    path = model_file(root / "model.pt", store, ModelConfig(channels=16))
    config = Config(seed=3, detector=SETTINGS)
    bundle = export_bundle(path, root / "bundle", config, store=tiny_store, background_patches=40,
                           exclude_labels=[store.labels[0]])
    return store, path, bundle


def copy_of(bundle: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(bundle, target)
    return target


def test_round_trip_keeps_weights_frontend_labels_settings_and_receptive_field(exported):
    store, model_path, path = exported
    bundle = load_bundle(path)
    original = torch.load(model_path, weights_only=True)["state_dict"]
    for name, tensor in bundle.model.state_dict().items():
        torch.testing.assert_close(tensor, original[name], rtol=0, atol=0)
    assert bundle.frontend_config == store.frontend
    assert bundle.labels == store.labels and bundle.mids == store.mids
    assert bundle.detector == SETTINGS
    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest["receptive_field"]["frames"] == bundle.model.receptive_field == 29
    assert manifest["latency_ms"]["algorithmic"] == pytest.approx(1000 * (330 + 220) / 22050)
    assert set(manifest["files"]) == {WEIGHTS, BACKGROUND, BACKGROUND_LABELS}


def test_files_are_plain_tensors_and_arrays_never_pickles(exported):
    _, _, path = exported
    state = torch.load(path / WEIGHTS, weights_only=True)
    assert isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())
    assert np.load(path / BACKGROUND, allow_pickle=False).dtype == np.float16
    assert np.load(path / BACKGROUND_LABELS, allow_pickle=False).dtype == np.uint8


def test_background_is_a_small_seeded_sample_of_train_patches_without_excluded_labels(exported, tmp_path):
    store, model_path, path = exported
    patches, labels = load_bundle(path).background()
    assert patches.shape == (40, store.frontend.patch_frames, store.frontend.n_mels)
    assert labels.shape == (40, store.n_classes) and not labels[:, 0].any()
    assert (path / BACKGROUND).stat().st_size <= MAX_BACKGROUND_BYTES
    # every background patch is a real train patch of the store
    all_train = store.read_patches("train", store.patch_index("train")).astype(np.float16)
    flat = {p.tobytes() for p in all_train}
    assert all(p.astype(np.float16).tobytes() in flat for p in patches)
    again = export_bundle(model_path, tmp_path / "again", Config(seed=3, detector=SETTINGS), store=store.path,
                          background_patches=40, exclude_labels=[store.labels[0]])
    np.testing.assert_array_equal(load_bundle(again).background()[0], patches)


def test_extra_background_follows_the_store_sample_with_its_label_and_provenance(exported, tmp_path):
    store, model_path, path = exported
    config = Config(seed=3, detector=SETTINGS)
    shape = (store.frontend.patch_frames, store.frontend.n_mels)
    extra = ExtraBackground(np.random.default_rng(0).normal(size=(5, *shape)).astype(np.float32), store.labels[2],
                            {"from": "recordings"})
    bundle = load_bundle(export_bundle(model_path, tmp_path / "extra", config, store=store.path,
                                       background_patches=40, exclude_labels=[store.labels[0]],
                                       extra_background=extra))
    patches, labels = bundle.background()
    sampled, sampled_labels = load_bundle(path).background()
    np.testing.assert_array_equal(patches[:40], sampled)
    np.testing.assert_array_equal(patches[40:], extra.patches.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(labels[:40], sampled_labels)
    assert labels[40:].sum(axis=1).tolist() == [1] * 5 and labels[40:, 2].all()
    assert bundle.manifest["provenance"]["extra_background"] == {"from": "recordings"}
    # without a store, the extra patches are the whole background
    alone = load_bundle(export_bundle(model_path, tmp_path / "alone", config, extra_background=extra))
    assert alone.background()[0].shape == (5, *shape)
    bad = [(ExtraBackground(extra.patches[:, :-1], store.labels[2], {}), "do not match the frontend's"),
           (ExtraBackground(extra.patches, "no such label", {}), "'no such label' is not in the vocabulary"),
           (ExtraBackground(np.zeros((MAX_BACKGROUND_BYTES // (2 * shape[0] * shape[1]) + 1, *shape), np.float32),
                            store.labels[2], {}), "exceed the bundle's 4 MiB of background")]
    for wrong, message in bad:
        with pytest.raises(BundleError, match=message):
            export_bundle(model_path, tmp_path / "wrong", config, extra_background=wrong)
        assert not (tmp_path / "wrong").exists()


@pytest.mark.parametrize("name", [WEIGHTS, BACKGROUND])
def test_a_file_with_one_byte_changed_is_refused(exported, tmp_path, name):
    path = copy_of(exported[2], tmp_path)
    data = bytearray((path / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (path / name).write_bytes(bytes(data))
    with pytest.raises(BundleError, match=f"{name}: checksum mismatch"):
        load_bundle(path)


def test_an_edited_manifest_is_refused(exported, tmp_path):
    path = copy_of(exported[2], tmp_path)
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["detector"]["on-threshold"] = 0.1
    (path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="manifest was modified"):
        load_bundle(path)
    (path / MANIFEST).write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(path)


def test_another_format_version_is_refused_with_a_clear_error(exported, tmp_path):
    path = copy_of(exported[2], tmp_path)
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["version"] = 2
    (path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="format version 2 is not supported") as info:
        load_bundle(path)
    assert isinstance(info.value, FedsoundError) and "\n" not in str(info.value)


def test_only_tcn_models_with_frontend_and_labels_can_be_exported(exported, tmp_path):
    store = exported[0]
    vgg = model_file(tmp_path / "vgg.pt", store, ModelConfig(name="vgg"))
    with pytest.raises(BundleError, match="no streaming step"):
        export_bundle(vgg, tmp_path / "b", Config())
    bare = model_file(tmp_path / "bare.pt", store, ModelConfig(channels=8), extra={"labels": store.labels})
    with pytest.raises(BundleError, match="lacks mids, frontend"):
        export_bundle(bare, tmp_path / "b", Config())
    with pytest.raises(ConfigError, match="unknown label 'nope'"):
        bad = DetectorConfig(class_thresholds={"nope": [0.6, 0.4]})
        export_bundle(exported[1], tmp_path / "b", Config(detector=bad))
    assert not (tmp_path / "b").exists()


def test_export_replaces_a_bundle_but_not_other_data(exported, tmp_path):
    _, model_path, _ = exported
    target = export_bundle(model_path, tmp_path / "bundle", Config())
    assert load_bundle(target).manifest["background"] is None and load_bundle(target).background() is None
    export_bundle(model_path, target, Config(detector=SETTINGS))
    assert load_bundle(target).detector == SETTINGS
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary leftovers
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(BundleError, match="not a detector bundle; refusing"):
        export_bundle(model_path, other, Config())
    assert (other / "keep.txt").read_text() == "mine"


def test_profile_directories_resolve_to_their_personal_bundle(exported, tmp_path):
    profile = tmp_path / "profile"
    shutil.copytree(exported[2], profile / "personal")
    assert resolve_bundle(profile) == profile / "personal"
    assert load_bundle(profile).labels == exported[0].labels
    with pytest.raises(BundleError, match="no detector bundle here"):
        load_bundle(tmp_path / "empty")


def test_cli_export_carries_the_asked_number_of_background_patches_without_excluded_labels(exported, tmp_path):
    from fedsound.cli import main

    store, model_path, _ = exported
    out = tmp_path / "cli-bundle"
    code = main(["export", str(model_path), str(out), "--store", str(store.path), "--background-patches", "12",
                 "--exclude-labels", store.labels[0], store.labels[1], "--workdir", str(tmp_path), "-q"])
    assert code == 0
    _, labels = load_bundle(out).background()
    assert labels.shape == (12, store.n_classes) and not labels[:, :2].any()
