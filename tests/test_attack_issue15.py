"""Attack review of dynamic tables (issue 15): each finding's regression test.

Bad ids (wrong dtype, negative, INT64_MAX), impossible settings, eval with unknown ids,
and hostile checkpoints holding a corrupt id map (refused with a
`CheckpointCorruptError` naming the table before anything live changes; ``recframe
ckpt inspect`` refuses it too)."""

from __future__ import annotations

import pytest
import torch
from test_dynamic_training import _batches, _model, _schema, _state, _trainer

from recframe import cli
from recframe.checkpoint import CheckpointCorruptError
from recframe.dynamic import MAX_COUNT, DynamicIdMap, end_step
from recframe.schema import DynamicSpec

INT64_MAX = 2**63 - 1


def _map(budget: int = 10, **spec) -> DynamicIdMap:
    return DynamicIdMap("t", budget, DynamicSpec(**spec), ["f"])


def _see(m: DynamicIdMap, ids: list[int], step: int) -> torch.Tensor:
    rows = m.lookup(torch.tensor(ids, dtype=torch.int64), record=True)
    m.end_step(step)
    return rows


@pytest.mark.parametrize("ids", [torch.tensor([1.0, 2.0]), torch.tensor([1, 2], dtype=torch.int32),
                                 [1, 2], torch.tensor([True])])
def test_lookup_of_wrong_id_dtype_names_the_feature(ids) -> None:
    """Was: a float or int32 tensor straight into `DynamicIdMap.lookup` passed, then
    crashed at the step boundary in ``index_copy_`` (dtype mismatch), naming nothing."""
    m = _map()
    with pytest.raises(TypeError, match=r"feature\(s\) \['f'\] \(dynamic table 't'\).*int64"):
        m.lookup(ids, record=True)
    assert m.end_step(1)[0].numel() == 0


def test_negative_and_extreme_ids_get_rows_and_are_found_again() -> None:
    m = _map(min_count=1)
    _see(m, [-1, -(2**63), INT64_MAX], 1)
    rows = m.lookup(torch.tensor([-1, -(2**63), INT64_MAX]), record=False)
    assert rows.unique().numel() == 3 and bool((rows >= m.fallback).all())


def test_an_admitted_int64_max_id_is_found_after_an_earlier_row_is_freed() -> None:
    """Was: unused rows sort as INT64_MAX too; once a row before the id's own row was
    freed, the search met that unused row first and the id fell back to its hashed row
    (and was admitted again into a second row)."""
    m = _map(min_count=1, eviction="ttl", ttl=2, eviction_interval=1)
    _see(m, [1, 2], 1)  # rows 1, 2
    _see(m, [INT64_MAX, 2], 2)  # INT64_MAX: row 3
    _see(m, [INT64_MAX, 2], 3)  # id 1 (row 1) unseen for 2 steps: evicted
    assert not bool(m.used[0])
    row = m.lookup(torch.tensor([INT64_MAX]), record=True)
    assert int(row) == 3
    m.end_step(4)
    assert int((m.ids[m.used] == INT64_MAX).sum()) == 1


def test_min_count_beyond_the_counters_is_refused() -> None:
    """Was: min_count above what the int32 sketch can count was accepted and silently
    never admitted anything."""
    with pytest.raises(ValueError, match=r"dynamic table 't'.*min_count=.*never be reached"):
        _map(min_count=MAX_COUNT + 1)
    assert _map(min_count=MAX_COUNT).spec.min_count == MAX_COUNT


def test_sketch_counts_saturate_instead_of_wrapping() -> None:
    """Was: a hot id counted past 2**31 between eviction passes wrapped to a negative
    count and was never admitted."""
    m = _map(budget=4, min_count=3, eviction_interval=10**6)
    _see(m, [1, 2, 3], 1)  # the table is full (3 dynamic rows)
    m.sketch.fill_(2**31 - 2)  # as after ~2**31 sightings of everything
    m.discard_pending()  # as a restore does: the sketch is not the one counted so far
    _see(m, [7, 7, 7], 2)
    assert bool((m.sketch >= 0).all()) and int(m.sketch.max()) <= MAX_COUNT + 3


