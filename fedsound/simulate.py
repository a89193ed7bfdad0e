"""``fedsound simulate``: partition the train split, then run Flower's Simulation Engine on Ray."""

from __future__ import annotations

import logging
import os
import signal
import warnings
from pathlib import Path

from fedsound.cluster import check_ray_address
from fl.config import Config
from fl.errors import DataError
from fl.federation import RUN_ENV, RunSettings
from fl.locks import exclusive
from fl.partition import PartitionPlan, build_partition
from fl.rundir import RunDir
from fl.store import FeatureStore, with_store_frontend

log = logging.getLogger("fedsound.simulate")


def keep_sigterm_handler() -> None:
    """Keep a SIGTERM handler the command installed when Ray starts in this process.

    ``ray.init`` replaces the main thread's SIGTERM handler with one that raises ``SystemExit`` at once; Flower's
    worker threads then log every message the teardown cuts short as an error with its traceback. A command's own
    handler (``fedsound``'s stops a command as Ctrl-C does) is kept; without one, Ray's is installed as before."""
    import ray._private.utils as ray_utils

    if getattr(ray_utils.set_sigterm_handler, "keeps_existing_handler", False):
        return
    install = ray_utils.set_sigterm_handler

    def set_sigterm_handler(handler: object) -> None:
        if not callable(signal.getsignal(signal.SIGTERM)):
            install(handler)

    set_sigterm_handler.keeps_existing_handler = True  # type: ignore[attr-defined]
    ray_utils.set_sigterm_handler = set_sigterm_handler


def backend_config(config: Config) -> dict:
    """Resources per client actor and how Ray starts (local, or joining a cluster by address)."""
    fed = config.federated
    init_args: dict = {"include_dashboard": False}
    if fed.ray_address:
        init_args = {"address": fed.ray_address}
    else:
        init_args["num_cpus"] = os.cpu_count()
    return {"client_resources": {"num_cpus": fed.client_cpus, "num_gpus": fed.client_gpus},
            "init_args": init_args}


def simulate(store_path: Path, config: Config, out: Path, resume: bool = False, progress: bool = True,
             central: Path | None = None, allow_config_change: bool = False) -> dict:
    """Run a federated experiment in Flower's Simulation Engine; returns the last round's record.

    The run directory is locked for the run, the store verified against its checksums, a resume checked
    (:meth:`fl.rundir.RunDir.start`), and a Ray cluster address probed within ``federated.ray-timeout-s``."""
    with exclusive(Path(out), "run directory"):
        return _simulate(store_path, config, Path(out), resume, progress, central, allow_config_change)


def _simulate(store_path: Path, config: Config, out: Path, resume: bool, progress: bool, central: Path | None,
              allow_config_change: bool) -> dict:
    from flwr.simulation import run_simulation

    from clients.client_app import app as client_app
    from server.server_app import app as server_app

    store = FeatureStore(store_path)
    config = with_store_frontend(config, store)
    store.verify(progress=progress)
    if config.federated.ray_address:
        check_ray_address(config.federated.ray_address, config.federated.ray_timeout_s)
    run = RunDir(out)
    run.start(config, resume, allow_config_change)
    settings = RunSettings(config, Path(store_path).resolve(), Path(out).resolve(), resume,
                           Path(central).resolve() if central else None)
    if not resume:
        build_partition(settings.store, config, settings.plan)
    plan = PartitionPlan.load(settings.plan)
    supernodes = config.federated.supernodes or plan.n_clients
    if supernodes < plan.n_clients:
        raise DataError(f"federated.supernodes={supernodes} is fewer than the {plan.n_clients} partitions")
    os.environ[RUN_ENV] = str(settings.save())
    keep_sigterm_handler()
    log.info("simulating %d rounds over %d clients (%s)", config.federated.rounds, plan.n_clients,
             config.federated.strategy)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            run_simulation(server_app=server_app, client_app=client_app, num_supernodes=supernodes,
                           backend_config=backend_config(config), verbose_logging=False)
    finally:
        os.environ.pop(RUN_ENV, None)
    records = run.records()
    if not records or records[-1]["round"] < config.federated.rounds:
        raise DataError(f"{out}: the simulation stopped before its last round (see the log above); "
                        "continue it with --resume")
    return {**records[-1], "rounds": records[-1]["round"]}
