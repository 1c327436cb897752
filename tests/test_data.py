"""Tests of recframe.data: synthetic Criteo, Criteo TSV reading, positions, batch sizes."""

from __future__ import annotations

import gzip
import itertools
import math
import random
import subprocess
import sys
import uuid
from dataclasses import dataclass

import fsspec
import pytest
import torch
from torchmetrics.functional.classification import binary_auroc
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recframe.data import (
    DEFAULT_CAT_NAMES,
    DEFAULT_INT_NAMES,
    CriteoTSVDataset,
    SyntheticCriteo,
    batch_size_of,
    make_kjt,
)


def assert_same_batch(a: Batch, b: Batch) -> None:
    assert torch.equal(a.dense_features, b.dense_features)
    assert torch.equal(a.labels, b.labels)
    assert a.sparse_features.keys() == b.sparse_features.keys()
    assert torch.equal(a.sparse_features.values(), b.sparse_features.values())
    assert torch.equal(a.sparse_features.lengths(), b.sparse_features.lengths())


def test_importing_data_does_not_import_torchrec() -> None:
    """The trainer imports `batch_size_of` from here; torchrec is an optional extra."""
    code = "import sys, recframe.data; sys.exit('torchrec' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


def test_default_names_match_torchrec() -> None:
    from torchrec.datasets import criteo

    assert DEFAULT_INT_NAMES == list(criteo.DEFAULT_INT_NAMES)
    assert DEFAULT_CAT_NAMES == list(criteo.DEFAULT_CAT_NAMES)


# --------------------------------------------------------------------------- batch_size_of


@dataclass
class _WithBatchSize:
    batch_size: int


def test_batch_size_of_containers() -> None:
    batch = SyntheticCriteo(num_batches=1, batch_size=7).generate(0)
    assert batch_size_of(batch) == 7
    assert batch_size_of(batch.sparse_features) == 7
    assert batch_size_of(torch.zeros(5, 3)) == 5
    assert batch_size_of({"dense": torch.zeros(4, 2), "labels": torch.zeros(3)}) == 3
    assert batch_size_of({"meta": "x", "dense": torch.zeros(4, 2)}) == 4
    assert batch_size_of([("id", [torch.zeros(6)]), torch.zeros(2)]) == 6
    assert batch_size_of(_WithBatchSize(9)) == 9
    assert batch_size_of({"x": {"nested": (None, torch.ones(11, 1))}}) == 11


@pytest.mark.parametrize("bad", ["text", {}, [], torch.tensor(1.0), object(), {"a": 1}])
def test_batch_size_of_unknown_raises(bad: object) -> None:
    with pytest.raises(ValueError, match="batch_size_of"):
        batch_size_of(bad)


# --------------------------------------------------------------------------- make_kjt


def test_make_kjt_key_major_and_checks() -> None:
    lengths = torch.tensor([[1, 0, 2], [1, 1, 1]])
    values = torch.tensor([10, 11, 12, 20, 21, 22])
    kjt = make_kjt(["a", "b"], values, lengths)
    assert isinstance(kjt, KeyedJaggedTensor)
    assert kjt.stride() == 3
    assert kjt.values().dtype == torch.int64
    jt = kjt.to_dict()
    assert [t.tolist() for t in jt["a"].to_dense()] == [[10], [], [11, 12]]
    assert [t.tolist() for t in jt["b"].to_dense()] == [[20], [21], [22]]
    with pytest.raises(ValueError, match="lengths sum"):
        make_kjt(["a", "b"], values[:-1], lengths)
    with pytest.raises(ValueError, match="rows"):
        make_kjt(["a"], values, lengths)
    with pytest.raises(ValueError, match="batch size"):
        make_kjt(["a", "b"], values, lengths, batch_size=4)


# --------------------------------------------------------------------------- synthetic


def test_synthetic_batch_layout() -> None:
    ds = SyntheticCriteo(num_batches=2, batch_size=16, num_embeddings=[50] * 25 + [3])
    batch = next(iter(ds))
    assert isinstance(batch, Batch)
    assert batch.dense_features.shape == (16, 13)
    assert batch.dense_features.dtype == torch.float32
    assert bool((batch.dense_features >= 0).all())
    assert batch.labels.shape == (16,) and batch.labels.dtype == torch.float32
    assert set(batch.labels.unique().tolist()) <= {0.0, 1.0}
    kjt = batch.sparse_features
    assert kjt.keys() == DEFAULT_CAT_NAMES
    assert kjt.values().dtype == torch.int64
    assert bool((kjt.lengths() == 1).all())
    per_feature = kjt.to_dict()
    assert int(per_feature["cat_25"].values().max()) < 3
    assert int(per_feature["cat_0"].values().max()) < 50
    assert int(kjt.values().min()) >= 0


