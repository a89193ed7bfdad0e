"""The command line: every command of ARCHITECTURE.md is listed; unbuilt ones exit 2 without a traceback; what
the benchmarks record of the machine."""

import json
import os
import platform
import subprocess
import sys

import pytest
import torch

from benchmarks.common import cpu_model, machine_info
from fedsound.cli import build_parser, main
from fl.config import CONFIG_DIR

COMMANDS = ["demo", "data", "train", "simulate", "evaluate", "sweep", "export", "enroll", "personalize",
            "listen", "bench"]


def help_text(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as info:
        main([*args, "--help"])
    assert info.value.code == 0
    return capsys.readouterr().out


def test_help_lists_every_command(capsys) -> None:
    text = help_text(capsys)
    for command in COMMANDS:
        assert command in text
    data = help_text(capsys, "data")
    for command in ("synth", "mouth-sounds", "download", "prep", "partition"):
        assert command in data


# Which of --seed and --config each command uses; every command takes --workdir and -q.
SHARED_OPTIONS = {
    ("demo",): {"--seed"}, ("data", "synth"): {"--seed"}, ("data", "mouth-sounds"): {"--seed"},
    ("data", "download"): set(), ("data", "prep"): {"--config"}, ("data", "partition"): {"--seed", "--config"},
    ("train",): {"--seed", "--config"}, ("simulate",): {"--seed", "--config"}, ("evaluate",): set(),
    ("sweep",): {"--seed", "--config"}, ("export",): {"--seed", "--config"}, ("enroll",): set(),
    ("personalize",): {"--seed", "--config"}, ("listen",): {"--config"}, ("bench",): {"--config"},
}


@pytest.mark.parametrize("command", sorted(SHARED_OPTIONS))
def test_shared_options_are_offered_only_where_they_count(capsys, command: tuple[str, ...]) -> None:
    text = help_text(capsys, *command)
    for option in ("--workdir", "--quiet"):
        assert option in text
    for option in ("--seed", "--config"):
        assert (option in text) == (option in SHARED_OPTIONS[command])


def test_a_shared_option_a_command_would_ignore_is_refused(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["demo", "--config", str(tmp_path / "x.toml"), "--workdir", str(tmp_path)])
    assert info.value.code == 2
    assert "unrecognized arguments: --config" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["bench", "personalize", "--seed", "3", "--workdir", str(tmp_path)])
    assert info.value.code == 2


