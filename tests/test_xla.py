"""The XLA (TPU) path: `recframe.xla`, the ``"nn"`` embedding back end, and training,
gradient accumulation, checkpoints and exact resume on an XLA device.

Tests marked ``xla`` need torch_xla: `make test-xla` runs them in .venv-xla on the PJRT
CPU client (PJRT_DEVICE=CPU); in the main venv they skip with the reason. The others
check the device-independent pieces (padding, the nn tables, the static-shape
optimizer step) with plain torch, in the main lane.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn
from torchrec.datasets.utils import Batch

from recframe import Hook, Trainer, TrainingArguments
from recframe.data import SyntheticCriteo, make_kjt, split_batch
from recframe.device import xla_available
from recframe.models import DLRM, DeepFM, EmbeddingBagTables, PaddedBags
from recframe.optim import dense_parameters, sparse_parameters
from recframe.optim.sparse import SPARSE_OPTIMIZERS
from recframe.xla import dense_rows_step, pad_sparse_features, use_nn_embeddings

HAVE_XLA = xla_available()
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOB = os.path.join(REPO, "tests", "jobs", "xla_job.py")


def xla(fn):
    """Marked ``xla``; skipped (with the reason) where torch_xla is not installed."""
    fn = pytest.mark.skipif(
        not HAVE_XLA,
        reason="torch_xla is not installed here: `make test-xla` runs the xla tests in "
        ".venv-xla on the PJRT CPU client",
    )(fn)
    return pytest.mark.xla(fn)


@pytest.fixture
def pjrt_cpu(monkeypatch):
    monkeypatch.setenv("PJRT_DEVICE", os.environ.get("PJRT_DEVICE", "CPU"))


def tiny_dlrm(**kwargs) -> DLRM:
    return DLRM(num_embeddings=50, embedding_dim=8, num_dense=13, dense_arch=(16, 8),
                over_arch=(16, 1), **kwargs)


def tiny_data(num_batches=8, batch_size=32, ids=(1, 3), seed=0) -> SyntheticCriteo:
    return SyntheticCriteo(num_batches=num_batches, batch_size=batch_size, num_embeddings=50,
                           ids_per_feature=ids, seed=seed)


def quiet_args(tmp_path, **kwargs) -> TrainingArguments:
    base = dict(output_dir=str(tmp_path / "out"), report_to="none", disable_tqdm=True,
                log_steps=1000, save_steps=1000)
    base.update(kwargs)
    return TrainingArguments(**base)


# --------------------------------------------------------------------------- plain torch


def test_padded_bags_hold_every_id_of_a_kjt_in_place():
    # bags: key a: [1, 2], [], [3]; key b: [4], [5, 6, 7], [8]
    kjt = make_kjt(["a", "b"], torch.tensor([1, 2, 3, 4, 5, 6, 7, 8]),
                   torch.tensor([[2, 0, 1], [1, 3, 1]]))
    bags = PaddedBags.from_kjt(kjt)
    assert bags.keys() == ["a", "b"] and bags.stride() == 3
    assert bags.bag_size == 4  # the longest bag (3) rounded up to a power of two
    assert bags.ids.tolist() == [
        [[1, 2, 0, 0], [0, 0, 0, 0], [3, 0, 0, 0]],
        [[4, 0, 0, 0], [5, 6, 7, 0], [8, 0, 0, 0]],
    ]
    assert bags.weights.sum(dim=2).tolist() == [[2, 0, 1], [1, 3, 1]]
    assert PaddedBags.from_kjt(kjt, bag_size=3).ids.shape == (2, 3, 3)
    with pytest.raises(ValueError, match="more than bag_size=2"):
        PaddedBags.from_kjt(kjt, bag_size=2)


def test_pad_sparse_features_replaces_the_kjt_of_a_batch_and_nothing_else():
    batch = next(iter(tiny_data()))
    padded = pad_sparse_features({"b": batch, "n": 3})
    assert isinstance(padded["b"].sparse_features, PaddedBags)
    assert padded["b"].dense_features is batch.dense_features and padded["n"] == 3
    assert padded["b"].sparse_features.keys() == batch.sparse_features.keys()


@pytest.mark.parametrize("model_cls", [DLRM, DeepFM])
def test_nn_backend_is_the_torchrec_model_with_plain_tables(model_cls):
    """Same parameter names and initial values, same loss and gradients, from a KJT
    and from its padded form."""
    kwargs = dict(num_embeddings=50, embedding_dim=8)
    torch.manual_seed(0)
    ref = model_cls(**kwargs)
    torch.manual_seed(0)
    alt = model_cls(embedding_backend="nn", **kwargs)
    assert isinstance(alt.ebc, EmbeddingBagTables) and alt.embedding_backend == "nn"
    assert ref.embedding_backend == "torchrec"
    a, b = ref.state_dict(), alt.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    batch = next(iter(tiny_data(ids=(0, 3))))  # empty bags too
    padded = Batch(batch.dense_features, PaddedBags.from_kjt(batch.sparse_features),
                   batch.labels)
    loss_ref, loss_kjt, loss_pad = ref(batch), alt(batch), alt(padded)
    torch.testing.assert_close(loss_kjt, loss_ref)
    torch.testing.assert_close(loss_pad, loss_ref)
    loss_ref.backward()
    loss_pad.backward()
    grads_ref = dict(ref.named_parameters())
    for name, p in alt.named_parameters():
        assert p.grad is not None and not p.grad.is_sparse, name
        torch.testing.assert_close(p.grad, grads_ref[name].grad, msg=name)


def test_nn_backend_rejects_an_unknown_name():
    with pytest.raises(ValueError, match="embedding_backend='fbgemm' is invalid"):
        tiny_dlrm(embedding_backend="fbgemm")


def test_use_nn_embeddings_keeps_the_parameter_objects():
    model = tiny_dlrm()
    before = sparse_parameters(model)
    opt = torch.optim.Adagrad(before, lr=0.1)
    assert use_nn_embeddings(model) == ["model.sparse_arch.embedding_bag_collection"]
    assert isinstance(model.ebc, EmbeddingBagTables)
    after = sparse_parameters(model)
    assert [id(p) for p in after] == [id(p) for p in opt.param_groups[0]["params"]]
    assert use_nn_embeddings(model) == []  # nothing left to swap


@pytest.mark.parametrize("name", sorted(SPARSE_OPTIMIZERS))
def test_static_shape_step_equals_the_lazy_step(name):
    """`dense_rows_step` (all rows, masked: what XLA runs) == the optimizer's own step
    (``nonzero()`` rows), over steps where some rows get no gradient, with an
    accumulation scale pending."""
    g = torch.Generator().manual_seed(0)
    init = torch.randn(12, 4, generator=g)
    lazy_p, static_p = nn.Parameter(init.clone()), nn.Parameter(init.clone())
    hparams = {"lr": 0.05}
    lazy, static = (SPARSE_OPTIMIZERS[name]([p], **hparams) for p in (lazy_p, static_p))
    for step in range(4):
        grad = torch.randn(12, 4, generator=g)
        grad[torch.randperm(12, generator=g)[:5]] = 0  # untouched rows
        for opt, p in ((lazy, lazy_p), (static, static_p)):
            opt.zero_grad()
            p.grad = grad.clone()
            if hasattr(opt, "scale_accumulated_gradients"):
                opt.scale_accumulated_gradients(0.5)
        lazy.step()
        dense_rows_step(static)
        torch.testing.assert_close(static_p.detach(), lazy_p.detach(), rtol=1e-6, atol=1e-7,
                                   msg=f"{name} step {step}")
    for key, value in lazy.state[lazy_p].items():
        other = static.state[static_p][key]
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(other, value, rtol=1e-6, atol=1e-7, msg=key)
        else:
            assert other == value, key
    assert not torch.equal(static_p.detach(), init)


@pytest.mark.skipif(HAVE_XLA, reason="torch_xla is installed here")
def test_device_xla_without_torch_xla_says_how_to_get_it():
    from recframe.device import resolve_device

    with pytest.raises(ValueError, match="needs torch_xla"):
        resolve_device("xla")


# --------------------------------------------------------------------------- on XLA


@xla
def test_xla_device_resolution(pjrt_cpu):
    from recframe.device import resolve_device
    from recframe.xla import XLADevice

    for spec in ("xla", "auto"):
        device = resolve_device(spec)
        assert isinstance(device, XLADevice), spec
        assert device.torch_device.type == "xla"
    assert isinstance(torch.ones(2).to(device.torch_device) + 1, torch.Tensor)


@xla
def test_optimizers_built_on_the_cpu_model_step_the_xla_parameters(tmp_path, pjrt_cpu):
    model = tiny_dlrm()
    params = list(model.parameters())
    dense = torch.optim.Adam(dense_parameters(model), lr=0.01)
    sparse = torch.optim.Adagrad(sparse_parameters(model), lr=0.1)
    before = {id(p): p.detach().clone() for p in params}
    trainer = Trainer(model=model, args=quiet_args(tmp_path, device="xla", train_steps=2),
                      train_dataset=tiny_data(), dense_optimizers=(dense, None),
                      sparse_optimizer=sparse)
    assert isinstance(model.ebc, EmbeddingBagTables)  # chosen automatically on XLA
    trainer.train()
    assert [id(p) for p in model.parameters()] == [id(p) for p in params]
    for p in params:
        assert p.device.type == "xla"
        assert not torch.equal(p.detach().cpu(), before[id(p)]), p.shape


class CompileCounts(Hook):
    def __init__(self) -> None:
        self.counts: list[int] = []

    def after_step(self, trainer, metrics):
        from recframe.xla import compile_count

        self.counts.append(compile_count())


@xla
@pytest.mark.parametrize("accum", [1, 3])
def test_accumulation_compiles_once_then_reuses_the_graphs(tmp_path, pjrt_cpu, accum):
    """The compile count stays constant after the first two updates (the first one
    also builds the optimizer state), across an epoch boundary too; a new shape does
    compile (the counter counts)."""
    from recframe.xla import compile_count, fallback_ops

    hook = CompileCounts()
    data = tiny_data(num_batches=4 * accum, ids=(1, 4), seed=accum)
    torch.manual_seed(0)
    model = tiny_dlrm()
    trainer = Trainer(model=model, train_dataset=data, hooks=[hook], args=quiet_args(
        tmp_path, device="xla", train_steps=7, gradient_accumulation_steps=accum))
    trainer.train()
    counts = hook.counts
    assert len(counts) == 7 and counts[0] >= 1
    assert counts[1:] == [counts[1]] * 6, counts
    # only the host reads of scalars (the loss check) leave the device, no op falls back
    assert set(fallback_ops()) <= {"aten::_local_scalar_dense"}, fallback_ops()
    other = next(iter(tiny_data(batch_size=20 + accum, ids=(1, 4))))  # a new batch size
    with torch.no_grad():
        loss = model(trainer.device.move(other))
    trainer.device.mark_step()
    assert float(loss) > 0 and compile_count() > counts[-1]


@xla
def test_accumulated_micro_batches_train_like_the_whole_batch(tmp_path, pjrt_cpu):
    batches = list(tiny_data(num_batches=3, batch_size=32))
    halves = [half for b in batches for half in split_batch(b, 2)]
    results = []
    for k, data in ((1, batches), (2, halves)):
        torch.manual_seed(0)
        model = tiny_dlrm()
        Trainer(model=model, train_dataset=data, args=quiet_args(
            tmp_path / str(k), device="xla", train_steps=3, gradient_accumulation_steps=k,
        )).train()
        results.append({k: v.cpu() for k, v in model.state_dict().items()})
    whole, accumulated = results
    for key in whole:
        torch.testing.assert_close(accumulated[key], whole[key], rtol=1e-4, atol=1e-5,
                                   msg=key)


@xla
def test_checkpoint_round_trip_restores_onto_the_xla_device(tmp_path, pjrt_cpu):
    torch.manual_seed(0)
    model = tiny_dlrm()
    args = quiet_args(tmp_path, device="xla", train_steps=3, bf16=True)
    trainer = Trainer(model=model, args=args, train_dataset=tiny_data())
    trainer.train()
    saved = {k: v.cpu() for k, v in model.state_dict().items()}
    sparse_state = {k: v.cpu() for k, v in
                    next(iter(trainer.sparse_optimizer.optimizer.state.values())).items()}
    xla_seed = trainer.device.rng_state()["xla"]

    torch.manual_seed(1)  # other initial values: the restore must overwrite them
    fresh = tiny_dlrm()
    again = Trainer(model=fresh, args=args, train_dataset=tiny_data())
    key = "model.over_arch.model.1.weight"
    assert not torch.equal(fresh.state_dict()[key].cpu(), saved[key])
    torch.ones(3, device=again.device.torch_device).uniform_()  # move the XLA stream on
    assert again.restore() == 3
    for key, value in fresh.state_dict().items():
        assert value.device.type == "xla", key
        assert torch.equal(value.cpu(), saved[key]), key
    state = next(iter(again.sparse_optimizer.optimizer.state.values()))
    for key, value in state.items():
        assert value.device.type == "xla" and torch.equal(value.cpu(), sparse_state[key]), key
    assert again.device.rng_state()["xla"] == xla_seed


@xla
def test_xla_rng_state_round_trip(pjrt_cpu):
    from recframe.xla import XLADevice

    device = XLADevice()
    x = torch.ones(256, device=device.torch_device)
    state = device.rng_state()
    first = nn.functional.dropout(x, 0.5).cpu()
    second = nn.functional.dropout(x, 0.5).cpu()
    device.set_rng_state(state)
    again = nn.functional.dropout(x, 0.5).cpu()
    assert torch.equal(first, again) and not torch.equal(first, second)


@xla
def test_parallel_loader_keeps_order_positions_and_errors(pjrt_cpu):
    from recframe.xla import XLADevice

    device = XLADevice()
    items = [({"x": torch.full((2,), float(i))}, {"next": i + 1}) for i in range(5)]
    out = list(device.wrap_loader(iter(items), prefetch=2))
    assert [pos for _, pos in out] == [item[1] for item in items]
    assert [float(b["x"][0]) for b, _ in out] == [0, 1, 2, 3, 4]
    assert all(b["x"].device.type == "xla" for b, _ in out)

    def failing():
        yield {"x": torch.zeros(1)}, None
        raise OSError("disk gone")

    feed = device.wrap_loader(failing())
    next(feed)
    with pytest.raises(OSError, match="disk gone"):
        next(feed)


@xla
def test_closing_the_parallel_loader_stops_reading_the_dataset(pjrt_cpu):
    from recframe.xla import XLADevice

    pulled = []

    def endless():
        i = 0
        while True:
            pulled.append(i)
            yield torch.full((1,), float(i)), i
            i += 1

    feed = XLADevice().wrap_loader(endless(), prefetch=2)
    batch, position = next(feed)
    assert position == 0
    feed.close()
    count = len(pulled)
    assert count < 50  # bounded look-ahead
    for _ in range(20):  # nothing reads on after close() returned
        torch.ones(64).sum()
    assert len(pulled) == count
    assert list(feed) == []


@xla
def test_nothing_on_the_xla_path_calls_cuda(tmp_path, pjrt_cpu, monkeypatch):
    """No recframe code calls a torch.cuda function while training, saving and resuming
    on the XLA device (torch's own optimizers may ask whether CUDA is there)."""
    import recframe

    package = os.path.dirname(os.path.abspath(recframe.__file__)) + os.sep
    calls = []

    def watch(name, original):
        def wrapper(*args, **kwargs):
            caller = os.path.abspath(sys._getframe(1).f_code.co_filename)
            if caller.startswith(package):
                calls.append(f"torch.cuda.{name} from {caller}")
            return original(*args, **kwargs)

        return wrapper

    for name in ("is_available", "synchronize", "set_device", "get_rng_state", "set_rng_state",
                 "current_device", "device_count", "current_stream", "empty_cache",
                 "manual_seed", "manual_seed_all"):
        monkeypatch.setattr(torch.cuda, name, watch(name, getattr(torch.cuda, name)))
    torch.manual_seed(0)
    args = quiet_args(tmp_path, device="xla", train_steps=2, save_steps=1)
    Trainer(model=tiny_dlrm(), args=args, train_dataset=tiny_data()).train()
    again = Trainer(model=tiny_dlrm(), args=quiet_args(tmp_path, device="xla", train_steps=3),
                    train_dataset=tiny_data())
    again.train()
    assert again.global_step == 3
    assert calls == []
    from recframe.device import resolve_device

    resolve_device("auto")  # the watch works: "auto" asks recframe-side whether CUDA is there
    assert len(calls) == 1 and "is_available" in calls[0], calls


def run_job(out, result, *extra, expect_kill=False):
    env = dict(os.environ, OMP_NUM_THREADS="1", PJRT_DEVICE=os.environ.get("PJRT_DEVICE", "CPU"))
    proc = subprocess.run(
        [sys.executable, JOB, str(out), str(result), *map(str, extra)],
        capture_output=True, text=True, timeout=600, env=env,
    )
    if expect_kill:
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    else:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@xla
@pytest.mark.parametrize("sparse_opt", ["rowwise_adagrad", "adam"])
def test_dlrm_trains_saves_is_killed_and_resumes_bit_for_bit(tmp_path, sparse_opt):
    """A DLRM (dropout included: the XLA RNG stream) with gradient accumulation trains on
    the XLA device and its loss falls; a run SIGKILLed after update 7 and run again
    resumes from ckpt_6 and ends with exactly the parameters and optimizer states of
    an uninterrupted run."""
    steps, kill_at = 12, 7
    common = ["--steps", steps, "--accum", 2, "--save-steps", 3, "--sparse-opt", sparse_opt]
    run_job(tmp_path / "straight", tmp_path / "a.npz", *common)
    run_job(tmp_path / "resumed", tmp_path / "unused.npz", *common, "--kill-at", kill_at,
            expect_kill=True)
    assert not (tmp_path / "unused.npz").exists()
    proc = run_job(tmp_path / "resumed", tmp_path / "b.npz", *common)
    assert "resumed from" in proc.stderr and "ckpt_6" in proc.stderr, proc.stderr[-3000:]
    with np.load(tmp_path / "a.npz") as za, np.load(tmp_path / "b.npz") as zb:
        a, b = dict(za), dict(zb)
    assert str(a["tables"]) == "EmbeddingBagTables" and str(a["table_device"]).startswith("xla")
    losses = a["losses"]
    assert len(losses) == steps and np.isfinite(losses).all()
    assert losses[-4:].mean() < losses[:4].mean() - 0.05, losses
    compiles = a["compiles"]
    assert (compiles[1:] == compiles[1]).all(), compiles  # no recompiling after warm-up
    assert int(b["global_step"]) == steps
    # b recorded only the steps after the resume: the same losses as a's
    np.testing.assert_array_equal(b["losses"], losses[-len(b["losses"]):])
    keys = [k for k in a if k.startswith(("model.", "dense_opt.", "sparse_opt."))]
    assert keys == [k for k in b if k.startswith(("model.", "dense_opt.", "sparse_opt."))]
    assert any(k.startswith("sparse_opt.") for k in keys)
    for key in keys:
        np.testing.assert_array_equal(b[key], a[key], err_msg=key)


@xla
def test_cli_trains_on_the_xla_device(tmp_path):
    """The default command line (the fused torchrec back end on other devices) trains
    on XLA with plain tables."""
    env = dict(os.environ, PJRT_DEVICE=os.environ.get("PJRT_DEVICE", "CPU"))
    proc = subprocess.run(
        [sys.executable, "-m", "recframe", "train", "--device", "xla", "--train_steps", "4",
         "--num_train_batches", "8", "--num_eval_batches", "2", "--batch_size", "64",
         "--num_embeddings", "100", "--output_dir", str(tmp_path / "out"),
         "--disable_tqdm", "true", "--report_to", "none"],
        capture_output=True, text=True, timeout=600, env=env, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "EmbeddingBagTables" in proc.stderr  # the tables were swapped for XLA
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("final eval: ")]
    assert len(lines) == 1, proc.stdout
    assert (tmp_path / "out" / "ckpt_4").is_dir()