def test_synthetic_variable_bags() -> None:
    ds = SyntheticCriteo(num_batches=1, batch_size=256, num_sparse=4, ids_per_feature=(0, 3))
    kjt = ds.generate(0).sparse_features
    assert kjt.keys() == ["cat_0", "cat_1", "cat_2", "cat_3"]
    lengths = kjt.lengths()
    assert int(lengths.min()) == 0 and int(lengths.max()) == 3
    assert kjt.values().numel() == int(lengths.sum())


def test_synthetic_is_deterministic_per_seed_and_index() -> None:
    a = SyntheticCriteo(num_batches=4, batch_size=32, seed=3)
    b = SyntheticCriteo(num_batches=4, batch_size=32, seed=3)
    for x, y in zip(a, b):
        assert_same_batch(x, y)
    assert_same_batch(a.generate(2), list(b)[2])
    other = SyntheticCriteo(num_batches=4, batch_size=32, seed=4).generate(2)
    assert not torch.equal(other.dense_features, a.generate(2).dense_features)
    assert not torch.equal(a.generate(1).dense_features, a.generate(2).dense_features)


def test_synthetic_ranks_read_disjoint_batches() -> None:
    full = SyntheticCriteo(num_batches=10, batch_size=8, seed=1)
    seen: dict[int, int] = {}
    for rank in range(3):
        ds = SyntheticCriteo(num_batches=10, batch_size=8, seed=1, rank=rank, world_size=3)
        batches = list(ds)
        assert len(batches) == len(ds) == 3  # 10 // 3: every rank takes the same steps
        for k, batch in enumerate(batches):
            index = k * 3 + rank
            assert_same_batch(batch, full.generate(index))
            assert index not in seen
            seen[index] = rank
    assert sorted(seen) == list(range(9))


def test_synthetic_resume_with_lookahead_gives_exact_remainder() -> None:
    ds = SyntheticCriteo(num_batches=7, batch_size=4, seed=5)
    reference = list(SyntheticCriteo(num_batches=7, batch_size=4, seed=5))
    it = iter(ds)
    positions = []
    for _ in range(4):  # the trainer reads one batch ahead of training
        next(it)
        positions.append(ds.state_dict())
    trained = 3
    resumed = SyntheticCriteo(num_batches=7, batch_size=4, seed=5)
    resumed.load_state_dict(positions[trained - 1])
    rest = list(resumed)
    assert len(rest) == 7 - trained
    for got, want in zip(rest, reference[trained:]):
        assert_same_batch(got, want)
    assert resumed.state_dict()["epoch"] == 1 and resumed.state_dict()["next_batch"] == 0


def test_synthetic_epochs_and_end_position() -> None:
    ds = SyntheticCriteo(num_batches=3, batch_size=2)
    first = list(ds)
    assert ds.state_dict()["epoch"] == 1
    assert len(list(ds)) == 3 and ds.state_dict()["epoch"] == 2
    # The position right after an epoch's last batch resumes with the next epoch,
    # not with an empty pass.
    ds = SyntheticCriteo(num_batches=3, batch_size=2)
    it = iter(ds)
    for _ in range(3):
        next(it)
    end_state = ds.state_dict()
    assert end_state["next_batch"] == 3 and end_state["epoch"] == 0
    resumed = SyntheticCriteo(num_batches=3, batch_size=2)
    resumed.load_state_dict(end_state)
    again = list(resumed)
    assert len(again) == 3
    assert_same_batch(again[0], first[0])
    assert resumed.state_dict()["epoch"] == 2


def test_synthetic_endless() -> None:
    ds = SyntheticCriteo(num_batches=None, batch_size=2)
    with pytest.raises(TypeError):
        len(ds)
    batches = list(itertools.islice(ds, 5))
    assert len(batches) == 5
    assert ds.state_dict()["next_batch"] == 5


def test_synthetic_refuses_foreign_state() -> None:
    ds = SyntheticCriteo(num_batches=4, seed=1)
    with pytest.raises(ValueError, match="seed"):
        ds.load_state_dict(SyntheticCriteo(num_batches=4, seed=2).state_dict())
    with pytest.raises(ValueError, match="world_size"):
        ds.load_state_dict(SyntheticCriteo(num_batches=4, seed=1, world_size=2).state_dict())
    with pytest.raises(ValueError, match="next_batch"):
        ds.load_state_dict({"next_batch": 5, "epoch": 0})


