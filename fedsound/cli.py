"""The ``fedsound`` command line: a thin layer over importable functions.

Every command takes ``--workdir DIR`` and ``-v/-q``; ``--seed`` and ``--config FILE`` only where they change
what the command does, so a flag that would be ignored is an error instead.
Heavy modules are imported inside the handlers, after the command's config is checked, so that ``fedsound --help``
and a bad flag or config file answer at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from fl import jsonfile
from fl.config import CONFIG_DIR, LATENCY_CHOICES, Config, load_config
from fl.errors import ConfigError, FedsoundError


def _config(args: argparse.Namespace, overrides: dict | None = None) -> Config:
    """Defaults <- --features file <- --config file <- flags (dotted keys)."""
    flat = {"seed": args.seed, **(overrides or {})}
    return load_config(getattr(args, "features", None), args.config, overrides=flat)


def _progress(args: argparse.Namespace) -> bool:
    return args.verbosity >= 0


def _distinct_integers(text: str) -> list[int]:
    """``--users 11,12``, ``--examples 10,5``: distinct non-negative integers."""
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"expected distinct non-negative integers, got {text!r}")
    return seeds


def _users(text: str) -> list[int] | str:
    """``--users``: ``test`` or ``tuning`` (the benchmark protocol's sets) or comma-separated seeds."""
    if text in ("test", "tuning"):
        return text
    try:
        return _distinct_integers(text)
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"expected test, tuning or {exc}".replace("or expected ", "or ")) from None


# --- data -------------------------------------------------------------------------------------------------


def cmd_data_synth(args: argparse.Namespace) -> int:
    from data_prep.synth import synthesize_corpus

    summary = synthesize_corpus(Path(args.out), n_clips=args.clips, n_uploaders=args.uploaders,
                                n_classes=args.classes, seed=args.seed or 0, progress=_progress(args))
    print(f"synthetic FSD50K-format corpus: {summary.out}  dev {summary.n_dev} clips "
          f"({summary.n_uploaders_dev} uploaders), eval {summary.n_eval} clips "
          f"({summary.n_uploaders_eval} uploaders), {len(summary.classes)} classes, "
          f"{summary.audio_seconds / 60:.1f} min of audio")
    return 0


def cmd_data_mouth_sounds(args: argparse.Namespace) -> int:
    from data_prep.mouth_corpus import synthesize_mouth_corpus

    given = {"n_voices": args.voices, "takes_per_sound": args.takes, "background_clips": args.background}
    out = synthesize_mouth_corpus(Path(args.out), seed=args.seed or 0, progress=_progress(args),
                                  real_audio=Path(args.real_audio) if args.real_audio else None,
                                  **{name: value for name, value in given.items() if value is not None})
    print(f"synthetic mouth-sound corpus (FSD50K layout, one uploader per voice): {out}")
    return 0


def cmd_data_download(args: argparse.Namespace) -> int:
    from data_prep.download import ZENODO_BASE_URL, download_fsd50k

    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    paths = download_fsd50k(Path(args.out), parts=parts, base_url=args.base_url or ZENODO_BASE_URL,
                            progress=_progress(args))
    print(f"downloaded and extracted {len(paths)} file(s) into {args.out}")
    return 0


def cmd_data_real_audio(args: argparse.Namespace) -> int:
    from data_prep.real_audio import RealAudio, fetch_real_audio

    manifest = fetch_real_audio(Path(args.out), debs=Path(args.debs) if args.debs else None,
                                progress=_progress(args))
    real = RealAudio(manifest.parent)
    for (split, kind), by_source in sorted(real.files.items()):
        print(f"{split:>5} {kind:<6} {sum(len(files) for files in by_source.values()):>5} files from "
              f"{', '.join(sorted(by_source))}")
    print(f"real recordings: {manifest}")
    return 0


