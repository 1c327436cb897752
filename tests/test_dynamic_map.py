"""Dynamic tables: the schema's ``dynamic`` id mapping, the id->row map (admission,
eviction, lookup), readers yielding raw ids, and bad-input errors naming the feature."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recframe.dynamic import DynamicIdMap, DynamicIdRemapper
from recframe.readers import DataError, TabularDataset
from recframe.schema import DynamicSpec, FeatureSchema, IdMapping, hash_strings


def _schema(budget: int = 20, **spec) -> FeatureSchema:
    return FeatureSchema.from_dict({
        "labels": ["y"], "dense": ["x"],
        "sparse": [{"name": "user", "mapping": {"kind": "dynamic", "dynamic": spec}},
                   {"name": "item"}],
        "tables": [{"name": "user", "num_embeddings": budget, "embedding_dim": 4},
                   {"name": "item", "num_embeddings": 10, "embedding_dim": 4}],
    })


def _map(budget: int = 10, **spec) -> DynamicIdMap:
    return DynamicIdMap("t", budget, DynamicSpec(**spec), ["f"])


def _see(m: DynamicIdMap, ids, step: int):
    rows = m.lookup(torch.tensor(ids, dtype=torch.int64), record=True)
    return rows, m.end_step(step)


# --- schema -----------------------------------------------------------------------------
def test_dynamic_mapping_round_trips_and_defaults() -> None:
    schema = _schema(min_count=3, eviction="ttl", ttl=5, eviction_interval=2, fallback_rows=4)
    spec = schema.sparse[0].mapping.dynamic
    assert (spec.min_count, spec.eviction, spec.ttl, spec.fallback_rows) == (3, "ttl", 5, 4)
    again = FeatureSchema.from_dict(schema.to_dict())
    assert again.to_dict() == schema.to_dict()
    assert again.dynamic_tables() == {"user": spec}
    assert IdMapping.from_dict("dynamic").dynamic == DynamicSpec()
    assert "dynamic" not in IdMapping("hash").to_dict()  # other kinds: unchanged


@pytest.mark.parametrize("spec, budget, message", [
    ({"fallback_rows": 20}, 20, "row budget (num_embeddings) of 20, not above fallback_rows"),
    ({"evict_fraction": 1.0}, 20, "evict_fraction must be in (0, 1)"),
    ({"eviction": "ttl", "ttl": 0}, 20, "ttl (0 would evict every row"),
    ({"eviction": "ttl"}, 20, "eviction ttl needs ttl"),
    ({"eviction_interval": 0}, 20, "eviction_interval must be an integer >= 1"),
    ({"min_count": 2, "probability": 0.5}, 20, "not both"),
    ({"ids": "float"}, 20, "dynamic ids must be one of"),
])
def test_bad_dynamic_settings_name_the_feature(spec, budget, message) -> None:
    with pytest.raises(ValueError, match="user") as e:
        _schema(budget, **spec)
    assert message in str(e.value)


def test_shared_dynamic_table_needs_one_spec() -> None:
    with pytest.raises(ValueError, match="'a' and 'b' share table 't'"):
        FeatureSchema.from_dict({
            "dense": ["x"],
            "sparse": [{"name": "a", "table": "t", "mapping": "dynamic"},
                       {"name": "b", "table": "t"}],
            "tables": [{"name": "t", "num_embeddings": 8}]})


# --- the map ----------------------------------------------------------------------------
def test_min_count_admission_and_fallback_rows() -> None:
    m = _map(10, fallback_rows=2, min_count=2, sketch_width=1024)
    rows, (admitted, _, _) = _see(m, [7, 9], step=1)
    assert rows.lt(2).all() and admitted.numel() == 0  # seen once: fallback rows
    rows, (admitted, fallback, _) = _see(m, [7], step=2)
    assert rows.lt(2).all() and admitted.tolist() == [2] and fallback.tolist() == rows.tolist()
    rows = m.lookup(torch.tensor([7, 9]), record=False)
    assert rows[0] == 2 and rows[1] < 2  # 7 has its own row from the next step on
    assert m.rows_used == 1 and m.totals.tolist() == [1, 0]


def test_probability_admission_is_deterministic() -> None:
    ids = list(range(100, 400))
    a, b = _map(1000, probability=0.3), _map(1000, probability=0.3)
    _see(a, ids, 1)
    _see(b, ids, 1)
    assert torch.equal(a.ids, b.ids) and 30 < a.rows_used < 150
    c = _map(1000, probability=1.0)
    _see(c, ids, 1)
    assert c.rows_used == len(ids)


def test_admission_never_exceeds_the_budget_and_prefers_frequent_ids() -> None:
    m = _map(6, fallback_rows=2)  # 4 rows for ids
    _see(m, [1, 2, 3, 4, 5, 5, 5, 6, 6], step=1)
    assert m.rows_used == 4
    kept = set(m.ids[m.used].tolist())
    assert {5, 6} <= kept  # the most frequent first; ties: the smaller id
    assert kept == {5, 6, 1, 2}


def test_lfu_lru_ttl_eviction() -> None:
    lfu = _map(6, fallback_rows=2, eviction="lfu", eviction_interval=2, evict_fraction=0.5)
    _see(lfu, [1, 1, 1, 2, 3, 3, 4], 1)
    _, (_, _, evicted) = _see(lfu, [], 2)  # free 2 of 4: the least frequent (2, then 4)
    assert sorted(lfu.ids[lfu.used].tolist()) == [1, 3] and evicted.numel() == 2

    lru = _map(6, fallback_rows=2, eviction="lru", eviction_interval=3, evict_fraction=0.5)
    _see(lru, [1, 2], 1)
    _see(lru, [3, 4, 1], 2)
    _see(lru, [4], 3)  # last seen: 1->2, 2->1, 3->2, 4->3; evict 2 then 1 (slot order)
    assert sorted(lru.ids[lru.used].tolist()) == [3, 4]

    ttl = _map(6, fallback_rows=2, eviction="ttl", ttl=2, eviction_interval=1)
    _see(ttl, [1, 2], 1)
    _see(ttl, [1], 2)
    _, (_, _, evicted) = _see(ttl, [], 3)  # 2 unseen for 2 steps
    assert ttl.ids[ttl.used].tolist() == [1] and evicted.tolist() == [3]


def test_evicted_rows_are_reused_and_lookups_follow() -> None:
    m = _map(4, fallback_rows=1, eviction="ttl", ttl=1, eviction_interval=1)
    _see(m, [10, 11, 12], 1)
    assert m.rows_used == 3
    _see(m, [20, 21], 2)  # 10..12 evicted (unseen at step 2) before 20, 21 are admitted
    rows = m.lookup(torch.tensor([10, 20, 21]), record=False)
    assert rows[0] == 0 and set(rows[1:].tolist()) <= {1, 2, 3}
    assert m.rows_used == 2


def test_distinct_ids_far_above_budget_hold_memory() -> None:
    m = _map(50, fallback_rows=5, eviction="lfu", eviction_interval=1)
    before = sum(b.numel() for b in m.buffers())
    g = torch.Generator().manual_seed(0)
    for step in range(1, 30):
        _see(m, torch.randint(0, 10**12, (200,), generator=g).tolist(), step)
    assert m.rows_used <= 45 and sum(b.numel() for b in m.buffers()) == before
    assert m.totals[1] > 0


def test_wrong_id_dtype_names_the_feature() -> None:
    remap = DynamicIdRemapper(_schema())
    kjt = KeyedJaggedTensor.from_lengths_sync(
        ["user", "item"], torch.tensor([1, 2], dtype=torch.int32), torch.tensor([1, 1]))
    with pytest.raises(TypeError, match="feature 'user' .*raw int64 ids, got torch.int32"):
        remap(kjt)


def test_remapper_maps_only_dynamic_features_and_eval_never_admits() -> None:
    remap = DynamicIdRemapper(_schema(20, fallback_rows=2))
    kjt = KeyedJaggedTensor.from_lengths_sync(
        ["user", "item"], torch.tensor([10**15, 3, 7]), torch.tensor([2, 1]))
    remap.eval()
    with torch.no_grad():
        out = remap(kjt)
    assert out.values()[2] == 7 and out.values()[:2].lt(2).all()
    remap.maps["user"].end_step(1)
    assert remap.maps["user"].rows_used == 0  # evaluation queued nothing
    remap.train()
    remap(kjt)
    remap.maps["user"].end_step(2)
    assert remap.maps["user"].rows_used == 2
    again = remap(kjt).values()
    assert again[:2].ge(2).all() and again[2] == 7


# --- readers ----------------------------------------------------------------------------
def test_reader_yields_raw_and_hashed_ids(tmp_path) -> None:
    schema = FeatureSchema.from_dict({
        "labels": ["y"], "dense": ["x"],
        "sparse": [{"name": "user", "mapping": {"kind": "dynamic"}},
                   {"name": "tag", "mapping": {"kind": "dynamic",
                                               "dynamic": {"ids": "hash", "salt": 3}}}],
        "tables": [{"name": "user", "num_embeddings": 8}, {"name": "tag", "num_embeddings": 8}],
    })
    pq.write_table(pa.table({"y": [1, 0], "x": [0.5, 1.0], "user": [2**40 + 1, -5],
                             "tag": ["a", "b"]}), tmp_path / "p.parquet")
    batch = next(iter(TabularDataset(str(tmp_path), schema, batch_size=2)))
    values = batch.sparse_features.values()
    assert values.dtype == torch.int64
    assert values[:2].tolist() == [2**40 + 1, -5]
    assert values[2:].tolist() == hash_strings(["a", "b"], salt=3).view("int64").tolist()


def test_reader_names_a_float_column_for_int64_ids(tmp_path) -> None:
    schema = _schema()
    pq.write_table(pa.table({"y": [1], "x": [0.5], "user": [1.5], "item": [1]}),
                   tmp_path / "p.parquet")
    with pytest.raises(DataError, match="'user'.*dynamic ids int64 need integer ids"):
        next(iter(TabularDataset(str(tmp_path), schema, batch_size=1)))


@pytest.mark.parametrize("model_name, backend", [("dlrm", "nn"), ("deepfm", "torchrec")])
def test_models_map_ids_on_both_embedding_backends(model_name, backend) -> None:
    from torchrec.datasets.utils import Batch

    from recframe.dynamic import end_step
    from recframe.models import build_model

    model = build_model(model_name, schema=_schema(20, fallback_rows=2),
                        embedding_backend=backend)
    kjt = KeyedJaggedTensor.from_lengths_sync(
        ["user", "item"], torch.tensor([10**15, 10**15 + 1, 3, 4]), torch.tensor([1, 1, 1, 1]))
    batch = Batch(dense_features=torch.randn(2, 1), sparse_features=kjt,
                  labels=torch.tensor([1.0, 0.0]))
    model(batch).backward()
    assert end_step(model, 1) == {"user": 2}
    rows = model.dynamic.maps["user"].lookup(torch.tensor([10**15, 10**15 + 1]), False)
    assert rows.ge(2).all()
    model(batch)  # the admitted rows are looked up (and stay within the table)


def test_sketch_counts_fade_at_each_eviction_pass() -> None:
    slow = _map(100, min_count=2, eviction="lru", eviction_interval=10, sketch_width=4096)
    fast = _map(100, min_count=2, eviction="lru", eviction_interval=1, sketch_width=4096)
    for step in (1, 2):
        _see(slow, [42], step)
        _see(fast, [42], step)
    assert slow.rows_used == 1  # two sightings within an eviction interval
    assert fast.rows_used == 0  # the first sighting was halved away before the second


def test_lookups_follow_a_map_loaded_in_place() -> None:
    """The used-row count lookups search by is cached: a map written in place (restore,
    ``load_state_dict``) must be recounted, not searched with the stale count."""
    a, b = _map(min_count=1), _map(min_count=1)
    _see(a, [5, 6, 7], 1)
    ids = torch.tensor([5, 6, 7, 8])
    assert b.rows_used == 0 and b.lookup(ids, record=False).eq(0).all()  # count cached
    b.load_state_dict(a.state_dict())
    assert b.rows_used == 3
    assert torch.equal(b.lookup(ids, record=False), a.lookup(ids, record=False))
    assert b.lookup(ids, record=False)[:3].ge(1).all()


def test_deferred_counter_updates_equal_updates_at_every_step() -> None:
    """While the table is full and no eviction is due, `end_step` queues the counter
    updates; the decisions and the saved state must equal applying them every step."""
    from recframe.dynamic import QUEUE_STEPS

    for eviction in ("lru", "lfu"):
        kw = dict(budget=20, fallback_rows=4, min_count=2, eviction=eviction,
                  eviction_interval=7, evict_fraction=0.25)
        deferred, eager = _map(**kw), _map(**kw)
        g = torch.Generator().manual_seed(0)
        for step in range(1, 60):
            ids = torch.randint(0, 40, (24,), generator=g) + 5 * (step // 10)
            a = [deferred.lookup(ids, record=True), *deferred.end_step(step)]
            b = [eager.lookup(ids, record=True), *eager.end_step(step)]
            eager.flush()  # the counters applied at every step
            assert all(torch.equal(x, y) for x, y in zip(a, b)), (eviction, step)
            assert len(deferred._live.queue) < QUEUE_STEPS
        assert len(deferred._live.queue) > 0  # some steps were deferred at the end
        sa, sb = deferred.state_dict(), eager.state_dict()  # state_dict flushes
        assert not deferred._live.queue
        assert all(torch.equal(sa[k], sb[k]) for k in sa), eviction
