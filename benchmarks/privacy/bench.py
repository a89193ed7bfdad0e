"""``fedsound bench privacy``: the global model's quality against its privacy budget.

The demo's federation (``configs/demo.toml``: the built-in synthetic corpus, clients by uploader, FedAvg, 10 rounds
of half the clients, 2 local epochs) trained without differential privacy and with client-side fixed clipping
(``federated.dp = "client-fixed"``, clipping norm ``CLIPPING_NORM``) at several noise multipliers. For each run:
epsilon spent at delta 1e-5 (client level, no amplification by sampling: see :mod:`server.privacy`), the final val
mAP, and the clip-level mAP on the eval split, whose uploaders no client holds.

Run: ``fedsound bench privacy [--workdir DIR] [--quick] [--out bench.json]``.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

from benchmarks.common import machine_info, write_json
from data_prep.prep import prep
from data_prep.synth import synthesize_corpus
from fedsound.simulate import simulate
from fl.config import CONFIG_DIR, apply_flat, load_config
from fl.rundir import RunDir
from fl.runtime import configure_environment
from fl.train import evaluate_model_file

SEED = 0
CLIPPING_NORM = 1.0
NOISE_MULTIPLIERS = (0.5, 1.0, 2.0)


def _store(workdir: Path, quick: bool) -> tuple[Path, Any]:
    """The demo corpus and store (smaller with ``quick``), made once and reused, and the demo's config."""
    config = load_config(CONFIG_DIR / "demo.toml", overrides={"seed": SEED})
    corpus, store = workdir / "corpus", workdir / "store.h5"
    if not store.exists():
        sizes = {"n_clips": 120, "n_uploaders": 12} if quick else {}
        synthesize_corpus(corpus, seed=SEED, progress=False, **sizes)
        prep(corpus, store, config.frontend, workers=2, progress=False)
    if quick:
        config = apply_flat(config, {"federated.rounds": 2, "partition.min-clips": 1}, "quick")
    return store, config


def run_privacy_bench(workdir: Path, quick: bool = False, out_json: Path | None = None,
                      progress: bool = True) -> dict[str, Any]:
    """Train the federation once per setting (module docstring); print a table and write JSON (``out_json`` or
    ``workdir/privacy.json``)."""
    workdir = Path(workdir)
    configure_environment(workdir)
    store, base = _store(workdir, quick)
    settings = [("no DP", {"federated.dp": "off"})] + [
        (f"client-fixed, z = {z:g}", {"federated.dp": "client-fixed", "federated.dp-noise-multiplier": z,
                                      "federated.dp-clipping-norm": CLIPPING_NORM})
        for z in NOISE_MULTIPLIERS]
    rows = []
    for name, overrides in settings:
        config = apply_flat(base, overrides, name)
        out = workdir / "runs" / name.replace(" ", "").replace(",", "-").replace("=", "")
        started = time.perf_counter()
        if not (out / "model.pt").exists():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                simulate(store, config, out, resume=(out / "checkpoint.pt").exists(), progress=progress)
        last = RunDir(out).records()[-1]
        rows.append({"setting": name, "noise_multiplier": overrides.get("federated.dp-noise-multiplier"),
                     "clipping_norm": overrides.get("federated.dp-clipping-norm"), "epsilon": last.get("epsilon"),
                     "delta": last.get("delta"), "rounds": last["round"], "val_mAP": last["mAP"],
                     "eval_mAP": evaluate_model_file(out / "model.pt", store, "eval", progress=False)["mAP"],
                     "seconds": time.perf_counter() - started})
    report = {"machine": machine_info(), "quick": quick, "seed": SEED, "config": "configs/demo.toml", "rows": rows}
    print(format_table(report))
    write_json(Path(out_json) if out_json is not None else workdir / "privacy.json", report)
    return report


def format_table(report: dict[str, Any]) -> str:
    """The utility of privacy, one line per setting."""
    lines = [f"privacy bench{' (quick)' if report['quick'] else ''}: the demo federation, "
             f"{report['rows'][0]['rounds']} rounds",
             f"{'setting':<24} {'epsilon (delta)':>18} {'val mAP':>8} {'eval mAP':>9} {'seconds':>8}"]
    for row in report["rows"]:
        budget = "no guarantee" if row["epsilon"] is None else f"{row['epsilon']:.1f} ({row['delta']:g})"
        lines.append(f"{row['setting']:<24} {budget:>18} {row['val_mAP']:>8.3f} {row['eval_mAP']:>9.3f} "
                     f"{row['seconds']:>8.0f}")
    return "\n".join(lines)