def cmd_data_prep(args: argparse.Namespace) -> int:
    config = _config(args)
    from data_prep.prep import prep
    summary = prep(Path(args.fsd50k_dir), Path(args.store), config.frontend, workers=args.workers,
                   progress=_progress(args))
    print("\n".join(summary.lines()))
    return 0


def cmd_data_verify(args: argparse.Namespace) -> int:
    from fl.store import FeatureStore

    status = FeatureStore(Path(args.store)).verify(progress=_progress(args))
    unchecked = [name for name, state in status.items() if state != "ok"]
    print(f"{args.store}: {len(status) - len(unchecked)} datasets match their checksums"
          + (f"; {len(unchecked)} have none ({', '.join(unchecked)})" if unchecked else ""))
    return 0


def cmd_data_partition(args: argparse.Namespace) -> int:
    config = _config(args, {"partition.by": args.by, "partition.min-clips": args.min_clips,
                            "partition.clients": args.clients, "partition.alpha": args.alpha})
    from fl.partition import build_partition, format_summary
    plan, summary, plot = build_partition(Path(args.store), config, Path(args.out) if args.out else None)
    print(format_summary(summary))
    print(f"plan: {plan}  plot: {plot}")
    return 0


# --- training and evaluation --------------------------------------------------------------------------------


