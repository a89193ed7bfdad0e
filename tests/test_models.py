"""Models (TCN, VGG-like), model files and the training benchmark."""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from benchmarks.train.bench import run_train_bench
from fl.config import model_from_dict
from fl.errors import FedsoundError
from fl.model_io import ModelFileError, load_model, save_model
from fl.models import TCN, ModelConfig, VGGLike, build_model, pool_frames

N_MELS = 12
N_CLASSES = 5
SMALL = ModelConfig(channels=16, dilations=(1, 2, 3), dropout=0.2)


def small_tcn(seed: int = 0, config: ModelConfig = SMALL) -> TCN:
    torch.manual_seed(seed)
    model = build_model(config, N_MELS, N_CLASSES)
    assert isinstance(model, TCN)
    return model.eval()


def randomize(model: nn.Module, seed: int) -> None:
    """Non-trivial weights everywhere (LayerNorm gains and biases included)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.5)


def frames(batch: int, length: int, seed: int = 1, n_mels: int = N_MELS) -> torch.Tensor:
    return torch.randn(batch, length, n_mels, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"name": "rnn"}, "name"),
        ({"channels": 0}, "channels"),
        ({"channels": 2.5}, "channels"),
        ({"kernel_size": 0}, "kernel-size"),
        ({"dilations": ()}, "dilations"),
        ({"dilations": (1, 0)}, "dilations"),
        ({"dropout": 1.0}, "dropout"),
        ({"pooling": "avg"}, "pooling"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"^{field}: "):
        ModelConfig(**kwargs)


def test_config_from_toml_style_dict() -> None:
    config = model_from_dict({"channels": 32, "kernel-size": 3, "dilations": [1, 2], "pooling": "max"})
    assert config == ModelConfig(channels=32, kernel_size=3, dilations=(1, 2), pooling="max")
    assert ModelConfig(dilations=[1, 4]).dilations == (1, 4)  # lists from TOML/JSON become tuples


def test_build_model_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="n-classes"):
        build_model(SMALL, N_MELS, 0)


# ---------------------------------------------------------------- TCN


def test_tcn_shapes() -> None:
    model = small_tcn()
    x = frames(3, 101)
    assert model(x).shape == (3, 101, N_CLASSES)
    assert model.clip_logits(x).shape == (3, N_CLASSES)
    assert model(frames(2, 1)).shape == (2, 1, N_CLASSES)
    assert (model.config, model.n_mels, model.n_classes) == (SMALL, N_MELS, N_CLASSES)


def test_default_receptive_field_is_close_to_lea_et_al() -> None:
    model = build_model(ModelConfig(), 96, 200)
    assert 24 <= model.receptive_field <= 32
    assert model.receptive_field == 1 + 4 + 4 * (1 + 2 + 3)


def test_causality_and_receptive_field() -> None:
    model = small_tcn()
    randomize(model, 3)
    x = frames(1, 80)
    t = 30
    changed = x.clone()
    changed[0, t] += 3.0
    with torch.no_grad():
        before, after = model(x), model(changed)
    assert torch.allclose(before[:, :t], after[:, :t], rtol=0, atol=1e-6)  # the past never sees the future
    assert not torch.allclose(before[:, t], after[:, t])
    rf = model.receptive_field
    assert not torch.allclose(before[:, t + rf - 1], after[:, t + rf - 1])  # last frame that sees t
    assert torch.allclose(before[:, t + rf :], after[:, t + rf :], rtol=0, atol=1e-6)


def assert_streaming_equals_offline(model: TCN, length: int, seed: int) -> None:
    x = frames(2, length, seed=seed)
    with torch.no_grad():
        offline = model(x)
    state = model.init_state(batch=2)
    outputs = []
    for t in range(length):
        logits, state = model.step(x[:, t], state)
        outputs.append(logits)
    streamed = torch.stack(outputs, dim=1)
    assert streamed.shape == offline.shape
    assert (streamed - offline).abs().max().item() < 1e-5


@pytest.mark.parametrize("length", [1, 7, 101, 300])
def test_streaming_step_equals_offline_forward(length: int) -> None:
    model = small_tcn()
    randomize(model, 5)
    assert_streaming_equals_offline(model, length, seed=length)


@pytest.mark.parametrize(
    "config",
    [ModelConfig(channels=8, kernel_size=3, dilations=(4, 1, 8)), ModelConfig(channels=8, kernel_size=1)],
)
def test_streaming_equals_offline_for_other_shapes(config: ModelConfig) -> None:
    model = small_tcn(config=config)
    randomize(model, 6)
    assert_streaming_equals_offline(model, 2 * model.receptive_field + 3, seed=2)


def test_streaming_state_must_come_from_init_state() -> None:
    model = small_tcn()
    with pytest.raises(ValueError, match="state"):
        model.step(frames(1, 1)[:, 0], [])


def test_clip_logits_pool_the_frame_logits() -> None:
    model = small_tcn()
    x = frames(2, 101)
    with torch.no_grad():
        per_frame = model(x)
        assert torch.allclose(model.clip_logits(x), pool_frames(per_frame, "lse"))
    logits = torch.randn(4, 30, 3)
    mean, top, lse = (pool_frames(logits, p) for p in ("mean", "max", "lse"))
    assert torch.all(mean <= lse + 1e-6) and torch.all(lse <= top + 1e-6)
    constant = torch.full((1, 30, 3), 0.7)
    for pooling in ("mean", "max", "lse"):
        assert torch.allclose(pool_frames(constant, pooling), torch.full((1, 3), 0.7))


def test_tcn_has_no_batch_statistics() -> None:
    model = build_model(ModelConfig(), 96, 200)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert not list(model.buffers())


# ---------------------------------------------------------------- VGG-like


def test_vgg_shapes_and_forward_equals_clip_logits() -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="vgg"), 96, 200).eval()
    assert isinstance(model, VGGLike)
    x = frames(2, 101, n_mels=96)
    with torch.no_grad():
        assert model.clip_logits(x).shape == (2, 200)
        assert torch.equal(model(x), model.clip_logits(x))
        assert build_model(ModelConfig(name="vgg"), 5, 3).eval()(frames(1, 3, n_mels=5)).shape == (1, 3)


def test_vgg_parameter_count() -> None:
    model = build_model(ModelConfig(name="vgg"), 96, 200)
    count = sum(p.numel() for p in model.parameters())
    convs = 9 * (1 * 32 + 32 * 32 + 32 * 64 + 64 * 64 + 64 * 128 + 128 * 128)
    batch_norms = 2 * 2 * (32 + 64 + 128)
    classifier = 128 * 200 + 200
    assert count == convs + batch_norms + classifier == 312_680
    # The paper reports about 0.27 M; the layer widths we could confirm give 16% more (see VGGLike).
    assert abs(count / 270_000 - 1) < 0.2


# ---------------------------------------------------------------- training


def separable_problem(n_mels: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes; a clip of class k has energy in band group k during a random stretch of frames."""
    generator = torch.Generator().manual_seed(7)
    n = 16
    x = torch.randn(n, length, n_mels, generator=generator) * 0.3
    y = torch.zeros(n, 2)
    half = n_mels // 2
    for i in range(n):
        k = i % 2
        start = int(torch.randint(0, length // 2, (1,), generator=generator))
        x[i, start : start + length // 2, k * half : (k + 1) * half] += 2.0
        y[i, k] = 1.0
    return x, y


@pytest.mark.parametrize(("name", "steps", "lr"), [("tcn", 30, 1e-2), ("vgg", 10, 3e-3)])
def test_short_training_lowers_the_loss(name: str, steps: int, lr: float) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name, channels=16, dilations=(1, 2)), 16, 2)
    x, y = separable_problem(16, 20)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.BCEWithLogitsLoss()
    model.train()
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = loss_fn(model.clip_logits(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        final = loss_fn(model.clip_logits(x), y).item()
    assert final < 0.25 * losses[0]


# ---------------------------------------------------------------- model files


def test_save_load_round_trip_tcn(tmp_path: Path) -> None:
    model = small_tcn()
    randomize(model, 9)
    extra = {"labels": ["pop", "click", "hiss", "tsk", "whistle"], "frontend": {"n-mels": N_MELS}}
    path = tmp_path / "m.pt"
    save_model(path, model, extra)
    loaded, loaded_extra = load_model(path, expect=SMALL)
    assert loaded_extra == extra
    assert isinstance(loaded, TCN) and not loaded.training
    assert loaded.config == SMALL and loaded.n_mels == N_MELS and loaded.n_classes == N_CLASSES
    x = frames(2, 50)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "fedsound-model" and raw["version"] == 1
    assert set(raw) == {"format", "version", "config", "n_mels", "n_classes", "state_dict", "extra"}
    assert not [p for p in tmp_path.iterdir() if p.name != "m.pt"]  # no temporary file left behind


def test_save_load_round_trip_vgg_keeps_batchnorm_statistics(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="vgg"), 16, 4)
    model.train()
    model.clip_logits(frames(4, 30, n_mels=16))  # moves the running statistics away from their defaults
    model.eval()
    save_model(tmp_path / "vgg.pt", model)
    loaded, extra = load_model(tmp_path / "vgg.pt", expect=ModelConfig(name="vgg"))
    assert extra == {}
    x = frames(3, 30, seed=4, n_mels=16)
    with torch.no_grad():
        assert torch.equal(loaded.clip_logits(x), model.clip_logits(x))


def test_dropout_is_not_part_of_the_architecture_check(tmp_path: Path) -> None:
    save_model(tmp_path / "m.pt", small_tcn())
    expect = ModelConfig(channels=16, dilations=(1, 2, 3), dropout=0.0)
    loaded, _ = load_model(tmp_path / "m.pt", expect=expect)
    assert loaded.config.dropout == SMALL.dropout


def _member_data_offset(path: Path, member_suffix: str) -> tuple[int, int]:
    """Offset and size of the stored bytes of the largest zip member whose name ends with the suffix."""
    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if i.filename.endswith(member_suffix)),
                   key=lambda i: i.file_size)
    with open(path, "rb") as fh:
        fh.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", fh.read(4))
    return info.header_offset + 30 + name_len + extra_len, info.compress_size


