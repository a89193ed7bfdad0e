"""Client partitions: by uploader, iid, Dirichlet label skew; summary, persistence and plot."""

import numpy as np
import pandas as pd
import pytest

from fl.errors import ConfigError, DataError
from fl.partition import (
    PartitionPlan,
    format_summary,
    make_partition,
    partition_by_uploader,
    partition_dirichlet,
    partition_iid,
    plot_partition,
    primary_labels,
    summarize_partition,
)

UPLOADER_SIZES = {"zed": 40, "amy": 30, "bob": 30, "cat": 12, "dan": 9, "eve": 5, "fay": 2, "gus": 1}
N_CLASSES = 8
CLASS_NAMES = [f"class{c}" for c in range(N_CLASSES)]


@pytest.fixture(scope="module")
def table() -> tuple[pd.DataFrame, np.ndarray]:
    rng = np.random.default_rng(0)
    uploaders = np.concatenate([[name] * size for name, size in UPLOADER_SIZES.items()])
    rng.shuffle(uploaders)
    n = uploaders.size
    clips = pd.DataFrame(
        {"fname": [f"{i:05d}" for i in range(n)], "uploader": uploaders, "n_segs": rng.integers(1, 30, n)}
    )
    labels = np.zeros((n, N_CLASSES), dtype=np.int8)
    labels[np.arange(n), rng.integers(0, N_CLASSES, n)] = 1
    labels[rng.random((n, N_CLASSES)) < 0.1] = 1
    return clips, labels


def assert_exact_cover(plan: PartitionPlan, n_clips: int) -> None:
    for idx in plan.clients:
        assert idx.size > 0 and np.all(np.diff(idx) > 0)
    np.testing.assert_array_equal(np.sort(np.concatenate(plan.clients)), np.arange(n_clips))


def same_plan(a: PartitionPlan, b: PartitionPlan) -> bool:
    return (
        (a.method, a.seed, a.params, a.names) == (b.method, b.seed, b.params, b.names)
        and len(a.clients) == len(b.clients)
        and all(np.array_equal(x, y) for x, y in zip(a.clients, b.clients, strict=True))
    )


def test_by_uploader_honours_min_clips(table):
    clips, _ = table
    plan = partition_by_uploader(clips, min_clips=9)
    assert plan.names == ["zed", "amy", "bob", "cat", "dan"]  # by size, ties by name
    for name, idx in zip(plan.names, plan.clients, strict=True):
        assert len(idx) == UPLOADER_SIZES[name] >= 9
        assert set(clips["uploader"].iloc[idx]) == {name}
    kept = np.concatenate(plan.clients)
    assert set(clips["uploader"].drop(index=kept)) == {"eve", "fay", "gus"}
    assert len(partition_by_uploader(clips).clients) == len(UPLOADER_SIZES)
    with pytest.raises(DataError, match="no uploader has at least 41 clips"):
        partition_by_uploader(clips, min_clips=41)


def test_iid_is_exact_balanced_and_seeded(table):
    clips, labels = table
    plan = partition_iid(clips, n_clients=7, seed=1)
    assert_exact_cover(plan, len(clips))
    sizes = [len(idx) for idx in plan.clients]
    assert max(sizes) - min(sizes) <= 1
    assert plan.names[3] == "client-0003"
    assert same_plan(plan, make_partition(clips, labels, by="iid", n_clients=7, seed=1))
    assert not same_plan(plan, partition_iid(clips, n_clients=7, seed=2))


def test_dirichlet_is_exact_nonempty_and_seeded(table):
    clips, labels = table
    plan = partition_dirichlet(clips, labels, n_clients=20, alpha=0.01, seed=4)
    assert_exact_cover(plan, len(clips))  # tiny alpha still leaves no client empty
    again = make_partition(clips, labels, by="dirichlet", n_clients=20, alpha=0.01, seed=4)
    assert same_plan(plan, again)
    assert not same_plan(plan, partition_dirichlet(clips, labels, n_clients=20, alpha=0.01, seed=5))