def cmd_train(args: argparse.Namespace) -> int:
    config = _config(args, {"model.name": args.model, "train.epochs": args.epochs, "train.lr": args.lr,
                            "train.batch-size": args.batch_size, "train.device": args.device})
    from fl.train import train_central
    out = Path(args.out) if args.out else Path(args.workdir) / "runs" / "central"
    result = train_central(Path(args.store), config, out, resume=args.resume, progress=_progress(args),
                           allow_config_change=args.allow_config_change)
    print(f"central run: {out}  best val mAP {result['best_mAP']:.4f} at epoch {result['best_epoch']}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from fl.train import evaluate_model_file

    metrics = evaluate_model_file(Path(args.model), Path(args.store), args.split, progress=_progress(args))
    print(f"{args.split}: mAP {metrics['mAP']:.4f}  d' {metrics['dprime']:.3f}  lwlrap {metrics['lwlrap']:.4f}  "
          f"micro PR-AUC {metrics['micro_pr_auc']:.4f}  ({metrics['n_clips']} clips)")
    if args.json:
        Path(args.json).write_text(jsonfile.dumps(metrics, indent=2) + "\n")
    return 0


# --- federated ------------------------------------------------------------------------------------------------


def cmd_simulate(args: argparse.Namespace) -> int:
    config = _config(args, {"federated.rounds": args.rounds, "federated.fraction": args.fraction,
                            "federated.local-epochs": args.local_epochs, "federated.strategy": args.strategy,
                            "federated.ray-address": args.ray_address, "federated.ray-timeout-s": args.ray_timeout_s})
    from fedsound.simulate import simulate
    out = Path(args.resume or args.out or Path(args.workdir) / "runs" / "federated")
    result = simulate(Path(args.store), config, out, resume=bool(args.resume), progress=_progress(args),
                      central=Path(args.central) if args.central else None,
                      allow_config_change=args.allow_config_change)
    print(f"federated run: {out}  final val mAP {result['mAP']:.4f} after {result['rounds']} rounds")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    config = _config(args, {"federated.ray-address": args.ray_address, "federated.ray-timeout-s": args.ray_timeout_s,
                            "sweep.max-concurrent": args.max_concurrent})
    from fedsound.sweep import run_sweep
    out = Path(args.out) if args.out else Path(args.workdir) / "sweeps" / "sweep"
    best = run_sweep(Path(args.store), config, out, resume=args.resume, progress=_progress(args))
    print(f"sweep: {out}  best trial {best['trial']} {best['params']}: "
          f"final val mAP {best['metrics']['final_mAP']:.4f}")
    return 0


def cmd_server(args: argparse.Namespace) -> int:
    from fedsound.deploy import make_certs, serve

    if args.make_certs:
        folder = make_certs(Path(args.make_certs), hosts=args.hosts)
        print(f"certificates in {folder}: give {folder / 'ca.crt'} to the laptops; keep server.key private")
        return 0
    if not args.certs or not args.initial:
        raise ConfigError("server: give --certs DIR and --initial MODEL (or --make-certs DIR first)")
    config = _config(args, {"federated.rounds": args.rounds, "federated.min-clients": args.min_clients,
                            "federated.round-timeout-s": args.round_timeout_s})
    out = Path(args.out) if args.out else Path(args.workdir) / "runs" / "profiles"
    return serve(Path(args.certs), Path(args.workdir) / "server", config, Path(args.initial), out, host=args.host,
                 port=args.port, register=[Path(key) for key in args.register], store=args.store)


JOIN_RETRY_S = 10.0


def cmd_join(args: argparse.Namespace) -> int:
    from fedsound.deploy import join, node_keys

    profile = Path(args.profile)
    if args.opt_out:
        from clients.profile_training import record_opt_in

        record_opt_in(profile, args.server or "", opted=False)
        print(f"{profile}: opted out; its takes will not train the global model")
        return 0
    if not args.server or not args.ca:
        raise ConfigError("join: give --server HOST:PORT and --ca CA.crt (from the server's operator)")
    if args.opt_in:
        from clients.profile_training import record_opt_in

        record_opt_in(profile, args.server)
    _, public = node_keys(profile)
    print(f"joining {args.server} with {profile}; the operator must register {public} (fedsound server ... "
          f"--register {public.name}); only weight updates leave this computer. Ctrl-C to leave.", flush=True)
    while True:  # a SuperNode refused (not registered yet) or cut off exits: start it again until Ctrl-C
        node = join(profile, args.server, Path(args.ca), Path(args.workdir) / "join")
        try:
            status = node.wait()
        finally:
            if node.poll() is None:
                node.terminate()
                node.wait(timeout=20)
        print(f"the connection to {args.server} ended (exit {status}: not registered yet, or unreachable); "
              f"trying again in {JOIN_RETRY_S:g} s (see {Path(args.workdir) / 'join' / 'supernode.log'})",
              file=sys.stderr, flush=True)
        time.sleep(JOIN_RETRY_S)


# --- on-device --------------------------------------------------------------------------------------------


def cmd_export(args: argparse.Namespace) -> int:
    config = _config(args)
    from clients.detector.bundle import DEFAULT_BACKGROUND_PATCHES, export_bundle
    patches = DEFAULT_BACKGROUND_PATCHES if args.background_patches is None else args.background_patches
    path = export_bundle(Path(args.model), Path(args.bundle), config, store=Path(args.store) if args.store else None,
                         background_patches=patches, exclude_labels=args.exclude_labels, portable=args.onnx)
    print(f"detector bundle: {path}")
    return 0


def cmd_listen(args: argparse.Namespace) -> int:
    if args.list_devices:
        from clients.detector.audio_input import format_devices, list_input_devices

        print(format_devices(list_input_devices()))
        return 0
    if args.source is None:
        raise ConfigError("listen: give a PROFILE or BUNDLE to listen with (or --list-devices)")
    from clients.detector.listen import listen

    config = _config(args)
    device = int(args.device) if args.device is not None and args.device.isdigit() else args.device
    return listen(Path(args.source), config, input_=args.input, realtime=args.realtime, as_json=args.json,
                  exec_map=args.exec or [], device=device, engine=args.engine, latency=args.latency)


def cmd_enroll(args: argparse.Namespace) -> int:
    from clients.detector.enroll import enroll

    summary = enroll(Path(args.profile), sound=args.sound, record=args.record,
                     from_files=[Path(f) for f in args.from_files] if args.from_files else None,
                     background=args.background, progress=_progress(args))
    print(json.dumps(summary))
    return 0


def cmd_personalize(args: argparse.Namespace) -> int:
    config = _config(args, {"personalize.latency": args.latency})
    from clients.detector.personalize import format_report, personalize
    report = personalize(Path(args.profile), Path(args.bundle) if args.bundle else None, config,
                         progress=_progress(args))
    print(format_report(report))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from fedsound.bench import run_bench

    return run_bench(args.what, Path(args.workdir), quick=args.quick, out=Path(args.out) if args.out else None,
                     progress=_progress(args), benchmarks=args.benchmarks, settings=args.config,
                     user_seeds=args.users, aggressor_hours=args.aggressor_hours, examples=args.examples,
                     real_audio=Path(args.real_audio) if args.real_audio else None, central=args.central,
                     ship=args.ship, ablate=args.ablate)


def cmd_demo(args: argparse.Namespace) -> int:
    from fedsound.demo import run_demo

    return run_demo(Path(args.workdir), seed=args.seed or 0, sweep=args.sweep, progress=_progress(args))


# --- parser -------------------------------------------------------------------------------------------------


def _common_options(seed: bool, config: bool) -> argparse.ArgumentParser:
    """The shared options of one command (``--seed``/``--config`` only if it uses them). Each command gets its
    own copy: argparse shares a parent's option objects with every child, so one command's
    ``set_defaults(config=...)`` would become every command's."""
    common = argparse.ArgumentParser(add_help=False)
    if seed:
        common.add_argument("--seed", type=int, default=None,
                            help="one seed for synthesis, partitions, sampling, training")
    if config:
        common.add_argument("--config", type=Path, default=None,
                            help="TOML file under configs/ (sections as in Config)")
    common.add_argument("--workdir", default="work", help="where runs, Ray and Flower files go (default: work)")
    common.add_argument("-v", "--verbose", dest="verbosity", action="store_const", const=1, default=0)
    common.add_argument("-q", "--quiet", dest="verbosity", action="store_const", const=-1,
                        help="no progress bars, warnings only")
    return common


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (also used by the tests and the README)."""
    parser = argparse.ArgumentParser(
        prog="fedsound", description="Federated sound event detection on FSD50K with Flower and Ray.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, handler: Callable, help_: str, parent=sub, seed: bool = True,
            config: bool = True) -> argparse.ArgumentParser:
        p = parent.add_parser(name, parents=[_common_options(seed, config)], help=help_, description=help_)
        p.set_defaults(handler=handler, seed=None, config=None)
        return p

    p = add("demo", cmd_demo, "the whole path on the built-in synthetic corpus, end to end", config=False)
    p.add_argument("--sweep", action="store_true", help="also run a tiny Ray Tune grid")

    data = sub.add_parser("data", help="data commands: synth, mouth-sounds, real-audio, download, prep, verify, "
                          "partition")
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    p = add("synth", cmd_data_synth, "write a small FSD50K-format corpus", dsub, config=False)
    p.add_argument("out")
    p.add_argument("--clips", type=int, default=600)
    p.add_argument("--uploaders", type=int, default=60)
    p.add_argument("--classes", type=int, default=10)
    p = add("mouth-sounds", cmd_data_mouth_sounds, "write a many-voice mouth-sound corpus in FSD50K's layout", dsub,
              config=False)
    p.add_argument("out")
    p.add_argument("--voices", type=int, help="voices (uploaders; default: the benchmark global model's corpus); "
                   "one in ten each to val and eval")
    p.add_argument("--takes", type=int, help="takes of each mouth sound per voice (default: as --voices)")
    p.add_argument("--background", type=int, help="4 s background clips per voice (default: as --voices)")
    p.add_argument("--real-audio", default=None,
                   help="folder of `data real-audio`: half the background clips real speech and music (train split)")
    p = add("download", cmd_data_download, "fetch FSD50K (resumable, md5-checked), join split zips, extract", dsub,
              seed=False, config=False)
    p.add_argument("out")
    p.add_argument("--parts", default="dev,eval,meta", help="comma-separated: dev, eval, meta")
    p.add_argument("--base-url", default=None, help="mirror to fetch from (default: Zenodo record 4060432)")
    p = add("real-audio", cmd_data_real_audio, "fetch real speech and music (Debian packages), split by speaker",
            dsub, seed=False, config=False)
    p.add_argument("out")
    p.add_argument("--debs", default=None, help="a folder of already-downloaded .deb files (default: apt-get download)")
    p = add("prep", cmd_data_prep, "FSD50K tree -> log-mel feature store + manifests", dsub, seed=False)
    p.add_argument("fsd50k_dir")
    p.add_argument("store")
    p.add_argument("--features", type=Path, default=CONFIG_DIR / "features" / "fsd50k.toml")
    p.add_argument("--workers", type=int, default=2)
    p = add("verify", cmd_data_verify, "check every dataset of a feature store against its checksum", dsub,
            seed=False, config=False)
    p.add_argument("store")
    p = add("partition", cmd_data_partition, "client partition summary (by uploader, iid, dirichlet)", dsub)
    p.add_argument("store")
    p.add_argument("--by", choices=["uploader", "iid", "dirichlet"], default=None)
    p.add_argument("--min-clips", type=int, default=None)
    p.add_argument("--clients", type=int, default=None)
    p.add_argument("--alpha", type=float, default=None)
    p.add_argument("--out", default=None, help="plan JSON (default: partition.json beside the store)")

    p = add("train", cmd_train, "centralised baseline on the same store and model")
    p.add_argument("store")
    p.add_argument("--model", choices=["tcn", "vgg"], default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--resume", action="store_true", help="continue from the run directory's last checkpoint")
    p.add_argument("--allow-config-change", action="store_true",
                   help="with --resume: go on even where the settings differ from the run's config.json")

    p = add("simulate", cmd_simulate, "Flower simulation on Ray; writes a run directory")
    p.add_argument("store")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--fraction", type=float, default=None)
    p.add_argument("--local-epochs", type=int, default=None)
    p.add_argument("--strategy", default=None)
    p.add_argument("--ray-address", default=None, help="join this Ray cluster (auto, or host:port)")
    p.add_argument("--ray-timeout-s", type=float, default=None,
                   help="give up joining the cluster after this many seconds (default 30)")
    p.add_argument("--central", default=None, help="central run directory to compare against in the plots")
    p.add_argument("--out", default=None)
    p.add_argument("--resume", default=None, metavar="RUN", help="continue a killed run")
    p.add_argument("--allow-config-change", action="store_true",
                   help="with --resume: go on even where the settings differ from the run's config.json")

    p = add("server", cmd_server, "a federation of laptops: Flower SuperLink with TLS and SuperNode authentication")
    p.add_argument("--make-certs", default=None, metavar="DIR", help="write a self-signed CA and server certificate")
    p.add_argument("--hosts", nargs="+", default=["localhost", "127.0.0.1"],
                   help="with --make-certs: the names and addresses laptops reach the server at")
    p.add_argument("--certs", default=None, metavar="DIR", help="ca.crt, server.pem, server.key")
    p.add_argument("--initial", default=None, metavar="MODEL", help="the model file the federation starts from")
    p.add_argument("--store", default=None, help="a feature store to evaluate the global model on (optional)")
    p.add_argument("--register", nargs="*", default=[], metavar="NODE.pub", help="laptops' public keys to allow")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=9093)
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--min-clients", type=int, default=None, help="laptops that must be connected for a round")
    p.add_argument("--round-timeout-s", type=float, default=None, help="updates later than this count as failed")
    p.add_argument("--out", default=None)

    p = add("join", cmd_join, "join a federation with a profile: trains on it there, sends weight updates only",
            seed=False, config=False)
    p.add_argument("profile")
    p.add_argument("--server", default=None, metavar="HOST:PORT")
    p.add_argument("--ca", default=None, metavar="CA.crt", help="the federation's CA certificate")
    p.add_argument("--opt-in", action="store_true", help="agree that this profile trains the global model")
    p.add_argument("--opt-out", action="store_true", help="withdraw the agreement")

    p = add("evaluate", cmd_evaluate, "clip-level metrics on a split", seed=False, config=False)
    p.add_argument("model")
    p.add_argument("store")
    p.add_argument("--split", choices=["val", "eval", "train"], default="val")
    p.add_argument("--json", default=None)

    p = add("sweep", cmd_sweep, "Ray Tune grid over federated parameters")
    p.set_defaults(config=CONFIG_DIR / "sweep" / "fsd_fed_grid.toml")
    p.add_argument("store")
    p.add_argument("--ray-address", default=None, help="join this Ray cluster (auto, or host:port)")
    p.add_argument("--ray-timeout-s", type=float, default=None,
                   help="give up joining the cluster after this many seconds (default 30)")
    p.add_argument("--max-concurrent", type=int, default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--resume", action="store_true")

    p = add("export", cmd_export, "global model -> detector bundle")
    p.add_argument("model")
    p.add_argument("bundle")
    p.add_argument("--store", default=None, help="feature store to take background patches from")
    p.add_argument("--background-patches", type=int, default=None,
                   help="train patches to carry as aggressors for personalization (default 128; at most 4 MB)")
    p.add_argument("--onnx", action="store_true",
                   help="also write the portable detector: the streaming step as ONNX and the frontend's arrays")
    p.add_argument("--exclude-labels", nargs="+", default=[], metavar="LABEL",
                   help="leave out patches of clips with these labels (sounds users may choose as triggers)")

    p = add("enroll", cmd_enroll, "records or imports a user's example sounds (or background material)",
            seed=False, config=False)
    p.add_argument("profile")
    p.add_argument("--sound", default=None, help="name of the sound (e.g. pop, click, hiss)")
    p.add_argument("--record", type=int, default=None, metavar="N", help="record N takes from the microphone")
    p.add_argument("--from-files", nargs="+", default=None, metavar="FILE", help="import audio files")
    p.add_argument("--background", action="store_true", help="room noise / your own speech, not a sound")
    p = add("personalize", cmd_personalize, "private fine-tuning on the laptop")
    p.set_defaults(config=CONFIG_DIR / "detector" / "personalize.toml")
    p.add_argument("profile")
    p.add_argument("--bundle", default=None,
                   help="global detector bundle (default: the one used last time, else the one fedsound ships)")
    p.add_argument("--latency", choices=LATENCY_CHOICES, default=None,
                   help="faster detection against more false triggers (default: the config's, safe); every choice "
                        "is calibrated and kept, and listen --latency switches")

    p = add("listen", cmd_listen, "streaming detection from microphone or file; events as JSON lines", seed=False)
    p.add_argument("source", metavar="PROFILE-or-BUNDLE", nargs="?")
    p.add_argument("--input", default="mic", help="'mic' or an audio file")
    p.add_argument("--device", default=None, metavar="N-or-NAME",
                   help="input device (index or name; default: the system's default input), at its native rate")
    p.add_argument("--list-devices", action="store_true", help="list input devices with their native rates")
    p.add_argument("--latency", choices=LATENCY_CHOICES, default=None,
                   help="a personal bundle's other latency choice (default: the one it was personalized with)")
    p.add_argument("--engine", choices=["auto", "torch", "onnx"], default="auto",
                   help="torch, or onnx: the bundle's portable files (numpy + onnxruntime); auto: torch if installed")
    p.add_argument("--realtime", action="store_true", help="pace a file at real time")
    p.add_argument("--json", action="store_true", help="events as JSON lines only")
    p.add_argument("--exec", action="append", metavar="LABEL=COMMAND", help="run COMMAND on each LABEL event")

    p = add("bench", cmd_bench, "the project's own benchmarks", seed=False)
    p.add_argument("what", choices=["prep", "train", "sim", "sweep", "stream", "global", "personalize", "privacy",
                                    "deploy"])
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke run)")
    p.add_argument("--out", default=None, help="JSON file for the figures")
    p.add_argument("--benchmarks", type=Path, default=None, metavar="DIR",
                   help="the source checkout's benchmarks/ folder (default: beside the package, or ./benchmarks)")
    p.add_argument("--users", type=_users, default=None, metavar="test|tuning|SEED,SEED,...",
                   help="bench personalize: the synthetic users to run (default: the protocol's test users)")
    p.add_argument("--aggressor-hours", type=float, default=None, metavar="H",
                   help="bench personalize: hours of synthetic aggressor-only audio per user (default 1; "
                        "--real-audio adds 0.5 h of real speech and 0.25 h of real music)")
    p.add_argument("--examples", type=_distinct_integers, default=None, metavar="N,N,...",
                   help="bench personalize: enrollment examples per sound, one profile each (default 10,5; "
                        "10 alone halves the time a screen of settings takes)")
    p.add_argument("--real-audio", default=None, metavar="DIR",
                   help="bench global, personalize: real recordings (`fedsound data real-audio DIR`): train split "
                        "in the global model's background; test split (test users) or tune split (others) "
                        "as aggressors")
    p.add_argument("--central", action="store_true", help="bench global: also train centrally and report the gap")
    p.add_argument("--ship", action="store_true", help="bench global: copy the bundle into the package")
    p.add_argument("--ablate", action="store_true",
                   help="bench personalize: also each calibration rule switched off, on the same fine-tuned models")
    return parser


class _Interrupts:
    """SIGINT and SIGTERM stop a command the way Ctrl-C does: the first raises KeyboardInterrupt in the main thread,
    so the command unwinds (files are written atomically, locks are released); a second one exits at once."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.previous: dict[int, object] = {}
        self.owner = os.getpid()

    def __enter__(self) -> _Interrupts:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: object) -> None:
        if os.getpid() != self.owner:  # a forked worker (prep's pool) keeps Python's defaults
            if signum == signal.SIGTERM:
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
                return
            raise KeyboardInterrupt
        if self.received is not None:
            os.write(2, b"interrupted again: exiting now\n")
            os._exit(128 + signum)
        self.received = signum
        # Flower's worker threads go on until the simulation is torn down, and would log every message cut short
        # as an error with its traceback: the command is stopping, so they are silenced.
        logging.getLogger("flwr").disabled = True
        raise KeyboardInterrupt

    def exit_status(self) -> int:
        """128 + the signal that stopped the command (SIGINT when Ray turned SIGTERM into an exit)."""
        return 128 + (self.received or signal.SIGINT)


