"""What a laptop trains on in a real federation: its own profile, turned into labelled 1-s patches on the laptop.

A profile takes part only after its owner opted in (``fedsound join PROFILE --opt-in``), which is recorded in
``PROFILE/federation.json`` (0600) and can be withdrawn (``--opt-out``). Its takes never leave the laptop: the
ClientApp computes patches here and sends back weights only.

Each take is framed with the global model's frontend and cut into the store's patches (``patch-frames``, a new one
every ``patch-hop``). A sound take's patch is labelled with the sound when it overlaps the take's enrolled energy
segments (the frames that carry the sound), else as background; a sound whose name is not one of the global
model's labels is left out. Background takes give background patches (the label ``background`` where the model has
one, else no label).
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from clients.detector.profile import Profile, ProfileError, write_private
from fl.config import FrontendConfig
from fl.frontend import Frontend, n_segments, patch_frame_indices

OPT_IN = "federation.json"
BACKGROUND_LABEL = "background"


def opted_in(profile: Path) -> bool:
    """Whether the profile's owner agreed to train the global model with it."""
    path = Path(profile) / OPT_IN
    try:
        return bool(json.loads(path.read_text(encoding="utf-8")).get("opted_in"))
    except (OSError, ValueError, AttributeError):
        return False


def record_opt_in(profile: Path, server: str, opted: bool = True) -> Path:
    """Record (or, with ``opted=False``, withdraw) the owner's agreement to train with ``server``."""
    Profile.load(Path(profile))  # a profile, not any folder
    path = Path(profile) / OPT_IN
    stamp = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    write_private(path, (json.dumps({"opted_in": opted, "server": server, "at": stamp}, indent=2) + "\n").encode())
    return path


def profile_patches(profile: Path, frontend: FrontendConfig, labels: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """The profile's patches ``[n, patch_frames, n_mels]`` and multi-hot targets ``[n, len(labels)]`` (module
    docstring); a ProfileError when the owner has not opted in or nothing in it matches the labels."""
    profile = Path(profile)
    if not opted_in(profile):
        raise ProfileError(f"{profile}: its owner has not opted in to federated training "
                           "(fedsound join PROFILE --opt-in)")
    store = Profile.load(profile)
    maker = Frontend(frontend)
    index = {label: k for k, label in enumerate(labels)}
    patches, targets = [], []

    def add(wave: np.ndarray, rate: int, sound: int | None, segments: Sequence[Sequence[float]]) -> None:
        frames = maker.frames(wave, rate)
        count = n_segments(len(frames), frontend)
        rows = patch_frame_indices(np.zeros(count), np.full(count, len(frames)), np.arange(count), frontend)
        for patch_rows in rows:
            first_s, last_s = patch_rows.min() * frontend.frame_s, (patch_rows.max() + 1) * frontend.frame_s
            target = np.zeros(len(labels), dtype=np.float32)
            if sound is not None and any(a < last_s and b > first_s for a, b in segments):
                target[sound] = 1.0
            elif BACKGROUND_LABEL in index:
                target[index[BACKGROUND_LABEL]] = 1.0
            patches.append(frames[patch_rows])
            targets.append(target)

    for name, examples in sorted(store.sounds.items()):
        if name in index:
            for example in examples:
                add(*store.read(example), index[name], example.segments)
    if not patches:
        raise ProfileError(f"{profile}: no enrolled sound is one of the global model's labels "
                           f"({', '.join(labels)})")
    for example in store.background:
        add(*store.read(example), None, [])
    return np.stack(patches).astype(np.float32), np.stack(targets)


def patch_batches(patches: np.ndarray, targets: np.ndarray, batch_size: int, rng: np.random.Generator
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor, None]]:
    """Shuffled batches of in-memory patches, as :func:`fl.train.train_batches` takes them."""
    order = rng.permutation(len(patches))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        yield torch.from_numpy(patches[rows]), torch.from_numpy(targets[rows]), None