def test_primary_label_is_lowest_positive_index():
    labels = np.array([[0, 1, 1], [1, 0, 1], [0, 0, 0]])
    np.testing.assert_array_equal(primary_labels(labels), [1, 0, -1])


def test_dirichlet_skew_exceeds_iid(table):
    clips, labels = table
    iid = summarize_partition(partition_iid(clips, 5, seed=0), clips, labels, CLASS_NAMES)
    skewed_plan = partition_dirichlet(clips, labels, 5, 0.1, seed=0)
    skewed = summarize_partition(skewed_plan, clips, labels, CLASS_NAMES)
    assert skewed["label_js_mean"] > iid["label_js_mean"] + 0.1
    assert skewed["label_tv_mean"] > iid["label_tv_mean"]


def test_bad_arguments_raise(table):
    clips, labels = table
    n = len(clips)
    for n_clients in (0, n + 1):
        with pytest.raises(ConfigError, match="n_clients"):
            partition_iid(clips, n_clients, seed=0)
        with pytest.raises(ConfigError, match="n_clients"):
            partition_dirichlet(clips, labels, n_clients, alpha=1.0, seed=0)
    for alpha in (0.0, -1.0):
        with pytest.raises(ConfigError, match="alpha"):
            partition_dirichlet(clips, labels, 3, alpha=alpha, seed=0)
    with pytest.raises(ConfigError, match="unknown partition method 'speaker'"):
        make_partition(clips, labels, by="speaker")
    with pytest.raises(DataError, match="labels must be"):
        partition_dirichlet(clips, labels[:-1], 3, alpha=1.0, seed=0)
    with pytest.raises(DataError, match="uploader"):
        partition_by_uploader(clips.drop(columns="uploader"))


def test_summary_counts_and_text(table):
    clips, labels = table
    plan = partition_by_uploader(clips, min_clips=9)
    summary = summarize_partition(plan, clips, labels, CLASS_NAMES)
    kept = np.concatenate(plan.clients)
    assert summary["n_clients"] == 5
    assert summary["clips_covered"] == 121 and summary["clips_total"] == len(clips)
    assert summary["clips_per_client"]["min"] == 9 and summary["clips_per_client"]["max"] == 40
    assert summary["clips_per_client"]["50%"] == 30
    assert summary["patches_covered"] == clips["n_segs"].iloc[kept].sum()
    np.testing.assert_array_equal(
        plan.n_patches(clips["n_segs"].to_numpy()), [clips["n_segs"].iloc[idx].sum() for idx in plan.clients]
    )
    text = format_summary(summary)
    assert "clients: 5" in text and "clips covered: 121 / 129" in text and "Jensen-Shannon" in text


def test_save_load_round_trip(tmp_path, table):
    clips, labels = table
    plan = partition_dirichlet(clips, labels, n_clients=6, alpha=0.5, seed=3)
    path = tmp_path / "plans" / "plan.json"
    plan.save(path)
    assert same_plan(PartitionPlan.load(path), plan)
    assert [p.name for p in path.parent.iterdir()] == ["plan.json"]  # no temporary left behind


def test_load_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="bad.json: not a valid partition plan JSON"):
        PartitionPlan.load(bad)
    partial = tmp_path / "partial.json"
    partial.write_text('{"method": "iid", "seed": 0, "params": {}}')
    with pytest.raises(DataError, match="partial.json: partition plan lacks key.*clients, names"):
        PartitionPlan.load(partial)
    with pytest.raises(DataError, match="missing.json: partition plan not found"):
        PartitionPlan.load(tmp_path / "missing.json")


def test_plot_writes_png(tmp_path, table):
    clips, labels = table
    out = tmp_path / "figs" / "partition.png"
    plot_partition(partition_by_uploader(clips), clips, labels, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
