"""A real federation on loopback: certificates, node keys, opt-in, profile patches, and the whole scenario of
``fedsound bench deploy`` (TLS, authentication, a node killed mid-round, central DP)."""

from __future__ import annotations

import ipaddress
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import REPO
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key

from clients.detector.enroll import enroll
from clients.detector.profile import ProfileError
from clients.profile_training import opted_in, profile_patches, record_opt_in
from data_prep.mouth_sounds import background_take, enrollment_take, make_voice
from fedsound.deploy import DeployError, join, make_certs, node_keys
from fl.config import CONFIG_DIR, load_config

LABELS = ["pop", "click", "hiss", "background"]


@pytest.fixture(scope="module")
def profile(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("laptop")
    voice = make_voice(501)
    for k, sound in enumerate(("pop", "tsk")):
        files = []
        for i in range(2):
            take = enrollment_take("click" if sound == "tsk" else sound, voice, [k, i])
            files.append(root / f"{sound}{i}.wav")
            sf.write(files[-1], take.wave, take.sample_rate, subtype="PCM_16")
        enroll(root / "profile", sound=sound, from_files=files, progress=False)
    room = background_take(voice, [9], seconds=3.0)
    sf.write(root / "room.wav", room.wave, room.sample_rate, subtype="PCM_16")
    enroll(root / "profile", background=True, from_files=[root / "room.wav"], progress=False)
    return root / "profile"


def test_the_certificates_chain_to_their_ca_and_name_the_hosts(tmp_path):
    folder = make_certs(tmp_path / "certs", hosts=["fed.example.org", "127.0.0.1"])
    ca = x509.load_pem_x509_certificate((folder / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((folder / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["fed.example.org"]
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert stat.S_IMODE(os.stat(folder / "server.key").st_mode) == 0o600


def test_make_certs_from_the_command_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "fedsound.cli", "server", "--make-certs", str(tmp_path / "c"),
                             "--workdir", str(tmp_path / "w")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and (tmp_path / "c" / "ca.crt").is_file(), result.stderr


def test_a_profile_keeps_its_own_private_node_key(profile):
    private, public = node_keys(profile)
    assert node_keys(profile) == (private, public)  # made once
    assert stat.S_IMODE(os.stat(private).st_mode) == 0o600
    key = load_ssh_private_key(private.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and public.read_text().startswith("ecdsa-sha2-nistp384 ")


def test_nothing_trains_or_joins_without_the_owners_opt_in(profile, tmp_path):
    frontend = load_config(CONFIG_DIR / "features" / "lea16k.toml").frontend
    record_opt_in(profile, "127.0.0.1:1", opted=False)
    assert not opted_in(profile)
    with pytest.raises(ProfileError, match="has not opted in"):
        profile_patches(profile, frontend, LABELS)
    with pytest.raises(DeployError, match="has not opted in"):
        join(profile, "127.0.0.1:1", tmp_path / "ca.crt", tmp_path / "join")
    record_opt_in(profile, "127.0.0.1:1")
    assert opted_in(profile) and stat.S_IMODE(os.stat(profile / "federation.json").st_mode) == 0o600


def test_profile_patches_carry_the_global_labels(profile):
    frontend = load_config(CONFIG_DIR / "features" / "lea16k.toml").frontend
    record_opt_in(profile, "127.0.0.1:1")
    patches, targets = profile_patches(profile, frontend, LABELS)
    assert patches.shape[1:] == (frontend.patch_frames, frontend.n_mels) and len(patches) == len(targets)
    assert targets.sum(axis=1).max() == 1  # one label a patch
    pops, backgrounds = targets[:, 0].sum(), targets[:, 3].sum()
    assert pops >= 2 and backgrounds > pops  # takes' quiet ends and the room are background
    assert targets[:, 1:3].sum() == 0  # 'tsk' is not a global label: its takes are left out
    assert np.isfinite(patches).all()


@pytest.mark.slow
def test_a_real_federation_on_loopback(tmp_path):
    """The deploy benchmark's scenario, quick: three laptops through TLS and authentication, an unregistered and
    a plaintext SuperNode refused, a node killed in round 2, every round completed, epsilon accounted."""
    from benchmarks.deploy.bench import ROUNDS, run_deploy_bench

    report = run_deploy_bench(tmp_path, quick=True, out_json=tmp_path / "deploy.json")
    assert report["rounds_completed"] == ROUNDS and report["tls"]
    assert report["unauthenticated_refused"] and report["plaintext_refused"]
    assert report["node_killed_round_completed"]
    assert report["epsilon"] > 0 and report["bytes_per_update"] > 0
    assert all(r["clients_failed"] == 0 for r in report["records"] if r["round"] != 2)
