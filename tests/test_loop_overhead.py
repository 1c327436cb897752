"""What the loop does per update beyond a hand-written loop, counted (not timed): host
syncs of the built-in hooks, hook dispatch, and page faults of the host allocator."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import ToyCTR, make_batches
from torch.utils._python_dispatch import TorchDispatchMode

from recframe import Hook, Trainer, TrainingArguments
from recframe.hooks import Event, HookRegistry, LoggerHook, ProgressBarHook, TensorBoardHook


class CountSyncs(TorchDispatchMode):
    """Counts reads of a tensor's value by the host (``item``, ``bool``, ``float``)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


class SyncsPerUpdate(Hook):
    priority = 10**9  # after every other hook's after_step

    def __init__(self, counter: CountSyncs) -> None:
        self.counter, self.per_update, self._last = counter, [], 0

    def after_step(self, trainer, metrics):
        self.per_update.append(self.counter.count - self._last)
        self._last = self.counter.count


def syncs_per_update(tmp_path, name: str, builtin_hooks: bool) -> list[int]:
    torch.manual_seed(0)
    args = TrainingArguments(output_dir=str(tmp_path / name), log_steps=25, save_steps=None,
                             report_to="tensorboard" if builtin_hooks else "none",
                             disable_tqdm=not builtin_hooks)
    counter = CountSyncs()
    probe = SyncsPerUpdate(counter)
    trainer = Trainer(ToyCTR(), args, train_dataset=make_batches(30, 8), hooks=[probe])
    kinds = {type(h) for h in trainer.hooks}
    assert ({LoggerHook, TensorBoardHook, ProgressBarHook} <= kinds) is builtin_hooks
    with counter:
        trainer.train(train_steps=30)
    return probe.per_update


def test_the_built_in_hooks_read_no_tensor_between_log_steps(tmp_path):
    with_hooks = syncs_per_update(tmp_path, "hooks", builtin_hooks=True)
    without = syncs_per_update(tmp_path, "bare", builtin_hooks=False)
    assert len(with_hooks) == len(without) == 30
    # logger + tensorboard + progress bar: syncs at the log steps (25, and 30 = the end);
    # before, the progress bar read the loss every 10 updates
    extra = [i + 1 for i, (a, b) in enumerate(zip(with_hooks, without)) if a != b]
    assert set(extra) <= {25, 30}, extra
    assert 25 in extra


# --- hook dispatch -----------------------------------------------------------------------
class OnlyAfterStep(Hook):
    def __init__(self) -> None:
        self.calls = 0

    def after_step(self, trainer, metrics):
        self.calls += 1


def test_events_go_only_to_the_hooks_that_override_them():
    a, b = OnlyAfterStep(), LoggerHook()
    registry = HookRegistry([a, b])
    assert registry._dispatch[Event.BEFORE_STEP] == ()
    assert registry._dispatch[Event.AFTER_STEP] == (a, b)
    assert registry._dispatch[Event.BEFORE_EVALUATE] == (b,)

    registry.fire("before_step", None)  # a string still names the event
    assert a.calls == 0
    registry.remove(a)
    assert registry._dispatch[Event.AFTER_STEP] == (b,)

    c = Hook()
    c.before_step = lambda trainer: setattr(c, "seen", True)  # set on the instance
    registry.add(c)
    registry.fire(Event.BEFORE_STEP, None)
    assert c.seen


def test_a_hook_added_during_training_gets_the_next_events(tmp_path):
    late = OnlyAfterStep()

    class AddLate(Hook):
        def after_step(self, trainer, metrics):
            if trainer.global_step == 2:
                trainer.add_hook(late)

    args = TrainingArguments(output_dir=str(tmp_path / "run"), report_to="none",
                             disable_tqdm=True)
    Trainer(ToyCTR(), args, train_dataset=make_batches(5, 4), hooks=[AddLate()]).train()
    assert late.calls == 3


# --- per-update decisions ----------------------------------------------------------------
def test_one_process_decides_skip_once_and_saves_only_where_a_rule_can_fire(
    tmp_path, monkeypatch
):
    """Per update on one process: one skip decision per window, with no agreement call
    (no other rank), and the save policy asked only at the steps where it can act."""
    from recframe import distributed
    from recframe.checkpoint.policies import SaveDecisionPolicy
    from recframe.optim.core import AccumulationWindow

    counts = {"skip": 0, "reduce": 0}
    decided: list[tuple[int, bool]] = []
    should_skip, decide = AccumulationWindow.should_skip, SaveDecisionPolicy.decide

    def counted_skip(self):
        counts["skip"] += 1
        return should_skip(self)

    def counted_decide(self, ctx):
        decided.append((ctx.step, ctx.force))
        return decide(self, ctx)

    monkeypatch.setattr(AccumulationWindow, "should_skip", counted_skip)
    monkeypatch.setattr(SaveDecisionPolicy, "decide", counted_decide)
    monkeypatch.setattr(distributed, "all_reduce_max_int",
                        lambda v: counts.__setitem__("reduce", counts["reduce"] + 1) or v)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), save_steps=4,
                             report_to="none", disable_tqdm=True)
    trainer = Trainer(ToyCTR(), args, train_dataset=make_batches(10, 4))
    calls_before = counts["skip"]
    trainer.train(train_steps=8)
    assert counts["skip"] - calls_before == 8 and counts["reduce"] == 0
    assert sorted({s for s, _ in decided}) == [1, 4, 8] and (8, True) in decided
    assert [c.step for c in trainer.checkpoint_manager.list()] == [4, 8]


