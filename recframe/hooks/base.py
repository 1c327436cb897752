"""Hook events, the `Hook` base class and the one dispatcher that calls them.

The events read as the training loop itself::

    before_train
      before_epoch
        before_step
          k micro-batches of _train_step (k = gradient_accumulation_steps)
        after_step(metrics)          # once per optimizer update
        before_evaluate / after_evaluate(metrics)   # when an evaluation is due
        after_save(path)             # when a checkpoint was committed
      after_epoch
    after_train
    end                              # once, when the outermost call returns

``after_restore(step)`` fires when a checkpoint was loaded. A hook steers the
loop through ``trainer.control`` (``should_stop``, ``should_save``,
``should_evaluate``, ``should_log``) and may keep state for checkpoints through
``state_dict``/``load_state_dict``.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from recframe.trainer import Trainer

logger = logging.getLogger(__name__)


class Event(str, enum.Enum):
    """Loop events; each value is the name of the `Hook` method it calls."""

    BEFORE_TRAIN = "before_train"
    BEFORE_EPOCH = "before_epoch"
    BEFORE_STEP = "before_step"
    AFTER_STEP = "after_step"
    AFTER_EPOCH = "after_epoch"
    AFTER_TRAIN = "after_train"
    BEFORE_EVALUATE = "before_evaluate"
    AFTER_EVALUATE = "after_evaluate"
    AFTER_SAVE = "after_save"
    AFTER_RESTORE = "after_restore"
    END = "end"


class Hook:
    """Base class of hooks: override the events you need; all default to no-ops.

    ``priority`` orders hooks (lower runs first; ties keep insertion order).
    """

    priority: int = 0

    @property
    def name(self) -> str:
        return type(self).__name__

    def before_train(self, trainer: Trainer) -> None:
        pass

    def before_epoch(self, trainer: Trainer) -> None:
        pass

    def before_step(self, trainer: Trainer) -> None:
        pass

    def after_step(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        pass

    def after_epoch(self, trainer: Trainer) -> None:
        pass

    def after_train(self, trainer: Trainer) -> None:
        pass

    def before_evaluate(self, trainer: Trainer) -> None:
        pass

    def after_evaluate(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        pass

    def after_save(self, trainer: Trainer, path: str) -> None:
        pass

    def after_restore(self, trainer: Trainer, step: int) -> None:
        pass

    def end(self, trainer: Trainer) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        """State to checkpoint (JSON-able values or tensors); empty by default."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class HookError(RuntimeError):
    """A hook raised; the message names the hook and the event."""


def _named_error(hook: Hook, event: Event, error: Exception) -> HookError:
    """``error`` as a HookError naming the hook and event (HookErrors pass through)."""
    if isinstance(error, HookError):
        return error
    named = HookError(f"hook {hook.name!r} raised in {event.value}: {error!r}")
    named.__cause__ = error
    return named


_EVENTS = tuple(Event)
_METHOD = {event: event.value for event in _EVENTS}
"""Each event's `Hook` method name (a dict read: ``fire`` runs twice per update)."""


def _overrides(hook: Hook, event: Event) -> bool:
    """Whether ``hook`` does something on ``event`` (not `Hook`'s no-op)."""
    method = getattr(hook, event.value, None)
    return getattr(method, "__func__", method) is not getattr(Hook, event.value)


class HookRegistry:
    """Holds hooks in priority order and dispatches events to them.

    Each event is dispatched only to the hooks that override it (a table rebuilt when
    hooks are added or removed): an update pays for the hooks that act on it, not for
    every registered hook's no-ops.
    """

    def __init__(self, hooks: Optional[Iterable[Hook]] = None) -> None:
        self._hooks: list[Hook] = []
        self._ended = False
        self._rebuild()  # every event's entry, empty
        if hooks:
            self.add_all(hooks)

    def _rebuild(self) -> None:
        self._dispatch: dict[Event, tuple[Hook, ...]] = {
            event: tuple(h for h in self._hooks if _overrides(h, event)) for event in _EVENTS
        }
        self.listeners: dict[Event, tuple[Hook, ...]] = self._dispatch
        """The hooks each event reaches (rebuilt when a hook is added or removed): the
        trainer reads it to skip `fire` for an event no hook handles."""

    def add(self, hook: Hook) -> None:
        if not isinstance(hook, Hook):
            raise TypeError(
                f"hooks must subclass recframe.Hook, got {type(hook).__name__}; "
                "derive your class from recframe.hooks.Hook"
            )
        self._hooks.append(hook)
        # stable sort: equal priorities keep the order they were added in
        self._hooks.sort(key=lambda h: h.priority)
        self._rebuild()

    def add_all(self, hooks: Iterable[Hook]) -> None:
        for hook in hooks:
            self.add(hook)

    def remove(self, hook: Hook) -> None:
        self._hooks.remove(hook)
        self._rebuild()

    def __iter__(self) -> Iterator[Hook]:
        return iter(list(self._hooks))

    def __len__(self) -> int:
        return len(self._hooks)

    def find(self, kind: type) -> list[Hook]:
        return [h for h in self._hooks if isinstance(h, kind)]

    def fire(self, event: Event | str, trainer: Trainer, *args: Any) -> None:
        """Call ``event`` on every hook in order; a failure names the hook.

        ``end`` is the clean-up event: every hook gets it even when an earlier one
        raised, and the first failure is raised afterwards.
        """
        if event.__class__ is not Event:  # (no call: fire runs per update)
            event = Event(event)
        if event is Event.END:
            if self._ended:
                return
            self._ended = True
        hooks = self._dispatch[event]  # every event has an entry
        if not hooks:
            return
        first_error: Optional[HookError] = None
        name = _METHOD[event]
        for hook in hooks:
            try:
                getattr(hook, name)(trainer, *args)
            except Exception as e:  # noqa: BLE001 - re-raised with the hook's name
                error = _named_error(hook, event, e)
                if event is not Event.END:
                    if error is e:
                        raise
                    raise error from e
                if first_error is None:
                    first_error = error
                else:
                    logger.error("hook %r also raised in end: %r", hook.name, e)
        if first_error is not None:
            raise first_error

    def rearm_end(self) -> None:
        """Allow ``end`` to fire again (a new outermost call has started)."""
        self._ended = False

    # --- checkpointing ------------------------------------------------------------
    def _keys(self) -> list[tuple[str, Hook]]:
        seen: dict[str, int] = {}
        keys = []
        for hook in self._hooks:
            n = seen.get(hook.name, 0)
            seen[hook.name] = n + 1
            keys.append((hook.name if n == 0 else f"{hook.name}_{n}", hook))
        return keys

    def state_dict(self) -> dict[str, Any]:
        return {key: hook.state_dict() for key, hook in self._keys()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, hook in self._keys():
            if key in state and state[key]:
                hook.load_state_dict(state[key])
