"""``fedsound server`` and ``fedsound join``: a real federation of laptops on Flower's Deployment Engine.

The server runs Flower's SuperLink with TLS (a certificate of the server signed by a CA the laptops trust;
``make_certs`` makes a self-signed CA for a private federation) and SuperNode authentication (only SuperNodes whose
public key the operator registered may connect), then submits the global mouth-sound run: the ServerApp of
:mod:`server.server_app` in its ``profiles`` federation, starting from an initial model file. A laptop joins with
its profile: after its owner opted in, a SuperNode connects with the profile's own key (made on first use, kept
in the profile) and runs the ClientApp on that profile; the takes never leave it, only weight updates do.

The run is submitted as a small Flower app written into the server's workdir (``app/pyproject.toml``: the
installed ``server`` and ``clients`` components and the run's settings), so an installed fedsound serves without a
source checkout. Flower's files (its configuration, the SuperLink's state) stay under the workdir.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import tomli_w

from clients.detector.profile import Profile, make_private_dir, write_private
from clients.profile_training import opted_in, record_opt_in
from fl.config import Config, to_dict
from fl.errors import ConfigError, FedsoundError

CONNECTION = "fedsound"
CA_CERT, SERVER_CERT, SERVER_KEY = "ca.crt", "server.pem", "server.key"
NODE_KEY, NODE_PUB = "node.key", "node.pub"
START_WAIT_S = 60.0


class DeployError(FedsoundError):
    """The server or a node cannot start: missing certificates or keys, a port in use, no opt-in."""


def _bin(name: str) -> str:
    """A Flower command of this environment (beside the running Python)."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        found = shutil.which(name)
        if found is None:
            raise DeployError(f"{name} not found: install fedsound's dependencies (flwr) in this environment")
        return found
    return str(path)


def make_certs(folder: Path, hosts: Sequence[str] = ("localhost", "127.0.0.1"), days: int = 365) -> Path:
    """A self-signed CA and a server certificate for ``hosts`` (names or IP addresses), in ``folder``: ``ca.crt``
    (give it to the laptops), ``server.pem`` and ``server.key`` (0600). Returns ``folder``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key, server_key = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedsound federation CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now)
          .not_valid_after(now + datetime.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    names = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    server = (x509.CertificateBuilder()
              .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
              .issuer_name(ca_name).public_key(server_key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=days))
              .add_extension(x509.SubjectAlternativeName(names), critical=False).sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    (folder / CA_CERT).write_bytes(ca.public_bytes(pem))
    (folder / SERVER_CERT).write_bytes(server.public_bytes(pem))
    key_bytes = server_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    write_private(folder / SERVER_KEY, key_bytes)
    return folder


def node_keys(profile: Path) -> tuple[Path, Path]:
    """The profile's SuperNode key pair (OpenSSH EC P-384; the private key 0600), made on first use."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    private, public = Path(profile) / NODE_KEY, Path(profile) / NODE_PUB
    if not private.exists():
        key = ec.generate_private_key(ec.SECP384R1())
        write_private(private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                 serialization.NoEncryption()))
        write_private(public, key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                            serialization.PublicFormat.OpenSSH) + b"\n")
    return private, public


def _flower_env(workdir: Path) -> dict[str, str]:
    """Flower's processes: its files under the workdir, no telemetry, and this environment's commands first on
    the PATH (the SuperLink and SuperNode start Flower's own helper commands by name)."""
    env = dict(os.environ)
    env.update(FLWR_HOME=str(Path(workdir).resolve() / ".flwr"), FLWR_TELEMETRY_ENABLED="0",
               FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
               PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]))
    return env


def _wait_for_port(host: str, port: int, process: subprocess.Popen, what: str, log: Path) -> None:
    deadline = time.monotonic() + START_WAIT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise DeployError(f"{what} stopped at start (exit {process.returncode}); see {log}")
        try:
            socket.create_connection((host, port), timeout=1.0).close()
            return
        except OSError:
            time.sleep(0.2)
    raise DeployError(f"{what} did not start listening on {host}:{port} within {START_WAIT_S:g} s; see {log}")


def _flwr(args: Sequence[str], workdir: Path, timeout: float | None = 120.0) -> subprocess.CompletedProcess:
    result = subprocess.run([_bin("flwr"), *args], env=_flower_env(workdir), capture_output=True, text=True,
                            timeout=timeout)
    if result.returncode != 0:
        reason = (result.stderr.strip() or result.stdout.strip()).splitlines()[-1:] or ["?"]
        raise DeployError(f"flwr {args[0]} {args[1] if len(args) > 1 else ''}: {reason[0]}")
    return result


