"""Async saves of host state in one process: a forked copy-on-write writer. The loop is
blocked only for the fork; the child writes and commits what memory held at save time."""

from __future__ import annotations

import os
import time

import pytest
import torch
from test_checkpoint_manager import make_model, set_weights, steps_of, weight_in

import recframe.checkpoint.saver as saver_module
from recframe.checkpoint import CheckpointError, CheckpointManager, Saver

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


def _gate_child_writes(monkeypatch, gate_file, fail=False):
    """In the (forked) writer, wait for ``gate_file`` to exist before writing."""
    real = saver_module.write_tensors
    parent = os.getpid()

    def gated(*args, **kwargs):
        if os.getpid() != parent:
            deadline = time.monotonic() + 60
            while not os.path.exists(gate_file) and time.monotonic() < deadline:
                time.sleep(0.005)
            if fail:
                raise OSError(28, "No space left on device (injected)")
        return real(*args, **kwargs)

    monkeypatch.setattr(saver_module, "write_tensors", gated)


def test_fork_snapshot_writes_the_state_at_save_time(tmp_path, monkeypatch):
    gate = tmp_path / "gate"
    _gate_child_writes(monkeypatch, str(gate))
    model = make_model()
    manager = CheckpointManager(Saver(model, output_dir=str(tmp_path / "out"), max_keep=10),
                                save_interval=1, async_save=True)
    assert manager.writer.can_fork(manager.saver.collect_state())
    set_weights(model, 1.0)
    manager.step(1)  # returns at once: the child waits on the gate
    assert steps_of(manager) == []
    set_weights(model, 2.0)  # the parent trains on; the child keeps its own view
    gate.touch()
    manager.wait()
    assert steps_of(manager) == [1]
    assert weight_in(manager.saver, 1) == 1.0
    set_weights(model, 3.0)
    manager.step(2)
    manager.close()
    assert steps_of(manager) == [1, 2]
    assert weight_in(manager.saver, 2) == 3.0
    assert float(model.emb.weight[0, 0]) == 3.0  # the parent's model is untouched


def test_fork_writer_error_surfaces_at_the_next_save(tmp_path, monkeypatch):
    gate = tmp_path / "gate"
    gate.touch()
    _gate_child_writes(monkeypatch, str(gate), fail=True)
    manager = CheckpointManager(Saver(make_model(), output_dir=str(tmp_path / "out")),
                                save_interval=1, async_save=True)
    manager.step(1)
    with pytest.raises(CheckpointError, match="No space left"):
        manager.step(2)
    assert steps_of(manager) == []
    assert not [n for n in os.listdir(tmp_path / "out") if n.startswith("ckpt_")]


def test_fork_is_not_used_for_device_or_remote_state(tmp_path):
    manager = CheckpointManager(Saver(make_model(), output_dir="memory://forkless/run"),
                                save_interval=1, async_save=True)
    assert not manager.writer.can_fork(manager.saver.collect_state())
    local = CheckpointManager(Saver(make_model(), output_dir=str(tmp_path)), async_save=True)
    local.writer.fork = False
    assert not local.writer.can_fork(local.saver.collect_state())
    assert torch.get_num_threads() >= 1


def _huge_bytes_at(address: int) -> int:
    """AnonHugePages (bytes) of the mapping holding ``address`` in /proc/self/smaps."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "AnonHugePages:":
                return int(line.split()[1]) * 1024
    return 0


def test_huge_page_ranges_are_aligned_merged_and_skip_small_tensors():
    from recframe.checkpoint.hugepages import HUGE_PAGE, huge_page_ranges

    big = torch.zeros(3 * HUGE_PAGE // 4 + 1000)
    ranges = huge_page_ranges([big, big[: big.numel() // 2], torch.zeros(10), big[::2]])
    assert len(ranges) == 1  # the half view lies inside; the strided view is skipped
    start, end = ranges[0]
    assert start % HUGE_PAGE == 0 and end % HUGE_PAGE == 0
    assert big.data_ptr() <= start < end <= big.data_ptr() + big.numel() * 4


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="Linux only")
def test_after_a_forked_save_the_state_is_backed_by_huge_pages(tmp_path):
    from recframe.checkpoint.hugepages import HUGE_PAGE, collapse, huge_page_ranges

    probe = torch.ones(4 * HUGE_PAGE // 4)
    if not collapse(huge_page_ranges([probe])):
        pytest.skip("MADV_COLLAPSE is not available on this kernel")
    assert torch.equal(probe, torch.ones_like(probe))  # contents kept
    model = torch.nn.Sequential(torch.nn.Embedding(64 * 1024, 32))  # 8 MiB table
    weight = model[0].weight
    expected = weight.detach().clone()
    address = -(-weight.data_ptr() // HUGE_PAGE) * HUGE_PAGE
    manager = CheckpointManager(Saver(model, output_dir=str(tmp_path)), async_save=True)
    assert manager.writer.can_fork(manager.saver.collect_state())
    manager.writer.huge_pages = False
    manager.save(1)
    manager.wait()
    before = _huge_bytes_at(address)
    if before:
        pytest.skip("the table is in huge pages already (THP 'always')")
    manager.writer.huge_pages = True
    manager.save(2)
    manager.wait()
    manager.close()
    assert _huge_bytes_at(address) >= HUGE_PAGE
    assert torch.equal(weight.detach(), expected)
