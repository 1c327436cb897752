"""Device placement in one place: which device, moving batches, autocast, the
optimizer step, and RNG state.

`CPUDevice` and `CUDADevice` live here; the XLA device (torch-xla) plugs in through
`resolve_device("xla")`. Nothing on the CPU path calls a CUDA API.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import sys
import types
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch


class Device:
    """A training device: placement, autocast, optimizer stepping and RNG state."""

    name = "cpu"

    @property
    def torch_device(self) -> torch.device:
        return torch.device("cpu")

    def move(self, data: Any, non_blocking: bool = False) -> Any:
        """Move tensors, dicts, lists, dataclasses and objects with ``.to`` (Batch,
        KeyedJaggedTensor) to this device."""
        return move_to_device(data, self.torch_device, non_blocking)

    def wrap_loader(
        self, items: Iterable[tuple[Any, Any]], prefetch: int = 1
    ) -> Iterator[tuple[Any, Any]]:
        """The input pipeline's device stage: ``(host batch, position)`` pairs in, the
        same pairs with the batch on this device out, in order. Here each batch is moved
        as it is pulled; `recframe.xla.XLADevice` streams them through torch-xla's
        parallel loader. The iterator returned has ``close()``."""
        if type(self).move is CPUDevice.move and isinstance(items, types.GeneratorType):
            return items  # nothing to move: no pass-through generator per batch
        return ((self.move(batch), position) for batch, position in items)

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """Move the model's parameters here (a no-op for modules already placed)."""
        return model.to(self.torch_device)

    def autocast(self, enabled: bool) -> contextlib.AbstractContextManager:
        """bfloat16 autocast when ``enabled``, else a no-op context."""
        if not enabled:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.torch_device.type, dtype=torch.bfloat16)

    def optimizer_step(self, optimizer: Any) -> None:
        optimizer.step()

    def mark_step(self) -> None:
        """End of an update: XLA cuts its graph here; eager devices do nothing."""

    def synchronize(self) -> None:
        """Wait for queued device work (for timing); a no-op on CPU."""

    def rng_state(self) -> dict[str, Any]:
        """Python, numpy and torch RNG states (plus this device's own)."""
        py = random.getstate()
        np_state = np.random.get_state()
        return {
            "python": {"version": py[0], "state": list(py[1]), "gauss": py[2]},
            "numpy": {
                "kind": np_state[0],
                "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                "pos": int(np_state[2]),
                "has_gauss": int(np_state[3]),
                "cached_gaussian": float(np_state[4]),
            },
            "torch": torch.get_rng_state(),
        }

    def set_rng_state(self, state: dict[str, Any]) -> None:
        py = state["python"]
        random.setstate((py["version"], tuple(int(v) for v in py["state"]), py["gauss"]))
        n = state["numpy"]
        np.random.set_state(
            (
                n["kind"],
                torch.as_tensor(n["keys"]).numpy().astype(np.uint32),
                int(n["pos"]),
                int(n["has_gauss"]),
                float(n["cached_gaussian"]),
            )
        )
        torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.torch_device})"


class CPUDevice(Device):
    name = "cpu"

    def move(self, data: Any, non_blocking: bool = False) -> Any:
        # CPU batches are already in place; skip the recursive walk on the hot path.
        return data


class CUDADevice(Device):
    name = "cuda"

    def __init__(self, index: int | None = None) -> None:
        if index is None:
            index = int(os.environ.get("LOCAL_RANK", 0))
        self.index = index
        torch.cuda.set_device(index)

    @property
    def torch_device(self) -> torch.device:
        return torch.device("cuda", self.index)

    def move(self, data: Any, non_blocking: bool = True) -> Any:
        return move_to_device(data, self.torch_device, non_blocking)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.torch_device)

    def rng_state(self) -> dict[str, Any]:
        state = super().rng_state()
        state["cuda"] = torch.cuda.get_rng_state(self.torch_device)
        return state

    def set_rng_state(self, state: dict[str, Any]) -> None:
        super().set_rng_state(state)
        if "cuda" in state:
            torch.cuda.set_rng_state(torch.as_tensor(state["cuda"]).cpu(), self.torch_device)


class RNGState:
    """The process's RNG streams as a checkpointable object (``io_state`` part)."""

    def __init__(self, device: Device) -> None:
        self.device = device

    def state_dict(self) -> dict[str, Any]:
        return self.device.rng_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.device.set_rng_state(state)


def xla_available() -> bool:
    try:
        import torch_xla  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not usable"
        return False
    return True


def device_kind(spec: str = "auto") -> str:
    """The kind of device ``resolve_device(spec)`` gives (``"cpu"``, ``"cuda"`` or
    ``"xla"``) without building it, e.g. to choose what a model needs beforehand."""
    if spec == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "xla" if os.environ.get("PJRT_DEVICE") and xla_available() else "cpu"
    return spec


def resolve_device(spec: str = "auto") -> Device:
    """Pick the device for ``TrainingArguments.device``.

    auto: cuda when available, else xla when torch_xla imports and ``PJRT_DEVICE`` is
    set, else cpu.
    """
    if spec == "auto":
        if torch.cuda.is_available():
            return CUDADevice()
        if os.environ.get("PJRT_DEVICE") and xla_available():
            spec = "xla"
        else:
            return CPUDevice()
    if spec == "cpu":
        return CPUDevice()
    if spec == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                "TrainingArguments.device='cuda' but torch sees no CUDA device; "
                "use device='cpu' or 'auto'"
            )
        return CUDADevice()
    if spec == "xla":
        if not xla_available():
            raise ValueError(
                f"TrainingArguments.device='xla' needs torch_xla, which this environment "
                f"({sys.prefix}) does not have and must not get (it pins another torch): "
                "build the XLA venv with `make setup-xla` and run .venv-xla/bin/recframe "
                "(or .venv-xla/bin/python) with PJRT_DEVICE set (TPU or CPU); see docs/tpu.md"
            )
        from recframe.xla import XLADevice

        return XLADevice()
    raise ValueError(
        f"TrainingArguments.device={spec!r} is invalid: must be one of 'auto', 'cpu', "
        "'cuda', 'xla'"
    )


def move_to_device(data: Any, device: torch.device, non_blocking: bool = False) -> Any:
    """Recursively move ``data`` to ``device``."""
    if isinstance(data, torch.Tensor):
        return data.to(device, non_blocking=non_blocking)
    if isinstance(data, Mapping):
        return type(data)({k: move_to_device(v, device, non_blocking) for k, v in data.items()})
    if isinstance(data, tuple) and hasattr(data, "_fields"):  # namedtuple
        return type(data)(*(move_to_device(v, device, non_blocking) for v in data))
    if isinstance(data, (list, tuple)):
        return type(data)(move_to_device(v, device, non_blocking) for v in data)
    to = getattr(data, "to", None)
    if callable(to):
        try:
            return to(device=device, non_blocking=non_blocking)
        except TypeError:
            return to(device)
    if dataclasses.is_dataclass(data) and not isinstance(data, type):
        return dataclasses.replace(
            data,
            **{
                f.name: move_to_device(getattr(data, f.name), device, non_blocking)
                for f in dataclasses.fields(data)
                if f.init
            },
        )
    return data


def set_seed(seed: int) -> None:
    """Seed python, numpy and torch (all devices) for a reproducible run."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Temporarily set torch's intra-op thread count (benchmarks)."""
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
