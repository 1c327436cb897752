"""The one decision point: `SaveDecisionPolicy` owns every "when to save" rule (one
path for one rank or many), `KeepPolicy` every "what to keep" rule."""

from __future__ import annotations

from recframe.checkpoint.policies import (
    AnyOf,
    BestN,
    IntervalPolicy,
    KeepPolicy,
    LatestN,
    SaveContext,
    SaveDecisionPolicy,
)
from recframe.checkpoint.saver import CheckpointInfo


class Ranks:
    """A max-over-ranks reduction that records its calls: the other rank says ``theirs``."""

    def __init__(self, theirs: int = 0) -> None:
        self.theirs, self.calls = theirs, []

    def __call__(self, mine: int) -> int:
        self.calls.append(mine)
        return max(mine, self.theirs)


def ctx(step, last=0, secs=0.0, **kw):
    return SaveContext(step=step, last_saved_step=last, seconds_since_save=secs, **kw)


def test_step_interval_force_and_never_twice():
    policy = SaveDecisionPolicy(IntervalPolicy(steps=5))
    assert [s for s in range(1, 16) if policy.decide(ctx(s)).save] == [5, 10, 15]
    assert not policy.decide(ctx(5, last=5)).save  # already saved at that step
    assert policy.decide(ctx(3, force=True)).save
    assert not policy.decide(ctx(3, last=3, force=True)).save


def test_one_rank_acts_on_time_and_preemption_at_once():
    policy = SaveDecisionPolicy(IntervalPolicy(seconds=10), agree_every=16, on_preemption=True)
    assert not policy.decide(ctx(3, secs=9.0)).save
    assert policy.decide(ctx(3, secs=10.0)).save
    decision = policy.decide(ctx(3, preemption=True))
    assert decision.save and decision.preempt


def test_several_ranks_agree_on_rank_local_signals_every_agree_every_steps():
    ranks = Ranks(theirs=SaveDecisionPolicy.TIMER)  # the other rank's timer fired
    policy = SaveDecisionPolicy(IntervalPolicy(steps=100, seconds=10), agree_every=4,
                                on_preemption=True, reduce_max=ranks)
    assert not policy.decide(ctx(3, world_size=2)).save  # not an agreement step
    assert ranks.calls == []  # no collective off the agreement steps
    assert policy.decide(ctx(4, world_size=2)).save  # agreed: max over ranks
    assert ranks.calls == [0]
    ranks.theirs = SaveDecisionPolicy.PREEMPTION  # the other rank got SIGTERM
    decision = policy.decide(ctx(8, world_size=2))
    assert decision.save and decision.preempt
    # my own SIGTERM waits for the agreement step too (every rank saves the same step)
    quiet = SaveDecisionPolicy(IntervalPolicy(steps=100), agree_every=4, on_preemption=True,
                               reduce_max=Ranks())
    assert not quiet.decide(ctx(5, world_size=2, preemption=True)).save
    assert quiet.decide(ctx(8, world_size=2, preemption=True)).preempt
    # the step interval needs no agreement: the same everywhere
    assert quiet.decide(ctx(100, world_size=2)).save


def _info(step, metric=None, chain=None):
    manifest = {"name": f"ckpt_{step}", "metrics": {} if metric is None else {"auc": metric}}
    if chain:
        manifest["incremental"] = {"kind": "delta" if len(chain) > 1 else "full",
                                   "chain": chain}
    return CheckpointInfo(step, f"/run/ckpt_{step}", manifest)


def test_keep_policy_owns_latest_best_restored_and_chains():
    found = [_info(1, 0.9), _info(2, 0.5), _info(3, 0.6), _info(4, 0.7)]
    keep = KeepPolicy(AnyOf(LatestN(1), BestN("auc", "max")))
    assert [c.step for c in keep.deletable(found)] == [2, 3]
    assert [c.step for c in keep.deletable(found, protect={3})] == [2]
    keep.restored(2)  # resumed from ckpt_2: kept until a newer one commits
    assert [c.step for c in keep.deletable(found)] == [3]
    keep.committed(2)
    assert keep.restored_step == 2
    keep.committed(5)
    assert keep.restored_step is None
    chain = [_info(1, chain=["ckpt_1"]), _info(2, chain=["ckpt_1", "ckpt_2"]),
             _info(3, chain=["ckpt_1", "ckpt_2", "ckpt_3"])]
    assert KeepPolicy(LatestN(1)).deletable(chain) == []  # the kept delta needs its chain


def test_next_decision_step_skips_only_steps_where_decide_says_no():
    """Every step before ``next_decision_step`` is one where `decide` (no force, no local
    preemption) saves nothing and runs no collective: the manager may skip it."""
    configs = [(IntervalPolicy(steps=5), False), (IntervalPolicy(), False),
               (IntervalPolicy(), True), (IntervalPolicy(steps=6, seconds=10), False),
               (IntervalPolicy(seconds=10), True), (IntervalPolicy(steps=7), True)]
    for interval, on_preemption in configs:
        for world in (1, 2):
            for agree in (1, 4):
                ranks = Ranks(theirs=SaveDecisionPolicy.PREEMPTION)  # the worst case
                policy = SaveDecisionPolicy(interval, agree, on_preemption, reduce_max=ranks)
                step = 0
                while step < 40:
                    nxt = policy.next_decision_step(step, world)
                    assert nxt > step
                    for quiet in range(step + 1, min(nxt, 41)):
                        decision = policy.decide(ctx(quiet, secs=1e9, world_size=world))
                        assert not decision.save and not decision.preempt, (interval, quiet)
                    assert ranks.calls == []  # no agreement step was skipped
                    step = nxt
                    if step <= 40:  # where it may act, it does (a save or an agreement)
                        decision = policy.decide(ctx(step, secs=1e9, world_size=world))
                        assert decision.save or ranks.calls, (interval, world, agree, step)
                        ranks.calls.clear()
    # one rank, no rule: never
    assert SaveDecisionPolicy(IntervalPolicy()).next_decision_step(10, 1) > 10**15
