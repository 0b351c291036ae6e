"""Which instruction the kernels use to read data that peers write while they run.

- ``"aggressive"``: ``ld.global.nc.L1::no_allocate.L2::256B``, the non-coherent read-only path. Fast, and
  what DeepEP V1 uses, but the PTX memory model does not promise it sees writes made during the kernel;
  ``python -m deep_ep.check`` measures whether it does on this machine.
- ``"conservative"``: ``ld.volatile.global``, coherent by definition.

Both are compiled into the extension (unless it was built with ``DISABLE_AGGRESSIVE_PTX_INSTRS=1`` or for a
non-Hopper arch); ``resolve_load_kind`` is the one place that decides which one a Buffer uses.
"""

from __future__ import annotations

import os
from typing import Optional

AGGRESSIVE = "aggressive"
CONSERVATIVE = "conservative"
ENV_VAR = "DEEP_EP_CONSERVATIVE_LOADS"


def _env_wants_conservative() -> bool:
    return os.environ.get(ENV_VAR, "0").strip().lower() in ("1", "true", "yes", "on")


def _aggressive_loads_compiled() -> bool:
    try:
        from deep_ep import _C
    except ImportError:
        return False
    return bool(_C.aggressive_loads_compiled())


def _device_is_hopper(device: Optional[int]) -> bool:
    import torch

    if not torch.cuda.is_available():
        return False
    index = torch.cuda.current_device() if device is None else device
    return torch.cuda.get_device_capability(index)[0] == 9


def explain_load_kind(
    conservative_loads: Optional[bool] = None, device: Optional[int] = None
) -> tuple[str, str]:
    """Returns (load kind, why), the why being one line for reports such as ``deep_ep.check``."""
    if not _aggressive_loads_compiled():
        return CONSERVATIVE, "the extension was built without the aggressive loads (or is not built)"
    if not _device_is_hopper(device):
        return CONSERVATIVE, "the aggressive loads are used on Hopper (sm_90) only"
    if conservative_loads is True:
        return CONSERVATIVE, "conservative_loads=True"
    if conservative_loads is False:
        return AGGRESSIVE, "conservative_loads=False"
    if _env_wants_conservative():
        return CONSERVATIVE, f"{ENV_VAR}={os.environ[ENV_VAR]}"
    return AGGRESSIVE, "default (compiled in, Hopper GPU, no override)"


def resolve_load_kind(conservative_loads: Optional[bool] = None, device: Optional[int] = None) -> str:
    """``'aggressive'`` or ``'conservative'`` for a Buffer on ``device`` (default: the current one).

    ``conservative_loads=True`` forces the conservative loads and ``False`` asks for the aggressive ones;
    ``None`` (the default) follows the environment variable ``DEEP_EP_CONSERVATIVE_LOADS``. Whatever is
    asked, a build without the aggressive loads, or a GPU other than Hopper, gets the conservative ones.
    """
    return explain_load_kind(conservative_loads, device)[0]
