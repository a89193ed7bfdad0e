"""Configuration: TOML files, dotted overrides, one-line errors naming the file and the key."""

from pathlib import Path

import pytest

from fl.config import CONFIG_DIR, Config, apply_flat, load_config, to_dict
from fl.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_shipped_configs_load() -> None:
    files = sorted(CONFIG_DIR.rglob("*.toml"))
    assert len(files) >= 5
    for path in files:
        assert isinstance(load_config(path), Config)


def test_feature_files_match_the_papers() -> None:
    fsd = load_config(CONFIG_DIR / "features" / "fsd50k.toml").frontend
    assert (fsd.sample_rate, fsd.n_fft, fsd.hop_length, fsd.n_mels) == (22050, 660, 220, 96)
    lea = load_config(CONFIG_DIR / "features" / "lea16k.toml").frontend
    assert (lea.sample_rate, lea.win_length, lea.hop_length, lea.n_mels) == (16000, 400, 160, 64)


def test_file_then_flags_override(tmp_path: Path) -> None:
    path = write(tmp_path, "seed = 4\n[train]\nlr = 0.01\nepochs = 3\n")
    config = load_config(path, overrides={"train.lr": 0.5, "train.epochs": None})
    assert config.seed == 4
    assert config.train.lr == 0.5
    assert config.train.epochs == 3  # None flags leave the file's value


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[train]\nlearning-rate = 0.1\n", "train.learning-rate: unknown key"),
        ("[train]\nepochs = 'ten'\n", "train.epochs: expected an integer"),
        ("[train]\nepochs = 0\n", "train.epochs: must be at least 1"),
        ("[federated]\nfraction = 1.5\n", "federated.fraction: must be in (0, 1]"),
        ("[federated]\nmax-pooling-rounds = -1\n", "federated.max-pooling-rounds: must be a non-negative integer"),
        ("[model]\nname = 'vgg'\n[federated]\nmax-pooling-rounds = 2\n", "federated.max-pooling-rounds: needs the TCN"),
        ("[frontend]\nscale = 'db'\n", "frontend.scale: must be 'log' or 'linear'"),
        ("[model]\ndilations = [1, 0]\n", "model.dilations"),
        ("[nonsense]\nx = 1\n", "nonsense: unknown key"),
        ("train = 3\n", "train: expected a table"),
        ("[train\nlr = 1\n", "invalid TOML"),
    ],
)
def test_bad_values_are_one_line_errors_naming_file_and_key(tmp_path: Path, text: str, needle: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message
    assert needle in message
    assert "\n" not in message


def test_missing_file_is_clear(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml")


def test_flag_errors_name_the_command_line() -> None:
    with pytest.raises(ConfigError, match="command line: federated.strategy"):
        apply_flat(Config(), {"federated.strategy": "fedsgd"}, "command line")


def test_round_trip_through_dict() -> None:
    config = load_config(overrides={"model.channels": 8, "federated.rounds": 2})
    again = load_config(overrides=None)
    from fl.config import apply

    assert apply(again, to_dict(config), "dict") == config
