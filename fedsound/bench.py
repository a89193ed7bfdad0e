"""``fedsound bench WHAT``: run the benchmark of one stage. Each prints a table and can write JSON.

The benchmarks are not part of the installed packages: they live in the source checkout's ``benchmarks/``
folder, found beside this package (an editable install), in the current folder, or at ``--benchmarks DIR``.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from fl.errors import ConfigError

# stage -> (module, function); every function takes (workdir, quick, out_json, progress) and returns a dict of
# figures; run_personalize_bench also takes settings (from --config), user_seeds (from --users),
# aggressor_hours (from --aggressor-hours) and examples (from --examples).
BENCHES = {
    "prep": ("benchmarks.prep.bench", "run_prep_bench"),
    "train": ("benchmarks.train.bench", "run_train_bench"),
    "sim": ("benchmarks.sim.bench", "run_sim_bench"),
    "sweep": ("benchmarks.sweep.bench", "run_sweep_bench"),
    "stream": ("benchmarks.stream.bench", "run_stream_bench"),
    "personalize": ("benchmarks.personalize.bench", "run_personalize_bench"),
    "privacy": ("benchmarks.privacy.bench", "run_privacy_bench"),
    "deploy": ("benchmarks.deploy.bench", "run_deploy_bench"),
}
# Options only bench personalize takes, and why the others refuse each.
PERSONALIZE_ONLY = {
    "--users": "has no synthetic users; only bench personalize takes them",
    "--aggressor-hours": "has no aggressor audio; only bench personalize takes it",
    "--examples": "enrolls nobody; only bench personalize takes a number of examples",
    "--config": "has fixed settings; only bench personalize reads a config (its [personalize] table)",
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


def run_bench(what: str, workdir: Path, quick: bool = False, out: Path | None = None, config: Path | None = None,
              progress: bool = True, users: list[int] | None = None, aggressor_hours: float | None = None,
              examples: list[int] | None = None, benchmarks: Path | None = None) -> int:
    """Run one benchmark into ``workdir/bench/WHAT``. ``config``: a TOML file whose ``[personalize]`` table
    bench personalize fine-tunes with; ``users``: the synthetic users' seeds bench personalize runs (default
    its own four); ``aggressor_hours``: hours of aggressor-only audio per user (default 5); ``examples``: the
    enrollment examples per sound it personalizes with (default 10 and 5); the other benchmarks have fixed
    settings and refuse all four. ``progress``: progress bars on the long steps. ``benchmarks``: the source
    checkout's ``benchmarks/`` folder (see :func:`find_benchmarks`)."""
    module_name, function = BENCHES[what]
    given = {"--users": users, "--aggressor-hours": aggressor_hours, "--examples": examples, "--config": config}
    if what != "personalize":
        for flag, value in given.items():
            if value is not None:
                raise ConfigError(f"{flag}: bench {what} {PERSONALIZE_ONLY[flag]}")
    options: dict = {}
    if users is not None:
        options["user_seeds"] = users
    if aggressor_hours is not None:
        options["aggressor_hours"] = aggressor_hours
    if examples is not None:
        options["examples"] = examples
    if config is not None:
        from clients.detector.personalize import load_personalize_config

        options["settings"] = load_personalize_config(config)
    root = str(find_benchmarks(benchmarks).parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    module = importlib.import_module(module_name)
    getattr(module, function)(workdir=Path(workdir) / "bench" / what, quick=quick, out_json=out, progress=progress,
                              **options)
    return 0
