"""``fedsound bench WHAT``: run the benchmark of one stage. Each prints a table and can write JSON.

The benchmarks are not part of the installed packages: they live in the source checkout's ``benchmarks/``
folder, found beside this package (an editable install), in the current folder, or at ``--benchmarks DIR``.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

from fl.errors import ConfigError

# stage -> (module, function); every function takes (workdir, quick, out_json, progress) and returns a dict of
# figures; some take more (STAGE_OPTIONS).
BENCHES = {
    "prep": ("benchmarks.prep.bench", "run_prep_bench"),
    "train": ("benchmarks.train.bench", "run_train_bench"),
    "sim": ("benchmarks.sim.bench", "run_sim_bench"),
    "sweep": ("benchmarks.sweep.bench", "run_sweep_bench"),
    "stream": ("benchmarks.stream.bench", "run_stream_bench"),
    "global": ("benchmarks.personalize.global_model", "build_global_model"),
    "personalize": ("benchmarks.personalize.bench", "run_personalize_bench"),
    "privacy": ("benchmarks.privacy.bench", "run_privacy_bench"),
    "deploy": ("benchmarks.deploy.bench", "run_deploy_bench"),
}
# Options only some benchmarks take: flag -> (the stages that take it, keyword argument, why the others refuse it).
STAGE_OPTIONS = {
    "--users": (("personalize",), "user_seeds", "has no synthetic users; only bench personalize takes them"),
    "--aggressor-hours": (("personalize",), "aggressor_hours",
                          "has no aggressor audio; only bench personalize takes it"),
    "--examples": (("personalize",), "examples", "enrolls nobody; only bench personalize takes a number of examples"),
    "--config": (("personalize",), "settings",
                 "has fixed settings; only bench personalize reads a config (its [personalize] table)"),
    "--real-audio": (("personalize", "global"), "real_audio",
                     "uses no recordings; only bench personalize and bench global take them"),
    "--central": (("global",), "central", "has no central run to add; only bench global takes it"),
    "--ablate": (("personalize",), "ablate", "has no calibration rules; only bench personalize ablates them"),
    "--ship": (("global",), "ship", "makes no global bundle; only bench global ships one"),
}


def find_benchmarks(given: Path | None = None) -> Path:
    """The ``benchmarks/`` folder of a source checkout: ``given``, else beside this package, else in the current
    folder; a one-line ConfigError if none holds the benchmarks."""
    candidates = [Path(given)] if given else [Path(__file__).resolve().parent.parent / "benchmarks",
                                              Path.cwd() / "benchmarks"]
    for folder in candidates:
        if (folder / "__init__.py").is_file() and (folder / "common.py").is_file():
            return folder.resolve()
    raise ConfigError(f"benchmarks: no benchmarks folder at {', '.join(map(str, candidates))}; they ship with the "
                      "source, not the package: run from a checkout of fedsound or pass --benchmarks DIR")


def run_bench(what: str, workdir: Path, quick: bool = False, out: Path | None = None, progress: bool = True,
              benchmarks: Path | None = None, **options: Any) -> int:
    """Run one benchmark into ``workdir/bench/WHAT``. ``options``: the values of :data:`STAGE_OPTIONS`' flags
    (None when not given), refused by the stages that do not take them; ``--config`` is a TOML file whose
    ``[personalize]`` table bench personalize fine-tunes with. ``progress``: progress bars on the long steps.
    ``benchmarks``: the source checkout's ``benchmarks/`` folder (see :func:`find_benchmarks`)."""
    module_name, function = BENCHES[what]
    given = {}
    for flag, (stages, keyword, refusal) in STAGE_OPTIONS.items():
        value = options.pop(keyword, None)
        if value is None or value is False:
            continue
        if what not in stages:
            raise ConfigError(f"{flag}: bench {what} {refusal}")
        given[keyword] = value
    if options:
        raise TypeError(f"run_bench: unknown options {sorted(options)}")
    if "settings" in given:
        from clients.detector.personalize import load_personalize_config

        given["settings"] = load_personalize_config(given["settings"])
    root = str(find_benchmarks(benchmarks).parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    module = importlib.import_module(module_name)
    getattr(module, function)(workdir=Path(workdir) / "bench" / what, quick=quick, out_json=out, progress=progress,
                              **given)
    return 0
