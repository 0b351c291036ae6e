"""DeepEP V1's compiled module, under the name V1 gives it, for integrations that `import deep_ep_cpp`.

DeepEP V1 builds its C++ extension as the top-level module `deep_ep_cpp`, and some frameworks read it
directly (`deep_ep_cpp.Config`, `deep_ep_cpp.EventHandle`, `deep_ep_cpp.topk_idx_t`,
`deep_ep_cpp.get_low_latency_rdma_size_hint`). Here the extension is `deep_ep._C`; this module gives V1's
names, each the object `deep_ep` itself uses, and every other attribute of `deep_ep._C` when the extension
loads. It imports without a GPU and without the extension.
"""

from __future__ import annotations

from typing import Any

import deep_ep
from deep_ep import utils as _utils
from deep_ep.config import Config, low_latency_rdma_size_hint

topk_idx_t = deep_ep.topk_idx_t


def get_low_latency_rdma_size_hint(
    num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int, num_experts: int
) -> int:
    """Bytes of RDMA (symmetric) buffer per rank for low-latency mode: `Buffer.get_low_latency_rdma_size_hint`."""
    return low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts)


def is_sm90_compiled() -> bool:
    return deep_ep.Buffer.is_sm90_compiled()


def _extension():
    try:
        from deep_ep import _C  # noqa: PLC0415 - optional compiled extension
    except (ImportError, OSError):
        return None
    return _C


def __getattr__(name: str) -> Any:
    # PEP 562. EventHandle is deep_ep.utils.EventHandle: the extension's class, or its Python stand-in.
    if name == "EventHandle":
        return _utils.event_handle_class()
    extension = _extension()
    if extension is not None and not name.startswith("__") and hasattr(extension, name):
        return getattr(extension, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    extension = _extension()
    own = [n for n in dir(extension) if not n.startswith("__")] if extension is not None else []
    return sorted(set(globals()) | {"EventHandle"} | set(own))


__all__ = ["Config", "EventHandle", "topk_idx_t", "get_low_latency_rdma_size_hint", "is_sm90_compiled"]  # noqa: F822