def _stop_ray() -> None:
    """Shut down a Ray connection an interrupted command left open (a local Ray's processes go with it)."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


def _exit_now(status: int) -> None:
    """End an interrupted process whose Flower or Ray threads are still running: their C++ parts abort the
    interpreter's shutdown, so exit at once, after the streams are flushed (locks go with the descriptors)."""
    if "flwr" in sys.modules or "ray" in sys.modules:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fedsound`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from fl.runtime import configure_environment, configure_logging

    configure_logging(args.verbosity)
    configure_environment(Path(args.workdir))
    with _Interrupts() as interrupts:
        try:
            return int(args.handler(args) or 0)
        except FedsoundError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            _stop_ray()
            print("interrupted" if interrupts.received != signal.SIGTERM else "terminated", file=sys.stderr)
            _exit_now(interrupts.exit_status())
            return interrupts.exit_status()
        except SystemExit as exc:  # Ray's own SIGTERM handler exits with the signal number
            if exc.code == signal.SIGTERM:
                _stop_ray()
                print("terminated", file=sys.stderr)
                _exit_now(128 + signal.SIGTERM)
                return 128 + signal.SIGTERM
            raise
        except BrokenPipeError:  # the reader of stdout went away (`| head`): stop quietly
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 128 + signal.SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