@pytest.mark.parametrize("spec, message", [
    ({"eviction": "ttl", "ttl": 0}, "ttl"), ({"eviction_interval": 0}, "eviction_interval"),
    ({"min_count": 0}, "min_count"), ({"probability": 1.5}, "probability"),
    ({"probability": -0.1}, "probability"), ({"probability": float("nan")}, "probability"),
    ({"evict_fraction": 1.0}, "evict_fraction"), ({"fallback_rows": 10}, "fallback_rows"),
])
def test_settings_that_would_break_the_table_name_it(spec, message) -> None:
    with pytest.raises(ValueError, match=rf"dynamic table 't' \(feature\(s\) \['f'\]\).*{message}"):
        _map(**spec)


def test_eval_with_unknown_ids_admits_nothing_and_keeps_counters(tmp_path) -> None:
    model = _model(_schema(min_count=1))
    _trainer(model, tmp_path, _batches(2), steps=2).train()
    before = _state(model.dynamic)
    model.eval()
    for batch in _batches(3, seed=9, spread=10**6):  # ids never seen in training
        model(batch)
    model.train()
    with torch.no_grad():
        model(_batches(1, seed=10, spread=10**6)[0])
    end_step(model, 3)
    after = _state(model.dynamic)
    assert all(torch.equal(before[k], after[k]) for k in before if not k.endswith(".step"))


# --- hostile checkpoints ----------------------------------------------------------
def _dup(m) -> None:
    held = m.used.nonzero().squeeze(1)
    m.ids[held[1]] = m.ids[held[0]]
    m._reindex()  # a consistent index: only the duplicate is wrong


def _slot_out_of_range(m) -> None:
    m.sorted_slots[0] = m.capacity + 5


def _negative_slot(m) -> None:
    m.sorted_slots[0] = -1


def _negative_count(m) -> None:
    m.counts[m.used.nonzero()[0]] = -3


def _future_step(m) -> None:
    m.last_seen[0] = int(m.step) + 10


CORRUPTIONS = {"duplicate ids": (_dup, "held by several rows"),
               "row out of budget": (_slot_out_of_range, "sorted index"),
               "negative row": (_negative_slot, "sorted index"),
               "negative count": (_negative_count, "negative counts"),
               "last seen after step": (_future_step, "last-seen")}


def _corrupt_checkpoint(tmp_path, corrupt) -> tuple:
    """ckpt_4 good; ckpt_5: the same run with its map corrupted in memory before the
    save (as a hostile writer would, checksums valid)."""
    model = _model(_schema())
    trainer = _trainer(model, tmp_path, _batches(4), steps=4, save_steps=4)
    trainer.train()
    good = _state(model)
    corrupt(model.dynamic.maps["user"])
    trainer.checkpoint_manager.save(5)
    trainer.checkpoint_manager.wait()
    return good


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_corrupt_id_map_is_refused_naming_the_table(tmp_path, name) -> None:
    corrupt, message = CORRUPTIONS[name]
    good = _corrupt_checkpoint(tmp_path, corrupt)
    fresh = _model(_schema(), seed=3)
    trainer = _trainer(fresh, tmp_path, _batches(4), steps=4)
    untouched = _state(fresh)
    with pytest.raises(CheckpointCorruptError, match=rf"dynamic table 'user'.*{message}"):
        trainer.saver.load(ckpt_id=5)
    after = _state(fresh)
    assert all(torch.equal(untouched[k], after[k]) for k in untouched)  # nothing changed
    assert trainer.checkpoint_manager.restore() == 4  # falls back to the good one
    restored = _state(fresh)
    assert all(torch.equal(good[k], restored[k]) for k in good)


def test_mismatched_lengths_are_refused(tmp_path) -> None:
    """A map of another budget (its tensors' lengths differ from this table's)."""
    model = _model(_schema(budget=30))
    _trainer(model, tmp_path, _batches(2), steps=2, save_steps=2).train()
    other = _model(_schema(budget=24))
    trainer = _trainer(other, tmp_path, _batches(2), steps=2)
    with pytest.raises(Exception, match=r"user"):
        trainer.saver.load(ckpt_id=2)


def test_ckpt_inspect_refuses_a_corrupt_map_and_reports_a_good_one(tmp_path, capsys) -> None:
    _corrupt_checkpoint(tmp_path, _dup)
    assert cli.main(["ckpt", "inspect", str(tmp_path / "ckpt_4")]) == 0
    assert "user:" in capsys.readouterr().out
    assert cli.main(["ckpt", "inspect", str(tmp_path / "ckpt_5")]) != 0
    captured = capsys.readouterr()
    assert "dynamic table 'user'" in captured.out + captured.err