def test_console_script_runs() -> None:
    result = subprocess.run([sys.executable, "-m", "fedsound.cli", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0
    assert "simulate" in result.stdout


def test_user_errors_are_one_line_without_traceback(tmp_path, capsys) -> None:
    code = main(["train", str(tmp_path / "missing.h5"), "--workdir", str(tmp_path), "-q"])
    err = capsys.readouterr().err
    assert code == 1
    assert "feature store not found" in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_bad_config_file_is_reported(tmp_path, capsys) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nepochs = -1\n")
    code = main(["train", "x.h5", "--config", str(bad), "--workdir", str(tmp_path), "-q"])
    err = capsys.readouterr().err
    assert code == 1
    assert f"{bad}: train.epochs: must be at least 1" in err


def test_enroll_needs_a_sound_or_background(tmp_path, capsys) -> None:
    code = main(["enroll", str(tmp_path / "profile"), "--from-files", "x.wav", "--workdir", str(tmp_path), "-q"])
    assert code == 1
    assert "--sound NAME or --background" in capsys.readouterr().err


def test_bench_personalize_reads_the_config_and_other_benches_refuse_one(tmp_path, capsys) -> None:
    bad = tmp_path / "personalize.toml"
    bad.write_text("[personalize]\nsteps = 0\n")
    code = main(["bench", "personalize", "--config", str(bad), "--workdir", str(tmp_path), "-q"])
    assert code == 1
    assert f"{bad}: personalize.steps: must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "bench" / "personalize").exists()
    code = main(["bench", "sim", "--config", str(bad), "--workdir", str(tmp_path), "-q"])
    err = capsys.readouterr().err
    assert code == 1
    assert "--config: bench sim has fixed settings" in err
    assert not (tmp_path / "bench" / "sim").exists()


def test_bench_users_hours_and_examples_are_checked_and_only_bench_personalize_takes_them(tmp_path, capsys) -> None:
    for bad in ("11,x", "11,11", "-3"):
        with pytest.raises(SystemExit):
            main(["bench", "personalize", "--users", bad, "--workdir", str(tmp_path), "-q"])
        assert "--users: expected" in capsys.readouterr().err
    code = main(["bench", "prep", "--users", "11", "--workdir", str(tmp_path), "-q"])
    assert code == 1
    assert "--users: bench prep has no synthetic users" in capsys.readouterr().err
    assert not (tmp_path / "bench" / "prep").exists()
    code = main(["bench", "stream", "--aggressor-hours", "2", "--workdir", str(tmp_path), "-q"])
    assert code == 1
    assert "--aggressor-hours: bench stream has no aggressor audio" in capsys.readouterr().err
    assert not (tmp_path / "bench" / "stream").exists()
    code = main(["bench", "personalize", "--aggressor-hours", "0", "--workdir", str(tmp_path), "-q"])
    assert code == 1
    assert "aggressor-hours: must be in (0, 1000], got 0.0" in capsys.readouterr().err
    assert not (tmp_path / "bench" / "personalize").exists()
    with pytest.raises(SystemExit):
        main(["bench", "personalize", "--examples", "10,10", "--workdir", str(tmp_path), "-q"])
    assert "--examples: expected distinct non-negative integers, got '10,10'" in capsys.readouterr().err
    code = main(["bench", "train", "--examples", "10", "--workdir", str(tmp_path), "-q"])
    assert code == 1
    assert "--examples: bench train enrolls nobody" in capsys.readouterr().err
    for stage, flag, refusal in (("prep", "--ship", "makes no global bundle"), ("personalize", "--central",
                                 "has no central run"), ("train", "--real-audio", "uses no recordings")):
        code = main(["bench", stage, flag, *(["DIR"] if flag == "--real-audio" else []), "--workdir", str(tmp_path),
                     "-q"])
        assert code == 1 and f"{flag}: bench {stage} {refusal}" in capsys.readouterr().err
        assert not (tmp_path / "bench" / stage).exists()
    with pytest.raises(SystemExit):
        main(["bench", "personalize", "--users", "tuned", "--workdir", str(tmp_path), "-q"])
    assert "--users: expected test, tuning or comma-separated integers, got 'tuned'" in capsys.readouterr().err
    code = main(["bench", "personalize", "--examples", "10,3", "--workdir", str(tmp_path), "-q"])
    assert code == 1
    assert "examples: need one or more distinct counts of at least min-examples (5), got [10, 3]" in \
        capsys.readouterr().err
    assert not (tmp_path / "bench" / "personalize").exists()


def test_bench_machine_names_the_cpu_model_and_falls_back_to_platform(tmp_path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\n\n"
                       "processor\t: 1\nmodel name\t: AMD EPYC 7B13\n")
    assert cpu_model(cpuinfo) == "AMD EPYC 7B13"
    cpuinfo.write_text("processor\t: 0\nBogoMIPS\t: 108.00\n\nModel\t\t: Raspberry Pi 4 Model B Rev 1.4\n")
    assert cpu_model(cpuinfo) == "Raspberry Pi 4 Model B Rev 1.4"
    assert cpu_model(tmp_path / "missing") == (platform.processor() or platform.machine())
    machine = json.loads(json.dumps(machine_info()))  # plain JSON data, as the benchmarks write it
    assert machine["cpus"] == os.cpu_count() and machine["cpu"] == cpu_model()
    assert (machine["gpu"] is not None) == torch.cuda.is_available()


def test_a_commands_default_config_stays_its_own(tmp_path) -> None:
    parser = build_parser()
    assert parser.parse_args(["sweep", "store.h5"]).config == CONFIG_DIR / "sweep" / "fsd_fed_grid.toml"
    assert parser.parse_args(["personalize", "profile"]).config == CONFIG_DIR / "detector" / "personalize.toml"
    for argv in (["bench", "train"], ["simulate", "store.h5"], ["listen", "profile"]):
        assert parser.parse_args(argv).config is None, argv
    out = tmp_path / "train.json"  # bench train refuses any --config, so a leaked default stops it
    assert main(["bench", "train", "--quick", "-q", "--workdir", str(tmp_path), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["machine"]["cpu"] == cpu_model()
