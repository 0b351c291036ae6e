"""deep_ep: expert-parallel dispatch/combine for Mixture-of-Experts, DeepEP V1 compatible.

Importing needs neither a GPU nor the compiled extension (deep_ep._C): without them every operation runs on
the pure-PyTorch reference backend.
"""

import torch  # first: deep_ep._C links against torch's libraries

from . import utils as utils  # V1's deep_ep.utils: EventHandle, EventOverlap, check_nvlink_connections
from .buffer import Buffer
from .config import Config
from .event import EventOverlap

topk_idx_t = torch.int64


def has_cuda_extension() -> bool:
    """True when the compiled extension deep_ep._C imports."""
    from .buffer import _cuda_extension  # noqa: PLC0415

    return _cuda_extension() is not None


__all__ = ["Buffer", "Config", "EventOverlap", "topk_idx_t", "has_cuda_extension"]
