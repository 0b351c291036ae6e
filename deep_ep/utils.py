"""DeepEP V1's `deep_ep.utils`: `EventHandle`, `EventOverlap` and `check_nvlink_connections`.

Frameworks write `from deep_ep.utils import EventHandle, EventOverlap` and pass
`previous_event=EventOverlap(EventHandle())` to order an operation after the work queued so far on the current
stream. `EventHandle()` records a CUDA event on the current stream and has `current_stream_wait()`. Where the
compiled extension loads and CUDA is available it is the extension's own class (`deep_ep._C.EventHandle`, the
type operations return with `async_finish`, which the CUDA backend waits for without a round trip through
Python); otherwise a small Python class with the same interface stands in.

Which one is decided on first use, not at import: asking whether CUDA is available initialises the CUDA
driver, and a process that did so before forking leaves its children unable to use CUDA.
"""

from __future__ import annotations

import socket
from typing import Any, Optional

import torch
import torch.distributed as dist

from .event import EventOverlap, record_event

__all__ = ["EventHandle", "EventOverlap", "check_nvlink_connections"]  # noqa: F822 - EventHandle: __getattr__


class PythonEventHandle:
    """V1's EventHandle interface without the extension: records a `torch.cuda.Event` on the current stream
    when CUDA is available, and is a no-op otherwise (CPU work is already ordered)."""

    def __init__(self) -> None:
        self.event: Optional[torch.cuda.Event] = record_event()

    def current_stream_wait(self) -> None:
        """The current stream waits for the event (no host synchronisation); nothing to do without CUDA."""
        if self.event is not None:
            self.event.wait()

    def __repr__(self) -> str:
        return f"EventHandle(event={self.event!r})"


_event_handle_class: Optional[type] = None


def event_handle_class() -> type:
    """`deep_ep._C.EventHandle` when the extension loads and CUDA is available, else PythonEventHandle."""
    global _event_handle_class
    if _event_handle_class is None:
        try:
            from ._C import EventHandle as extension_class  # noqa: PLC0415 - optional compiled extension
        except (ImportError, OSError):
            extension_class = None
        use_extension = extension_class is not None and torch.cuda.is_available()
        _event_handle_class = extension_class if use_extension else PythonEventHandle
    return _event_handle_class


def __getattr__(name: str) -> Any:
    # PEP 562: `deep_ep.utils.EventHandle` and `from deep_ep.utils import EventHandle` resolve here.
    if name == "EventHandle":
        return event_handle_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | {"EventHandle"})


def _pci_bus_id(device: int) -> str:
    """The GPU's PCI address in NVML's `domain:bus:device.function` form: it names the physical GPU whatever
    CUDA_VISIBLE_DEVICES reorders."""
    props = torch.cuda.get_device_properties(device)
    return f"{props.pci_domain_id:08X}:{props.pci_bus_id:02X}:{props.pci_device_id:02X}.0"


def check_nvlink_connections(group: Optional[dist.ProcessGroup]) -> None:
    """DeepEP V1's check that the GPUs of `group` can talk over NVLink (collective on PCIe GPUs).

    Only PCIe boards are checked (their NVLink bridges connect pairs of GPUs at most; SXM boards sit on an
    NVLink switch): the group may span at most two distinct GPUs, and where pynvml is importable, the GPUs
    on this host must report NVLink P2P to each other. Ranks sharing one GPU count as one GPU (DESIGN
    section 4). Without CUDA, without a group (an mpi4py communicator) or on other GPUs it does nothing.
    Raises AssertionError, as V1 does.
    """
    if group is None or not torch.cuda.is_available():
        return
    if "PCIE" not in torch.cuda.get_device_name().upper():
        return
    me = (socket.gethostname(), _pci_bus_id(torch.cuda.current_device()))
    everyone: list = [None] * group.size()
    dist.all_gather_object(everyone, me, group=group)
    gpus = sorted(set(everyone))
    if len(gpus) > 2:
        raise AssertionError(
            f"PCIe GPUs have pairwise NVLink connections only: the group spans {len(gpus)} GPUs "
            f"({', '.join(f'{host}/{bus}' for host, bus in gpus)})"
        )
    try:
        import pynvml  # noqa: PLC0415 - optional, as in V1
    except ImportError:
        return
    local = [bus for host, bus in gpus if host == me[0]]
    if len(local) < 2:
        return
    pynvml.nvmlInit()
    try:
        first, second = (pynvml.nvmlDeviceGetHandleByPciBusId(bus) for bus in local)
        status = pynvml.nvmlDeviceGetP2PStatus(first, second, pynvml.NVML_P2P_CAPS_INDEX_NVLINK)
    finally:
        pynvml.nvmlShutdown()
    if status != pynvml.NVML_P2P_STATUS_OK:
        raise AssertionError(
            f"GPUs {local[0]} and {local[1]} are not connected via NVLink (NVML P2P status {status})"
        )