def test_corrupt_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    save_model(path, small_tcn())
    offset, size = _member_data_offset(path, "")  # the largest member: a weight tensor
    data = bytearray(path.read_bytes())
    data[offset + size // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match=r"not a fedsound model file: .*m\.pt \(corrupt"):
        load_model(path)


@pytest.mark.parametrize("keep", [0, 0.5, 0.99])
def test_truncated_file_is_rejected(tmp_path: Path, keep: float) -> None:
    path = tmp_path / "m.pt"
    save_model(path, small_tcn())
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ModelFileError, match=r"not a fedsound model file: .*m\.pt"):
        load_model(path)


def test_other_files_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="model file not found"):
        load_model(tmp_path / "missing.pt")
    text = tmp_path / "notes.txt"
    text.write_text("not a model\n")
    with pytest.raises(ModelFileError, match="not a fedsound model file"):
        load_model(text)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    with pytest.raises(ModelFileError, match="format tag"):
        load_model(other)
    newer = tmp_path / "newer.pt"
    save_model(newer, small_tcn())
    payload = torch.load(newer, weights_only=True)
    payload["version"] = 2
    torch.save(payload, newer)
    with pytest.raises(ModelFileError, match="unsupported fedsound model version 2"):
        load_model(newer)
    assert issubclass(ModelFileError, FedsoundError) and issubclass(ModelFileError, ValueError)