def test_synthetic_ids_follow_power_law() -> None:
    n = 10_000

    def ids_for(alpha: float) -> torch.Tensor:
        ds = SyntheticCriteo(
            num_batches=1, batch_size=4096, num_sparse=2, num_embeddings=n, alpha=alpha
        )
        ids = ds.generate(0).sparse_features.values()
        assert int(ids.min()) >= 0 and int(ids.max()) < n
        return ids

    ids = ids_for(1.0)
    # ~1/x with id 0 the hottest: ids below 1% of the range carry about half the lookups
    assert (ids < n // 100).float().mean() > 0.4
    counts = torch.bincount(ids, minlength=n)
    assert counts[0] > counts[10] > counts[1000:1010].sum() / 10
    assert (ids_for(0.0) < n // 100).float().mean() < 0.03  # alpha=0: uniform
    assert (ids_for(1.5) < 10).float().mean() > 0.6  # steeper


@pytest.fixture
def one_thread():
    """Small models train faster on one thread, and much faster on a busy machine,
    where OpenMP workers wait on each other."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_synthetic_labels_are_learnable(one_thread: None) -> None:
    """Logistic regression on one-hot ids + dense features clearly beats chance."""
    torch.manual_seed(0)
    n, f = 500, 26
    train = SyntheticCriteo(num_batches=60, batch_size=256, num_embeddings=n, seed=1)
    test = SyntheticCriteo(num_batches=4, batch_size=1024, num_embeddings=n, seed=2)
    weights = torch.nn.Embedding(n * f, 1)  # one id space per feature
    torch.nn.init.zeros_(weights.weight)
    dense = torch.nn.Linear(13, 1)
    opt = torch.optim.Adagrad([*weights.parameters(), *dense.parameters()], lr=0.1)

    def logits(batch: Batch) -> torch.Tensor:
        b = batch.labels.numel()
        ids = batch.sparse_features.values().reshape(f, b).t() + torch.arange(f) * n
        return weights(ids).sum(dim=(1, 2)) + dense(batch.dense_features).squeeze(-1)

    for batch in train:
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits(batch), batch.labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        scores = torch.cat([logits(b) for b in test])
        labels = torch.cat([b.labels for b in test])
    assert 0.1 < labels.mean() < 0.6
    assert float(binary_auroc(scores, labels.long())) > 0.65


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"num_batches": 0}, "num_batches"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 2.5}, "batch_size"),
        ({"num_dense": 0}, "num_dense"),
        ({"num_sparse": 0}, "num_sparse"),
        ({"num_embeddings": 0}, "num_embeddings"),
        ({"num_embeddings": [10, 10]}, "num_embeddings"),
        ({"ids_per_feature": 0}, "ids_per_feature"),
        ({"ids_per_feature": (3, 2)}, "ids_per_feature"),
        ({"ids_per_feature": (1, 2, 3)}, "ids_per_feature"),
        ({"alpha": -1.0}, "alpha"),
        ({"alpha": float("nan")}, "alpha"),
        ({"label_noise": -0.1}, "label_noise"),
        ({"seed": "0"}, "seed"),
        ({"rank": 2, "world_size": 2}, "rank"),
        ({"world_size": 0}, "world_size"),
        ({"num_batches": 2, "world_size": 3}, "num_batches"),
    ],
)
def test_synthetic_bad_arguments(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        SyntheticCriteo(**kwargs)


# --------------------------------------------------------------------------- Criteo TSV


def _random_rows(n: int, seed: int) -> list[list[str]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = str(rng.randint(0, 1))
        dense = [rng.choice(["", str(rng.randint(-2, 1000))]) for _ in range(13)]
        cats = [rng.choice(["", f"{rng.getrandbits(32):08x}"]) for _ in range(26)]
        rows.append([label, *dense, *cats])
    return rows


def _lines(rows: list[list[str]]) -> str:
    return "".join("\t".join(row) + "\n" for row in rows)


def _expected(rows: list[list[str]], num_embeddings: int) -> tuple:
    """Reference parse, written independently of the dataset's code."""
    labels = torch.tensor([float(r[0]) for r in rows])
    dense = torch.tensor(
        [[math.log(1 + max(int(x), 0)) if x else 0.0 for x in r[1:14]] for r in rows]
    )
    per_feature: list[list[list[int]]] = []
    for f in range(26):
        column = rows and [r[14 + f] for r in rows]
        per_feature.append([[int(x, 16) % num_embeddings] if x else [] for x in column])
    return labels, dense, per_feature


def _check_batches(batches: list[Batch], rows: list[list[str]], num_embeddings: int) -> None:
    labels, dense, per_feature = _expected(rows, num_embeddings)
    assert torch.equal(torch.cat([b.labels for b in batches]), labels)
    assert torch.allclose(torch.cat([b.dense_features for b in batches]), dense, atol=1e-6)
    for f, name in enumerate(DEFAULT_CAT_NAMES):
        got: list[list[int]] = []
        for b in batches:
            jt = b.sparse_features[name]
            got += [t.tolist() for t in jt.to_dense()]
        assert got == per_feature[f], name


@pytest.fixture
def memory_dir():
    root = f"memory://criteo-{uuid.uuid4().hex}"
    yield root
    fs = fsspec.filesystem("memory")
    path = root[len("memory://") :]
    if fs.exists(path):
        fs.rm(path, recursive=True)


def test_tsv_reads_local_glob_across_files(tmp_path) -> None:
    rows_a, rows_b = _random_rows(7, 1), _random_rows(6, 2)
    (tmp_path / "day_0.tsv").write_text(_lines(rows_a))
    (tmp_path / "day_1.tsv").write_text(_lines(rows_b))
    ds = CriteoTSVDataset(str(tmp_path / "day_*.tsv"), batch_size=5, num_embeddings=1000)
    batches = list(ds)
    assert [batch_size_of(b) for b in batches] == [5, 5, 3]  # a batch spans both files
    assert batches[0].sparse_features.keys() == DEFAULT_CAT_NAMES
    assert batches[0].dense_features.dtype == torch.float32
    _check_batches(batches, rows_a + rows_b, 1000)
    by_dir = CriteoTSVDataset(str(tmp_path), batch_size=5, num_embeddings=1000)
    assert len(by_dir.files) == 2
    assert_same_batch(list(by_dir)[1], batches[1])
    dropped = CriteoTSVDataset(
        str(tmp_path / "day_*.tsv"), batch_size=5, num_embeddings=1000, drop_last=True
    )
    assert [batch_size_of(b) for b in dropped] == [5, 5]


def test_tsv_missing_categorical_is_empty_bag(tmp_path) -> None:
    row = ["1", *([""] * 13), *(["a"] + [""] * 25)]
    (tmp_path / "x.tsv").write_text(_lines([row]))
    batch = next(iter(CriteoTSVDataset(str(tmp_path / "x.tsv"), num_embeddings=7)))
    assert batch.sparse_features.lengths().tolist() == [1] + [0] * 25
    assert batch.sparse_features.values().tolist() == [10 % 7]
    assert batch.dense_features.abs().sum() == 0


def test_tsv_ids_wider_than_int64(tmp_path) -> None:
    rows = _random_rows(3, 13)
    rows[1][20] = "f" * 24  # 96-bit hash: hashed into the table like any other id
    (tmp_path / "wide.tsv").write_text(_lines(rows))
    batches = list(CriteoTSVDataset(str(tmp_path / "wide.tsv"), num_embeddings=1009))
    _check_batches(batches, rows, 1009)


def test_tsv_reads_memory_and_gzip(tmp_path, memory_dir) -> None:
    rows = _random_rows(9, 3)
    with fsspec.open(f"{memory_dir}/part-0.tsv", "wt") as handle:
        handle.write(_lines(rows[:4]))
    with fsspec.open(f"{memory_dir}/part-1.tsv.gz", "wb") as handle:
        handle.write(gzip.compress(_lines(rows[4:]).encode()))
    ds = CriteoTSVDataset(f"{memory_dir}/part-*", batch_size=4, num_embeddings=[97] * 26)
    _check_batches(list(ds), rows, 97)
    local_gz = tmp_path / "day.tsv.gz"
    with gzip.open(local_gz, "wt") as handle:
        handle.write(_lines(rows))
    from_gz = CriteoTSVDataset([str(local_gz)], batch_size=3, num_embeddings=97)
    _check_batches(list(from_gz), rows, 97)


def test_tsv_ranks_split_lines(tmp_path) -> None:
    rows = _random_rows(11, 4)
    (tmp_path / "d.tsv").write_text(_lines(rows))
    path = str(tmp_path / "d.tsv")
    for rank in range(3):
        ds = CriteoTSVDataset(path, batch_size=2, num_embeddings=50, rank=rank, world_size=3)
        _check_batches(list(ds), rows[rank::3], 50)


def test_tsv_resume_mid_file_with_lookahead(tmp_path) -> None:
    rows_a, rows_b = _random_rows(10, 5), _random_rows(5, 6)
    (tmp_path / "a.tsv").write_text(_lines(rows_a))
    (tmp_path / "b.tsv.gz").write_bytes(gzip.compress(_lines(rows_b).encode()))
    paths = [str(tmp_path / "a.tsv"), str(tmp_path / "b.tsv.gz")]
    reference = list(CriteoTSVDataset(paths, batch_size=4, num_embeddings=100))
    ds = CriteoTSVDataset(paths, batch_size=4, num_embeddings=100)
    it = iter(ds)
    positions = []
    for _ in range(3):  # one batch of look-ahead past the 2 trained batches
        next(it)
        positions.append(ds.state_dict())
    assert positions[1]["file_index"] == 0 and positions[1]["line"] == 8  # mid-file
    resumed = CriteoTSVDataset(paths, batch_size=4, num_embeddings=100)
    resumed.load_state_dict(positions[1])
    rest = list(resumed)
    assert len(rest) == len(reference) - 2
    for got, want in zip(rest, reference[2:]):
        assert_same_batch(got, want)
    assert resumed.state_dict()["epoch"] == 1
    assert resumed.state_dict()["file_index"] == 0 and resumed.state_dict()["line"] == 0


def test_tsv_end_positions_start_next_epoch(tmp_path) -> None:
    rows = _random_rows(7, 7)
    (tmp_path / "a.tsv").write_text(_lines(rows))
    path = str(tmp_path / "a.tsv")
    for drop_last, count in ((False, 3), (True, 2)):
        ds = CriteoTSVDataset(path, batch_size=3, num_embeddings=10, drop_last=drop_last)
        it = iter(ds)
        for _ in range(count):
            next(it)
        last = ds.state_dict()  # nothing (or only the dropped tail) is left
        resumed = CriteoTSVDataset(path, batch_size=3, num_embeddings=10, drop_last=drop_last)
        resumed.load_state_dict(last)
        again = list(resumed)
        assert len(again) == count, drop_last
        _check_batches(again, rows[: 3 * count] if drop_last else rows, 10)
        assert resumed.state_dict()["epoch"] == 2


def test_tsv_refuses_state_of_other_files(tmp_path) -> None:
    (tmp_path / "a.tsv").write_text(_lines(_random_rows(3, 8)))
    (tmp_path / "b.tsv").write_text(_lines(_random_rows(3, 9)))
    a = CriteoTSVDataset(str(tmp_path / "a.tsv"))
    b = CriteoTSVDataset(str(tmp_path / "b.tsv"))
    with pytest.raises(ValueError, match="a.tsv"):
        b.load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="num_files"):
        a.load_state_dict(CriteoTSVDataset(str(tmp_path / "*.tsv")).state_dict())


@pytest.mark.parametrize(
    "bad_line, needle",
    [
        ("1\t2\t3\n", "40 tab-separated fields"),
        ("2" + "\t" * 39 + "\n", "label"),
        ("1\tx" + "\t" * 38 + "\n", "'x'"),
        ("0" + "\t" * 14 + "zz" + "\t" * 25 + "\n", "'zz'"),
    ],
)
def test_tsv_malformed_line_names_file_and_line(tmp_path, bad_line: str, needle: str) -> None:
    good = _lines(_random_rows(2, 10))
    path = tmp_path / "broken.tsv"
    path.write_text(good + bad_line)
    with pytest.raises(ValueError, match="broken.tsv:3") as info:
        list(CriteoTSVDataset(str(path), batch_size=2))
    assert needle in str(info.value)


def test_tsv_missing_paths_raise(tmp_path, memory_dir) -> None:
    missing = str(tmp_path / "nope" / "day_*.tsv")
    with pytest.raises(FileNotFoundError, match="nope"):
        CriteoTSVDataset(missing)
    (tmp_path / "ok.tsv").write_text(_lines(_random_rows(1, 11)))
    with pytest.raises(FileNotFoundError, match="absent.tsv"):
        CriteoTSVDataset([str(tmp_path / "ok.tsv"), str(tmp_path / "absent.tsv")])
    with pytest.raises(FileNotFoundError, match="memory"):
        CriteoTSVDataset(f"{memory_dir}/*.tsv")


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"batch_size": 0}, "batch_size"),
        ({"num_embeddings": [5] * 3}, "num_embeddings"),
        ({"rank": -1}, "rank"),
        ({"rank": 1, "world_size": 1}, "rank"),
        ({"drop_last": "yes"}, "drop_last"),
    ],
)
def test_tsv_bad_arguments(tmp_path, kwargs: dict, name: str) -> None:
    (tmp_path / "a.tsv").write_text(_lines(_random_rows(1, 12)))
    with pytest.raises(ValueError, match=name):
        CriteoTSVDataset(str(tmp_path / "a.tsv"), **kwargs)
    with pytest.raises(ValueError, match="paths"):
        CriteoTSVDataset([])