# --- host allocator ----------------------------------------------------------------------
FAULTS = textwrap.dedent("""
    import resource, sys, torch
    torch.set_num_threads(1)
    if sys.argv[1] == "keep":
        from recframe.allocator import keep_freed_memory
        assert keep_freed_memory()
    def update():
        # an update's temporaries: blocks of a few MiB and one of 40 MiB (a large batch's
        # activations) freed at its end; glibc's default maps blocks above 32 MiB fresh
        # each time (10240 page faults), and may trim the heap's freed top
        xs = [torch.ones(1 << 18), torch.ones(4 << 20), torch.ones(10 << 20)]
        del xs
    for _ in range(5):
        update()
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(50):
        update()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start) / 50)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_kept_freed_memory_means_no_page_faults_per_update():
    env_free = {k: v for k, v in os.environ.items()
                if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}

    def faults(mode: str) -> float:
        out = subprocess.run([sys.executable, "-c", FAULTS, mode], env=env_free,
                             capture_output=True, text=True, check=True)
        return float(out.stdout.split()[-1])

    default, kept = faults("default"), faults("keep")
    assert default > 5000
    assert kept < 10


def test_keep_freed_memory_respects_the_users_allocator_settings():
    code = "from recframe.allocator import keep_freed_memory; print(keep_freed_memory())"
    env = dict(os.environ, MALLOC_TRIM_THRESHOLD_="1000000")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "False"


# --- garbage collection ----------------------------------------------------------------
def test_the_usual_update_leaves_no_reference_cycle(tmp_path):
    """Cyclic garbage is what makes Python's collector run and walk torch's object graph:
    an update must free everything it allocates by reference counting alone (a
    ``train`` call's own set-up and checkpoint may leave a few cycles, once per call)."""
    import gc

    args = TrainingArguments(output_dir=str(tmp_path / "run"), log_steps=1000, save_steps=None,
                             report_to="tensorboard")
    trainer = Trainer(ToyCTR(), args, train_dataset=make_batches(64, 8))
    trainer.train(train_steps=5)  # lazy set-up and imports happen here
    gc.collect()
    gc.disable()
    try:
        trainer.train(train_steps=10)  # 5 updates
        per_short_call = gc.collect()
        trainer.train(train_steps=55)  # 45 updates
        per_long_call = gc.collect()
    finally:
        gc.enable()
    assert trainer.global_step == 55
    # one cycle per update would add >= 40 objects to the long call's garbage
    assert per_long_call - per_short_call < 20, (per_short_call, per_long_call)


# --- the loop's own Python per update ------------------------------------------------------
def loop_calls_per_update(tmp_path, updates: int = 120) -> float:
    """Python calls per update made by recframe's own code on the usual path (k=1, the
    hooks ``TrainingArguments()`` enables, no skip): every call (Python or builtin)
    whose caller is a recframe frame, outside ``_train_step`` (the user's step: the
    model, its optimizers' tensor work) and counted over `_train_pass`."""
    import recframe

    root = os.path.dirname(recframe.__file__) + os.sep
    torch.manual_seed(0)
    args = TrainingArguments(output_dir=str(tmp_path / "calls"))
    trainer = Trainer(ToyCTR(), args, train_dataset=make_batches(updates + 10, 8))
    trainer.train(train_steps=5)  # warm: first-call set-up is not per update
    counted = {"calls": 0, "step_depth": 0}
    step_code = Trainer._train_step.__code__

    def profile(frame, event, arg):
        if event == "call":
            if frame.f_code is step_code:
                counted["step_depth"] += 1
            caller = frame.f_back
            if (counted["step_depth"] == (1 if frame.f_code is step_code else 0)
                    and caller is not None and caller.f_code.co_filename.startswith(root)):
                counted["calls"] += 1
        elif event == "return":
            if frame.f_code is step_code:
                counted["step_depth"] -= 1
        elif event == "c_call":
            if counted["step_depth"] == 0 and frame.f_code.co_filename.startswith(root):
                counted["calls"] += 1

    train_pass = trainer._train_pass

    def profiled_pass(feed, max_steps):
        sys.setprofile(profile)
        try:
            return train_pass(feed, max_steps)
        finally:
            sys.setprofile(None)

    trainer._train_pass = profiled_pass
    trainer.train(train_steps=5 + updates)
    assert trainer.global_step == 5 + updates
    return counted["calls"] / updates


def test_the_loops_own_python_calls_per_update_stay_few(tmp_path):
    """The loop's own Python per update (the trainer, its windows and views, the input
    stream, the default hooks' ``after_step``) is counted, so it cannot creep back:
    103 calls per update before these cuts (main at 22dc2f5), ~74 after."""
    per_update = loop_calls_per_update(tmp_path)
    assert per_update < 90, per_update
