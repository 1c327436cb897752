"""A job that saves checkpoints back to back, to be SIGKILLed at random moments.

usage: save_loop_job.py OUTPUT_DIR

A supervisor reads commands on stdin. ``go`` forks a worker (printing ``forked PID``)
that restores the latest
checkpoint (checking it holds exactly what its step wrote), prints ``ready PID STEP``,
then saves ``ckpt_<n>`` for n = STEP+1, STEP+2, ... printing ``committed N`` after each
commit, until it is killed. When the worker dies the supervisor prints ``dead PID
STATUS`` and waits for the next command; ``stop`` (or end of input) ends it. Forking
from a warm supervisor keeps a trial cheap: torch is imported once.

The state of step n is deterministic, so any committed checkpoint can be checked:
embedding weights all n, Adagrad sums all n + 0.5, the dense layer -n, the extra and
io_state entries n. torchrec is never imported here.

Incremental mode (``RECFRAME_TEST_INCREMENTAL=1``, or ``INCREMENTAL = True``): step n
writes only the table rows r with r % STRIDE == n % STRIDE (weights n, sums n + 0.5; a
row never written is 0 and 0.5) and tells the row tracker, so checkpoints are a full
one every FULL_EVERY saves and deltas between.
"""

from __future__ import annotations

import math
import os
import sys
import traceback

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from recframe.checkpoint import CheckpointManager, Saver  # noqa: E402

ROWS, DIM = 20000, 64  # 5.1 MB of weights + 5.1 MB of Adagrad state
CHUNK_BYTES = 256 << 10  # 20 chunks per table
CONCURRENCY = 4
MAX_KEEP = 3
MAX_STEPS = 100_000  # a safety stop; the test kills the worker long before
INCREMENTAL = os.environ.get("RECFRAME_TEST_INCREMENTAL") == "1"
STRIDE = 4
FULL_EVERY = 3


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.EmbeddingBag(ROWS, DIM, mode="sum", sparse=True)
        self.head = nn.Linear(DIM, 2)


class Progress:
    """An extra object whose state is a plain tree (with a NaN and bytes)."""

    def __init__(self) -> None:
        self.step = -1

    def state_dict(self):
        return {"step": self.step, "tag": f"step-{self.step}", "nan": float("nan"),
                "raw": str(self.step).encode()}

    def load_state_dict(self, state):
        assert state["tag"] == f"step-{state['step']}" and state["raw"] == str(
            state["step"]).encode() and math.isnan(state["nan"]), state
        self.step = state["step"]


class Position:
    def __init__(self) -> None:
        self.value = -1

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state):
        self.value = state["value"]


def build(output_dir: str):
    """(model, optimizer, progress, position, saver): a fresh job state."""
    model = Net()
    if INCREMENTAL:  # a sparse optimizer: the row tracker knows its tables
        from recframe.optim.sparse import SparseAdagrad

        with torch.no_grad():
            model.emb.weight.zero_()
        opt = SparseAdagrad(model.emb.parameters(), lr=0.1)
        opt.state[model.emb.weight]["sum"] = torch.full_like(model.emb.weight, 0.5)
    else:
        opt = torch.optim.Adagrad(model.emb.parameters(), lr=0.1)
    progress, position = Progress(), Position()
    saver = Saver(model, opt, output_dir=output_dir, max_keep=MAX_KEEP,
                  concurrency=CONCURRENCY, chunk_bytes=CHUNK_BYTES)
    saver.register_for_checkpointing("progress", progress)
    saver.register_io_state("position", position)
    return model, opt, progress, position, saver


def manager_for(saver) -> CheckpointManager:
    return CheckpointManager(saver, save_interval=1, incremental=INCREMENTAL,
                             full_checkpoint_every=FULL_EVERY)


def touched(n: int) -> torch.Tensor:
    """The table rows step ``n`` writes."""
    return torch.arange(n % STRIDE, ROWS, STRIDE) if INCREMENTAL else torch.arange(ROWS)


def expected_rows(n: int) -> torch.Tensor:
    """Per table row, the last step <= n that wrote it (0: never)."""
    if not INCREMENTAL:
        return torch.full((ROWS,), float(n))
    rows = torch.arange(ROWS)
    last = n - torch.remainder(n - rows, STRIDE)
    return torch.where(last >= 1, last, 0).float()


def set_state(model, opt, progress, position, n: int, tracker=None) -> None:
    rows = touched(n)
    with torch.no_grad():
        model.emb.weight.index_fill_(0, rows, n)
        model.head.weight.fill_(-n)
        model.head.bias.fill_(-n)
    for state in opt.state.values():
        state["sum"].index_fill_(0, rows, n + 0.5)
        if "step" in state:
            state["step"].fill_(n)
    if tracker is not None:
        tracker.mark("emb.weight", rows)
    progress.step = n
    position.value = n


def problems(model, opt, progress, position, n: int) -> list[str]:
    """What differs from the state that step ``n`` wrote (empty: exactly it)."""
    out = []
    want = expected_rows(n).unsqueeze(1)
    if not torch.all(model.emb.weight == want):
        out.append(f"embedding weights are not all {n}")
    if not (torch.all(model.head.weight == -n) and torch.all(model.head.bias == -n)):
        out.append(f"dense weights are not all {-n}")
    for state in opt.state.values():
        if not torch.all(state["sum"] == want + 0.5):
            out.append(f"optimizer sums are not all {n + 0.5}")
        if "step" in state and float(state["step"]) != n:
            out.append(f"optimizer step is {float(state['step'])}, not {n}")
    if progress.step != n:
        out.append(f"extra progress is {progress.step}, not {n}")
    if position.value != n:
        out.append(f"io_state position is {position.value}, not {n}")
    return out


def worker(output_dir: str, parent: int) -> int:
    torch.set_num_threads(1)
    model, opt, progress, position, saver = build(output_dir)
    manager = manager_for(saver)
    step = manager.restore()
    if step:
        bad = problems(model, opt, progress, position, step)
        if bad:
            say(f"bad {step} {'; '.join(bad)}")
            return 4
    say(f"ready {os.getpid()} {step}")
    while step < MAX_STEPS and os.getppid() == parent:
        step += 1
        set_state(model, opt, progress, position, step, manager.tracker)
        manager.step(step)
        say(f"committed {step}")
    return 0


def say(line: str) -> None:
    """One line in one write(2): a SIGKILL can't leave half of it for the next line."""
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), (line + "\n").encode())


def main() -> None:
    output_dir = sys.argv[1]
    # warm up once here, not in every worker: the first optimizer built imports
    # torch._dynamo (seconds)
    torch.optim.Adagrad([nn.Parameter(torch.zeros(1))], lr=0.1)
    while True:
        line = sys.stdin.readline()
        if not line or line.strip() == "stop":
            return
        if line.strip() != "go":
            continue
        sys.stdout.flush()
        sys.stderr.flush()
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:
            code = 3
            try:
                code = worker(output_dir, parent)
            except BaseException:  # noqa: BLE001 - report and exit the child only
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        print(f"forked {pid}", flush=True)
        _, status = os.waitpid(pid, 0)
        print(f"dead {pid} {status}", flush=True)


if __name__ == "__main__":
    main()
