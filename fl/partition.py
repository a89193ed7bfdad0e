"""Split the clip table of a feature store into simulated federated clients.

Three methods:

- ``uploader``: one client per Freesound uploader with at least ``min_clips`` clips (fsd_fed's
  ``uploader_min``); clips of smaller uploaders are dropped. Clients are ordered by descending clip count,
  then uploader name.
- ``iid``: the clips are shuffled with the seed and dealt into ``n_clients`` parts whose sizes differ by at
  most one clip.
- ``dirichlet``: label skew. Each clip is assigned to the group of its primary label, the lowest-index
  positive class (clips without any positive label form one extra group). Each group's clips are shuffled
  and split among the clients with proportions drawn from Dirichlet(alpha, ..., alpha). A client left empty
  afterwards receives one clip taken at random from the currently largest client, so no client is empty.

Every method is deterministic given its arguments and seed. Each client's clip indices (rows of the clip
table) are sorted.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.spatial.distance import jensenshannon

from fl.config import Config
from fl.errors import ConfigError, DataError
from fl.store import FeatureStore

METHODS = ("uploader", "iid", "dirichlet")
REQUIRED_COLUMNS = ("fname", "uploader", "n_segs")
_PLAN_KEYS = ("method", "seed", "params", "clients", "names")


@dataclass
class PartitionPlan:
    """Assignment of clip-table rows to clients.

    ``clients[k]`` holds the sorted row indices owned by client ``k``, ``names[k]`` its name (the uploader for
    ``uploader`` partitions, ``client-0007`` style otherwise). ``seed`` is 0 for uploader partitions, which
    use no randomness.
    """

    method: str
    seed: int
    params: dict
    clients: list[np.ndarray] = field(repr=False)
    names: list[str] = field(repr=False)

    @property
    def n_clients(self) -> int:
        """Number of clients."""
        return len(self.clients)

    def n_patches(self, n_segs: np.ndarray) -> np.ndarray:
        """Patches per client, given the per-clip patch counts ``n_segs`` (the clip table's column)."""
        n_segs = np.asarray(n_segs, dtype=np.int64)
        return np.array([int(n_segs[idx].sum()) for idx in self.clients], dtype=np.int64)

    def save(self, path: Path) -> None:
        """Write the plan as JSON; the file is replaced atomically, so an old plan survives a failed write."""
        path = Path(path)
        payload = {
            "method": self.method,
            "seed": int(self.seed),
            "params": self.params,
            "names": list(self.names),
            "clients": [[int(i) for i in idx] for idx in self.clients],
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(payload, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp_name, path)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: Path) -> PartitionPlan:
        """Read a plan written by :meth:`save`; raises DataError naming the file if it is malformed."""
        path = Path(path)
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DataError(f"{path}: partition plan not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: not a valid partition plan JSON ({e})") from None
        if not isinstance(payload, dict):
            raise DataError(f"{path}: partition plan must be a JSON object")
        missing = [key for key in _PLAN_KEYS if key not in payload]
        if missing:
            raise DataError(f"{path}: partition plan lacks key(s) {', '.join(missing)}")
        clients, names = payload["clients"], payload["names"]
        if not isinstance(clients, list) or not all(
            isinstance(idx, list) and all(isinstance(i, int) and i >= 0 for i in idx) for idx in clients
        ):
            raise DataError(f"{path}: 'clients' must be a list of lists of non-negative integers")
        if not isinstance(names, list) or len(names) != len(clients):
            raise DataError(f"{path}: 'names' must be a list with one name per client ({len(clients)})")
        if payload["method"] not in METHODS:
            raise DataError(f"{path}: unknown partition method {payload['method']!r}")
        if not isinstance(payload["seed"], int) or not isinstance(payload["params"], dict):
            raise DataError(f"{path}: 'seed' must be an integer and 'params' an object")
        return cls(
            method=payload["method"],
            seed=payload["seed"],
            params=payload["params"],
            clients=[np.array(sorted(idx), dtype=np.int64) for idx in clients],
            names=[str(name) for name in names],
        )


def _check_clips(clips: pd.DataFrame) -> None:
    missing = [col for col in REQUIRED_COLUMNS if col not in clips.columns]
    if missing:
        raise DataError(f"clip table lacks column(s) {', '.join(missing)}")


def _check_labels(clips: pd.DataFrame, labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.shape[0] != len(clips):
        raise DataError(f"labels must be [n_clips={len(clips)}, n_classes], got shape {labels.shape}")
    return labels


def _check_n_clients(n_clients: int, n_clips: int) -> None:
    if not 1 <= n_clients <= n_clips:
        raise ConfigError(f"n_clients must be between 1 and the number of clips ({n_clips}), got {n_clients}")


def _numbered_names(n_clients: int) -> list[str]:
    return [f"client-{k:04d}" for k in range(n_clients)]


def partition_by_uploader(clips: pd.DataFrame, min_clips: int = 1) -> PartitionPlan:
    """One client per uploader with at least ``min_clips`` clips, largest first (ties by uploader name)."""
    _check_clips(clips)
    if min_clips < 1:
        raise ConfigError(f"min_clips must be >= 1, got {min_clips}")
    uploaders = clips["uploader"].astype(str).to_numpy()
    names, inverse, counts = np.unique(uploaders, return_inverse=True, return_counts=True)
    keep = np.flatnonzero(counts >= min_clips)
    if keep.size == 0:
        raise DataError(f"no uploader has at least {min_clips} clips (largest has {counts.max(initial=0)})")
    order = keep[np.lexsort((names[keep], -counts[keep]))]
    return PartitionPlan(
        method="uploader",
        seed=0,
        params={"min_clips": int(min_clips)},
        clients=[np.flatnonzero(inverse == u) for u in order],
        names=[str(names[u]) for u in order],
    )


def partition_iid(clips: pd.DataFrame, n_clients: int, seed: int) -> PartitionPlan:
    """Shuffle the clips with ``seed`` and deal them into ``n_clients`` parts of near-equal clip count."""
    _check_clips(clips)
    _check_n_clients(n_clients, len(clips))
    order = np.random.default_rng(seed).permutation(len(clips))
    return PartitionPlan(
        method="iid",
        seed=int(seed),
        params={"n_clients": int(n_clients)},
        clients=[np.sort(part) for part in np.array_split(order, n_clients)],
        names=_numbered_names(n_clients),
    )


def primary_labels(labels: np.ndarray) -> np.ndarray:
    """Lowest-index positive class of each clip, or -1 for a clip without positive labels."""
    positive = np.asarray(labels) > 0
    return np.where(positive.any(axis=1), positive.argmax(axis=1), -1)


def partition_dirichlet(
    clips: pd.DataFrame, labels: np.ndarray, n_clients: int, alpha: float, seed: int
) -> PartitionPlan:
    """Label-skewed split: each primary-label group is divided among clients by Dirichlet(alpha) shares."""
    _check_clips(clips)
    labels = _check_labels(clips, labels)
    _check_n_clients(n_clients, len(clips))
    if not (alpha > 0 and math.isfinite(alpha)):
        raise ConfigError(f"alpha must be a positive finite number, got {alpha}")
    rng = np.random.default_rng(seed)
    primary = primary_labels(labels)
    owner = np.empty(len(clips), dtype=np.int64)
    for group in np.unique(primary):
        members = rng.permutation(np.flatnonzero(primary == group))
        shares = rng.dirichlet(np.full(n_clients, float(alpha)))
        cuts = np.floor(np.cumsum(shares)[:-1] * members.size).astype(np.int64)
        for k, part in enumerate(np.split(members, cuts)):
            owner[part] = k
    sizes = np.bincount(owner, minlength=n_clients)
    for empty in np.flatnonzero(sizes == 0):
        donor = int(np.argmax(sizes))
        moved = rng.choice(np.flatnonzero(owner == donor))
        owner[moved] = empty
        sizes[donor] -= 1
        sizes[empty] += 1
    return PartitionPlan(
        method="dirichlet",
        seed=int(seed),
        params={"n_clients": int(n_clients), "alpha": float(alpha)},
        clients=[np.flatnonzero(owner == k) for k in range(n_clients)],
        names=_numbered_names(n_clients),
    )


def make_partition(
    clips: pd.DataFrame,
    labels: np.ndarray,
    by: str = "uploader",
    min_clips: int = 1,
    n_clients: int = 10,
    alpha: float = 0.5,
    seed: int = 0,
) -> PartitionPlan:
    """Partition with method ``by`` (uploader, iid or dirichlet); irrelevant arguments are ignored."""
    if by == "uploader":
        return partition_by_uploader(clips, min_clips=min_clips)
    if by == "iid":
        return partition_iid(clips, n_clients=n_clients, seed=seed)
    if by == "dirichlet":
        return partition_dirichlet(clips, labels, n_clients=n_clients, alpha=alpha, seed=seed)
    raise ConfigError(f"unknown partition method {by!r}; choose one of {', '.join(METHODS)}")


def _quantiles(values: np.ndarray) -> dict[str, float]:
    points = np.quantile(values, [0.0, 0.25, 0.5, 0.75, 1.0]) if len(values) else [math.nan] * 5
    return {key: float(v) for key, v in zip(("min", "25%", "50%", "75%", "max"), points, strict=True)}


def summarize_partition(
    plan: PartitionPlan, clips: pd.DataFrame, labels: np.ndarray, class_names: list[str]
) -> dict:
    """Size and label-skew statistics of a partition.

    Label skew compares each client's label distribution (its positive-label counts, normalised) with the
    distribution over all clips of the table: ``label_js_mean`` is the mean Jensen-Shannon distance (base 2,
    in [0, 1]) and ``label_tv_mean`` the mean total-variation distance, both unweighted over clients with at
    least one positive label. ``uncovered_classes`` lists classes without any positive among the covered
    clips.
    """
    _check_clips(clips)
    labels = _check_labels(clips, labels)
    if len(class_names) != labels.shape[1]:
        raise DataError(f"class_names has {len(class_names)} names but labels has {labels.shape[1]} classes")
    n_segs = clips["n_segs"].to_numpy(dtype=np.int64)
    clips_per_client = np.array([len(idx) for idx in plan.clients], dtype=np.int64)
    patches_per_client = plan.n_patches(n_segs)
    covered = np.concatenate(plan.clients) if plan.clients else np.array([], dtype=np.int64)

    counts = labels.astype(np.float64)
    global_counts = counts.sum(axis=0)
    global_dist = global_counts / global_counts.sum() if global_counts.sum() > 0 else None
    js, tv = [], []
    for idx in plan.clients:
        client_counts = counts[idx].sum(axis=0)
        if global_dist is None or client_counts.sum() == 0:
            continue
        client_dist = client_counts / client_counts.sum()
        js.append(float(jensenshannon(client_dist, global_dist, base=2)))
        tv.append(float(0.5 * np.abs(client_dist - global_dist).sum()))

    covered_pos = counts[covered].sum(axis=0) > 0
    return {
        "method": plan.method,
        "seed": plan.seed,
        "params": dict(plan.params),
        "n_clients": plan.n_clients,
        "clips_per_client": _quantiles(clips_per_client),
        "patches_per_client": _quantiles(patches_per_client),
        "clips_covered": int(covered.size),
        "clips_total": int(len(clips)),
        "patches_covered": int(patches_per_client.sum()),
        "patches_total": int(n_segs.sum()),
        "label_js_mean": float(np.mean(js)) if js else math.nan,
        "label_tv_mean": float(np.mean(tv)) if tv else math.nan,
        "uncovered_classes": [str(class_names[c]) for c in np.flatnonzero(~covered_pos)],
    }


def format_summary(summary: dict) -> str:
    """Render :func:`summarize_partition` output as a readable multi-line text table."""
    params = ", ".join(f"{key}={value}" for key, value in summary["params"].items())
    lines = [
        f"partition: {summary['method']} ({params}), seed {summary['seed']}",
        f"clients: {summary['n_clients']}",
        f"clips covered: {summary['clips_covered']} / {summary['clips_total']}",
        f"patches covered: {summary['patches_covered']} / {summary['patches_total']}",
        "",
        f"{'per client':<12}" + "".join(f"{key:>10}" for key in ("min", "25%", "50%", "75%", "max")),
    ]
    for row in ("clips", "patches"):
        stats = summary[f"{row}_per_client"]
        lines.append(f"{row:<12}" + "".join(f"{stats[key]:>10.1f}" for key in stats))
    lines += [
        "",
        f"label skew vs global: Jensen-Shannon {summary['label_js_mean']:.3f}, "
        f"total variation {summary['label_tv_mean']:.3f}",
    ]
    uncovered = summary["uncovered_classes"]
    if uncovered:
        shown = ", ".join(uncovered[:10]) + (" ..." if len(uncovered) > 10 else "")
        lines.append(f"classes without any covered positive ({len(uncovered)}): {shown}")
    return "\n".join(lines)


def plot_partition(
    plan: PartitionPlan, clips: pd.DataFrame, labels: np.ndarray, out_png: Path, top_clients: int = 30
) -> None:
    """Save a PNG: histogram of patches per client (log x) and a client x class heatmap of label shares.

    The heatmap shows the ``top_clients`` clients with the most patches; each row is that client's positive
    labels normalised to sum to one. The file is replaced atomically.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    _check_clips(clips)
    labels = _check_labels(clips, labels)
    out_png = Path(out_png)
    patches = plan.n_patches(clips["n_segs"].to_numpy(dtype=np.int64))
    largest = np.argsort(-patches, kind="stable")[:top_clients]
    shares = np.array([labels[plan.clients[k]].sum(axis=0) for k in largest], dtype=np.float64)
    shares /= np.maximum(shares.sum(axis=1, keepdims=True), 1.0)

    fig = Figure(figsize=(12, 5), layout="constrained")
    FigureCanvasAgg(fig)
    hist_ax, heat_ax = fig.subplots(1, 2, width_ratios=(1, 2))
    positive = patches[patches > 0]
    if positive.size:
        bins = np.geomspace(positive.min(), positive.max() * 1.001 + 1, num=30)
        hist_ax.hist(positive, bins=bins)
    hist_ax.set_xscale("log")
    hist_ax.set_xlabel("patches per client")
    hist_ax.set_ylabel("clients")
    hist_ax.set_title(f"{plan.method}: {plan.n_clients} clients")
    image = heat_ax.imshow(shares, aspect="auto", interpolation="nearest", cmap="viridis")
    heat_ax.set_xlabel("class index")
    heat_ax.set_ylabel("client (most patches first)")
    heat_ax.set_yticks(range(len(largest)), [plan.names[k] for k in largest], fontsize=6)
    heat_ax.set_title("label share per client")
    fig.colorbar(image, ax=heat_ax, label="share of client's labels")

    out_png.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out_png.name}.", suffix=".tmp", dir=out_png.parent)
    os.close(fd)
    try:
        fig.savefig(tmp_name, format="png", dpi=100)
        os.replace(tmp_name, out_png)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def build_partition(store_path: Path, config: Config, out: Path | None = None) -> tuple[Path, dict, Path]:
    """Partition the store's train split as configured; write the plan (default ``partition.json`` beside the
    store) and a histogram plot. Returns (plan path, summary, plot path)."""
    store = FeatureStore(store_path)
    table = store.table("train")
    p = config.partition
    plan = make_partition(table.clips, table.labels, by=p.by, min_clips=p.min_clips, n_clients=p.clients,
                          alpha=p.alpha, seed=config.seed)
    out = out or store.path.parent / "partition.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    plan.save(out)
    plot = out.with_suffix(".png")
    plot_partition(plan, table.clips, table.labels, plot)
    return out, summarize_partition(plan, table.clips, table.labels, store.labels), plot
