"""What a run prints: recframe's default log handler and narrow filters for the
third-party notices that recframe cannot remove at their cause.

recframe removes the causes it triggers itself (torchrec's topology, storage
reservation and local world size in `recframe.optim.fused`); what is left is filtered
here, each filter matching one message of one module, so every other warning of those
libraries still shows:

- fbgemm_gpu logs ``Successfully loaded: '<lib>.so'`` at INFO on the root logger for
  each of its libraries, on import; that module-level ``logging.info`` also runs
  ``logging.basicConfig()`` when the root logger has no handler yet, which would make
  the user's own later ``basicConfig(level=...)`` a no-op. recframe imports fbgemm_gpu
  with a placeholder root handler (`_FbgemmImportGuard`), removed right after;
- torch.fx warns that ``is_fx_tracing`` is ambiguous whenever a torchrec
  ``KeyedJaggedTensor`` is built (its metaclass asks);
- torchrec logs its process sub-groups (``[Connection] intra_group: ...``) at WARNING;
- torchrec's collectives call ``all_gather_into_tensor``/``reduce_scatter_tensor``,
  which torch deprecates (a FutureWarning per process).

Shown only under ``python -W default`` (or pytest), the DeprecationWarnings that
importing torchrec and torchmetrics and building fused tables raise about their own
internals: fbgemm's optional SSD kernels (``Failed to import ...``) and its deprecated
``split_table_batched_embeddings_ops`` module, ``torch.jit.script``/``interface`` while
``torch.distributed.optim`` is imported (only during that import, so the user's own
calls still warn), torchrec's ``apply_optimizer_in_backward``, torchmetrics'
``LooseVersion``, and torch.ao's quantization notice when torchrec quantizes the tables
of an int8/int4 export.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import sys
import warnings
from typing import Any, Optional

_DEFAULT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _MessageFilter(logging.Filter):
    """Drops the records of one logger whose message starts with ``prefix`` (and,
    when given, that come from a file whose path contains ``path_part``)."""

    def __init__(self, prefix: str, path_part: str = "") -> None:
        super().__init__()
        self.prefix = prefix
        self.path_part = path_part

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.msg if isinstance(record.msg, str) else ""
        if not message.startswith(self.prefix):
            return True
        return bool(self.path_part) and self.path_part not in record.pathname.replace("\\", "/")


_LOG_FILTERS = (
    ("root", _MessageFilter("Successfully loaded", "fbgemm_gpu/")),
    ("torch.fx._symbolic_trace", _MessageFilter("is_fx_tracing will return true")),
    ("torchrec.distributed.comm", _MessageFilter("[Connection] ")),
)
_installed = False


_DEPRECATIONS = (  # (message regex, module regex) of third-party DeprecationWarnings
    (r"\x1b\[93m\s*Failed to import: fbgemm_gpu\.split_embedding_codegen_lookup_invokers\.",
     r"fbgemm_gpu\.split_embedding_codegen_lookup_invokers\Z"),
    (r"\x1b\[93m\s*The Python module fbgemm_gpu\.split_table_batched_embeddings_ops is now "
     r"DEPRECATED", r"fbgemm_gpu\.split_table_batched_embeddings_ops\Z"),
    (r"This API is deprecated\. Please use Pytorch Distributed's _apply_optimizer_in_backward",
     r"torchrec\.optim\.apply_optimizer_in_backward\Z"),
    (r"distutils Version classes are deprecated", r"torchmetrics\.utilities\.imports\Z"),
    # `recframe export --quantize int8/int4`: torchrec's quantize_embeddings calls
    # torch.ao's quantize_dynamic, which warns there and again from its own convert()
    (r"torch\.ao\.quantization is deprecated", r"torchrec\.inference\.modules\Z"),
    (r"torch\.ao\.quantization is deprecated", r"torch\.ao\.quantization\.quantize\Z"),
)
_QUIET_IMPORTS = ("fbgemm_gpu", "torch.distributed.optim")


class _FbgemmImportGuard(importlib.abc.MetaPathFinder):
    """Imports ``fbgemm_gpu`` with a `logging.NullHandler` on an otherwise handler-less
    root logger, so its import-time ``logging.info`` does not configure logging; and
    ``torch.distributed.optim`` (torchrec's fused optimizers import it) without the
    ``torch.jit`` deprecation notices its module-level ``torch.jit.script`` calls raise."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Optional[Any]:
        if name not in _QUIET_IMPORTS:
            return None
        sys.meta_path.remove(self)  # find the real spec, once
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader = spec.loader
        original = loader.exec_module

        def exec_module(module: Any) -> None:
            root = logging.getLogger()
            placeholder = logging.NullHandler() if not root.handlers else None
            if placeholder is not None:
                root.addHandler(placeholder)
            try:
                with warnings.catch_warnings():
                    warnings.filterwarnings(
                        "ignore", message=r"`torch\.jit\.(script|interface)` is deprecated",
                        category=DeprecationWarning, module=r"torch\.jit\._script\Z",
                    )
                    original(module)
            finally:
                if placeholder is not None:
                    root.removeHandler(placeholder)

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def install_filters() -> None:
    """Install the narrow filters of the module docstring (idempotent)."""
    global _installed
    if _installed:
        return
    _installed = True
    if not all(name in sys.modules for name in _QUIET_IMPORTS):
        sys.meta_path.insert(0, _FbgemmImportGuard())
    for message, module in _DEPRECATIONS:
        warnings.filterwarnings("ignore", message=message, category=DeprecationWarning,
                                module=module)
    for name, flt in _LOG_FILTERS:
        logger = logging.getLogger() if name == "root" else logging.getLogger(name)
        logger.addFilter(flt)
    warnings.filterwarnings(
        "ignore",
        message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` "
        "is deprecated",
        category=FutureWarning,
        module=r"torch\.distributed\.c10d_logger",
    )


class _DefaultHandler(logging.StreamHandler):
    """recframe's own handler, added when nobody configured logging."""

    def emit(self, record: logging.LogRecord) -> None:
        if logging.getLogger().handlers:  # the user configured logging later: theirs wins
            return
        super().emit(record)


def default_logging() -> None:
    """Show recframe's progress (INFO) on stderr unless the user configured logging.

    As Hugging Face's Trainer does for its own logger: a handler is added to the
    ``recframe`` logger only when neither it nor the root logger has one, and its
    level is set to INFO only when the user left it unset. Once the user adds a root
    handler, recframe's handler stands aside (no line is printed twice)."""
    logger = logging.getLogger("recframe")
    if logger.handlers or logging.getLogger().handlers:
        return
    handler = _DefaultHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_DEFAULT_FORMAT))
    logger.addHandler(handler)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)


__all__ = ["default_logging", "install_filters"]
