"""A normal (non-editable) install: the wheel carries every package and the shipped configs, and an installed
``fedsound`` run outside the source tree finds its configs through :mod:`importlib.resources`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Built from a copy of the files git tracks or would track, so no earlier build's leftovers get in."""
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("dist")
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            check=True, capture_output=True, timeout=60).stdout.decode().split("\0")
    for name in filter(None, listed):
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out)], check=True, capture_output=True, timeout=600)
    (found,) = out.glob("fedsound-*.whl")
    return found


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A fresh venv holding only the wheel; its dependencies come from this venv's site-packages by a .pth line
    (a .pth line adds a folder without running the .pth files in it, so this venv's editable finder stays out)."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    (site,) = venv.glob("lib/python*/site-packages")
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # --ignore-installed: the editable fedsound of this venv, visible through the .pth line, is not this one
    subprocess.run([venv / "bin" / "python", "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                    "--ignore-installed", str(wheel)], check=True, capture_output=True, timeout=300)
    assert (venv / "bin" / "fedsound").is_file(), "the wheel installed no console script"
    return venv


def _run(venv: Path, *argv: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([str(venv / "bin" / argv[0]), *argv[1:]], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_the_wheel_holds_the_packages_and_configs_but_not_benchmarks_or_tests(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    for expected in ("fl/config.py", "clients/client_app.py", "clients/detector/listen.py", "server/server_app.py",
                     "data_prep/prep.py", "fedsound/cli.py", "configs/demo.toml", "configs/sim/fedavg.toml",
                     "configs/detector/personalize.toml", "configs/features/lea16k.toml"):
        assert expected in names, expected
    shipped = {p.relative_to(REPO / "configs").as_posix() for p in (REPO / "configs").rglob("*.toml")}
    assert shipped == {n.removeprefix("configs/") for n in names if n.startswith("configs/") and n.endswith(".toml")}
    assert not [n for n in names if n.startswith(("benchmarks/", "tests/"))]


def test_an_installed_fedsound_finds_its_configs_outside_the_source_tree(installed, tmp_path):
    result = _run(installed, "fedsound", "demo", "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "--workdir" in result.stdout
    code = ("import fl, fl.config as c; "
            "print(fl.__file__); print(c.CONFIG_DIR); "
            "print(c.load_config(c.CONFIG_DIR / 'demo.toml').federated.rounds)")
    result = _run(installed, "python", "-c", code, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    module_file, config_dir, rounds = result.stdout.split()
    assert Path(module_file).is_relative_to(installed) and Path(config_dir).is_relative_to(installed)
    assert int(rounds) >= 1
    result = _run(installed, "fedsound", "sweep", "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr


def test_an_installed_fedsound_says_where_benchmarks_live(installed, tmp_path):
    result = _run(installed, "fedsound", "bench", "prep", "--quick", "--workdir", str(tmp_path / "w"), cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().startswith("error: benchmarks:") and "\n" not in result.stderr.strip()
    assert "run from a checkout" in result.stderr


def test_the_wheel_ships_the_global_bundle_and_an_installed_fedsound_personalizes_from_it(wheel, installed,
                                                                                          tmp_path):
    from clients.detector.bundle import SHIPPED_BUNDLE, load_bundle

    names = set(zipfile.ZipFile(wheel).namelist())
    files = {f"clients/detector/global_bundle/{p.name}" for p in SHIPPED_BUNDLE.iterdir()}
    assert "clients/detector/global_bundle/bundle.json" in files and files <= names
    code = ("from clients.detector.bundle import load_bundle, shipped_bundle; b = shipped_bundle(); print(b); "
            "print(load_bundle(b).manifest['manifest_sha256'])")
    result = _run(installed, "python", "-c", code, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    path, sha256 = result.stdout.split()
    assert Path(path).is_relative_to(installed) and sha256 == load_bundle(SHIPPED_BUNDLE).manifest["manifest_sha256"]