class Server:
    """A running SuperLink with TLS and SuperNode authentication (use as a context manager)."""

    def __init__(self, certs: Path, workdir: Path, host: str = "127.0.0.1", port: int = 9093) -> None:
        self.certs, self.workdir = Path(certs), Path(workdir).resolve()
        self.host, self.port = host, port
        for name in (CA_CERT, SERVER_CERT, SERVER_KEY):
            if not (self.certs / name).is_file():
                raise DeployError(f"{self.certs / name}: missing (make them with fedsound server --make-certs DIR)")
        self.log = self.workdir / "superlink.log"
        self.process: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        """Where laptops connect (``HOST:PORT``)."""
        return f"{self.host}:{self.port}"

    def __enter__(self) -> Server:
        self.workdir.mkdir(parents=True, exist_ok=True)
        home = self.workdir / ".flwr"
        home.mkdir(exist_ok=True)
        connect_host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        (home / "config.toml").write_text(tomli_w.dumps({"superlink": {
            "default": CONNECTION, CONNECTION: {"address": f"{connect_host}:{self.port}",
                                                "root-certificates": str((self.certs / CA_CERT).resolve())}}}))
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [_bin("flower-superlink"), "--ssl-ca-certfile", str(self.certs / CA_CERT),
                 "--ssl-certfile", str(self.certs / SERVER_CERT), "--ssl-keyfile", str(self.certs / SERVER_KEY),
                 "--enable-supernode-auth", "--database", str(self.workdir / "superlink.db"),
                 "--disable-runtime-dependency-installation", "--host", self.host, "--port", str(self.port)],
                env=_flower_env(self.workdir), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)
        try:
            _wait_for_port(connect_host, self.port, self.process, "the SuperLink", self.log)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop the SuperLink (and the ServerApp processes it started)."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def register(self, public_key: Path) -> str:
        """Allow the SuperNode with this public key to connect; returns its node id."""
        result = _flwr(["supernode", "register", str(public_key), CONNECTION, "--format", "json"], self.workdir)
        import json

        return str(json.loads(result.stdout)["node-id"])

    def run(self, config: Config, initial: Path, out: Path, store: Path | None = None,
            timeout: float | None = None) -> subprocess.CompletedProcess:
        """Submit the profiles federation (the run's settings in a generated app) and stream it to the end."""
        app = self.workdir / "app"
        app.mkdir(exist_ok=True)
        settings = {"federation": "profiles", "initial": str(Path(initial).resolve()), "out": str(Path(out).resolve()),
                    "store": str(Path(store).resolve()) if store else "", "seed": config.seed}
        settings.update({section: to_dict(getattr(config, section)) for section in ("train", "federated")})
        (app / "pyproject.toml").write_text(tomli_w.dumps({
            "build-system": {"requires": ["setuptools>=77"], "build-backend": "setuptools.build_meta"},
            "project": {"name": "fedsound-federation", "version": "1.0.0", "dependencies": []},
            "tool": {"flwr": {"app": {"publisher": "fedsound",
                                      "components": {"serverapp": "server.server_app:app",
                                                     "clientapp": "clients.client_app:app"},
                                      "config": settings}}}}))
        return _flwr(["run", str(app), CONNECTION, "--stream"], self.workdir, timeout=timeout)


def serve(certs: Path, workdir: Path, config: Config, initial: Path, out: Path, host: str = "127.0.0.1",
          port: int = 9093, register: Sequence[Path] = (), store: Path | None = None) -> int:
    """``fedsound server``: start the SuperLink, register the given laptops' keys, run the federation to its end."""
    if not Path(initial).is_file():
        raise ConfigError(f"--initial: model file not found: {initial}")
    with Server(certs, workdir, host, port) as server:
        for key in register:
            print(f"registered {key}: node {server.register(Path(key))}", flush=True)
        print(f"SuperLink at {server.address} (TLS, registered SuperNodes only); waiting for "
              f"{config.federated.min_clients} laptops to join, then {config.federated.rounds} rounds", flush=True)
        result = server.run(config, initial, out, store)
        print(result.stdout.strip()[-2000:], flush=True)
    return 0


def join(profile: Path, server: str, ca: Path, workdir: Path, opt_in: bool = False, port: int = 0,
         max_wait_s: float | None = None) -> subprocess.Popen:
    """Start a SuperNode for ``profile`` connected to ``server`` (``HOST:PORT``, TLS checked against ``ca``); its
    owner must have opted in (``opt_in`` records it). Returns the running SuperNode process."""
    profile = Path(profile)
    Profile.load(profile)
    if opt_in:
        record_opt_in(profile, server)
    if not opted_in(profile):
        raise DeployError(f"{profile}: its owner has not opted in; run fedsound join {profile} --server {server} "
                          "--opt-in to let its takes train the global model (they stay on this computer)")
    if not Path(ca).is_file():
        raise DeployError(f"{ca}: the federation's CA certificate is missing (ask the server's operator)")
    private, _ = node_keys(profile)
    runtime_port = port or _free_port()
    make_private_dir(Path(workdir))
    log = Path(workdir) / "supernode.log"
    args = [_bin("flower-supernode"), "--superlink", server, "--root-certificates", str(ca),
            "--auth-supernode-private-key", str(private), "--node-config", f'profile="{profile.resolve()}"',
            "--port", str(runtime_port)]
    if max_wait_s is not None:
        args += ["--max-wait-time", str(max_wait_s)]
    with open(log, "ab") as handle:
        return subprocess.Popen(args, env=_flower_env(workdir), stdout=handle, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
