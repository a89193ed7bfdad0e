"""Joining an existing Ray cluster by address, within a bounded time.

``ray.init(address=...)`` keeps retrying an address where no cluster answers, and does not stop on SIGTERM.
:func:`check_ray_address` tries the address first, in a child process that is killed after the timeout, so a
wrong address is a one-line error after at most ``federated.ray-timeout-s`` seconds.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

from fl.errors import ConfigError

_PROBE = "import sys, ray; ray.init(address=sys.argv[1], log_to_driver=False); ray.shutdown()"


def _host_port(address: str) -> tuple[str, int] | None:
    """``host:port`` of an address (``ray://`` prefix allowed); None for ``auto`` and other forms."""
    bare = address.split("://", 1)[-1]
    host, sep, port = bare.rpartition(":")
    return (host.strip("[]") or "127.0.0.1", int(port)) if sep and port.isdigit() else None


def check_ray_address(address: str, timeout_s: float) -> None:
    """Join the Ray cluster at ``address`` and leave again, within ``timeout_s`` seconds; a one-line ConfigError
    naming ``federated.ray-address`` if nothing listens there or no cluster answers in time."""
    target = _host_port(address)
    if target is not None:
        try:
            socket.create_connection(target, timeout=min(timeout_s, 10.0)).close()
        except OSError as exc:
            raise ConfigError(f"federated.ray-address: nothing answers at {address} ({exc.strerror or exc}); "
                              "start the cluster's head with `ray start --head`, or fix the address") from None
    probe = subprocess.Popen([sys.executable, "-c", _PROBE, address], stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, stderr = probe.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(probe.pid, signal.SIGKILL)
        probe.wait()
        raise ConfigError(f"federated.ray-address: no Ray cluster answered at {address} within {timeout_s:g} s "
                          "(federated.ray-timeout-s)") from None
    except BaseException:
        os.killpg(probe.pid, signal.SIGKILL)
        probe.wait()
        raise
    if probe.returncode != 0:
        lines = [line for line in stderr.splitlines() if line.strip()]
        reason = lines[-1].strip() if lines else f"exit status {probe.returncode}"
        raise ConfigError(f"federated.ray-address: cannot join the Ray cluster at {address}: {reason}")