def test_architecture_mismatch_names_the_field(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    save_model(path, small_tcn())
    with pytest.raises(ModelFileError, match=r"architecture mismatch: model\.channels is 16 in the file, 64"):
        load_model(path, expect=ModelConfig(dilations=(1, 2, 3)))
    with pytest.raises(ModelFileError, match=r"model\.name is 'tcn' in the file, 'vgg' expected"):
        load_model(path, expect=ModelConfig(name="vgg"))
    with pytest.raises(ModelFileError, match=r"model\.dilations"):
        load_model(path, expect=ModelConfig(channels=16, dilations=(1, 2)))


def test_weights_that_do_not_fit_the_config_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    save_model(path, small_tcn())
    payload = torch.load(path, weights_only=True)
    payload["config"]["channels"] = 8  # the weights are still 16 channels wide
    torch.save(payload, path)
    with pytest.raises(ModelFileError, match=r"weight .* has shape .*16.*the model config needs .*8"):
        load_model(path)
    payload["config"]["channels"] = 16
    del payload["state_dict"]["head.weight"]
    torch.save(payload, path)
    with pytest.raises(ModelFileError, match=r"missing \['head.weight'\]"):
        load_model(path)
    payload["config"]["kernel-size"] = -1
    torch.save(payload, path)
    with pytest.raises(ModelFileError, match="kernel-size"):
        load_model(path)


def test_extra_with_numpy_scalars_is_stored_as_plain_types(tmp_path: Path) -> None:
    extra = {"labels": [np.str_("pop"), "click"], "best": np.float64(0.5), "epoch": np.int64(3),
             "flag": np.bool_(True), "shape": (1, 2), "mean": torch.ones(2)}
    save_model(tmp_path / "m.pt", small_tcn(), extra)
    _, loaded = load_model(tmp_path / "m.pt")
    assert loaded["labels"] == ["pop", "click"] and type(loaded["labels"][0]) is str
    assert type(loaded["best"]) is float and type(loaded["epoch"]) is int and loaded["flag"] is True
    assert loaded["shape"] == (1, 2) and torch.equal(loaded["mean"], torch.ones(2))


def test_failed_save_keeps_the_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    model = small_tcn()
    save_model(path, model, {"round": 3})
    with pytest.raises(ModelFileError, match=r"extra\['bad'\]: type object cannot be stored"):
        save_model(path, small_tcn(seed=1), {"bad": object()})
    _, extra = load_model(path)
    assert extra == {"round": 3}
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]


# ---------------------------------------------------------------- benchmark


def test_train_bench_quick(tmp_path: Path) -> None:
    out = tmp_path / "bench" / "train.json"
    report = run_train_bench(out, quick=True)
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert set(report["models"]) == {"tcn", "tcn-256", "vgg"}
    common = {"params", "macs_per_patch", "macs_per_audio_second", "train_patches_per_s",
              "infer_patches_per_s"}
    for name, row in report["models"].items():
        assert common <= set(row)
        assert row["params"] > 0 and row["train_patches_per_s"] > 0 and row["infer_patches_per_s"] > 0
        if name.startswith("tcn"):
            assert 0 < row["stream_step_ms_median"] <= row["stream_step_ms_p99"]
    assert report["models"]["vgg"]["params"] == 312_680
    assert report["models"]["tcn-256"]["params"] > report["models"]["tcn"]["params"]
