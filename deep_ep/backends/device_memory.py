"""Tensors over device memory that torch did not allocate (the communication buffers the C++ runtime and
NVSHMEM own): the CUDA backend's get_local_buffer_tensor."""

from __future__ import annotations

import torch


def local_buffer_view(
    base: int, num_bytes: int, device: torch.device, dtype, size, offset: int
) -> torch.Tensor:
    """A tensor of `dtype` viewing this rank's communication buffer at `base` from byte `offset` on (not
    owned: the runtime keeps the memory alive), shaped `size` or 1-D over what is left."""
    available = max(0, num_bytes - offset)

    class _View:
        __cuda_array_interface__ = {
            "shape": (available,),
            "typestr": "|u1",
            "data": (base + offset, False),
            "version": 3,
        }

    raw = torch.as_tensor(_View(), device=device)
    tensor = raw[: available // dtype.itemsize * dtype.itemsize].view(dtype)
    return tensor if size is None else tensor[: torch.Size(size).numel()].view(size)
