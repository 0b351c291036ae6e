"""EventOverlap (DeepEP V1 compatible) and the helpers that record the events it wraps."""

from __future__ import annotations

from typing import Any, Optional

import torch


class EventOverlap:
    """A CUDA event returned by an operation, for overlapping communication with computation.

    `event` is a `torch.cuda.Event`, any object with a `current_stream_wait()` method (V1's kind of handle:
    `deep_ep.utils.EventHandle()`, which records on the current stream, or another library's), or None.
    None means there is nothing to wait for: the operation already finished on the current stream
    (synchronous call, or a CPU tensor), so waiting is a no-op rather than an error.

    `extra_tensors` is kept referenced by this object: it keeps tensors that a communication stream still
    reads or writes alive until the user waited (V1's substitute for `record_stream`, which CUDA graphs do
    not support).
    """

    def __init__(self, event: Optional[Any] = None, extra_tensors: Optional[tuple] = None) -> None:
        self.event = event
        self.extra_tensors = tuple(extra_tensors) if extra_tensors is not None else None

    def current_stream_wait(self) -> None:
        """Make the current CUDA stream wait for the event (no-op without one)."""
        if self.event is None:
            return
        if hasattr(self.event, "current_stream_wait"):
            self.event.current_stream_wait()
        else:
            self.event.wait()  # torch.cuda.Event.wait() with no stream = the current stream

    def __enter__(self) -> EventOverlap:
        return self

    def __exit__(self, exc_type: Any, exc_val: Any, exc_tb: Any) -> None:
        # Work issued inside the `with` block overlaps with the communication; leaving it re-joins them.
        self.current_stream_wait()

    def __repr__(self) -> str:
        return f"EventOverlap(event={self.event!r}, extra_tensors={0 if self.extra_tensors is None else len(self.extra_tensors)})"


def record_event(
    device: Optional[torch.device] = None, stream: Optional[Any] = None
) -> Optional[torch.cuda.Event]:
    """Record a `torch.cuda.Event` on `stream` (default: the current stream of `device`).

    Returns None when `device` is not a CUDA device, or when `device` is None and CUDA is unavailable, so
    callers can use it unconditionally on CPU.
    """
    if device is None:
        if not torch.cuda.is_available():
            return None
        device = torch.device("cuda", torch.cuda.current_device())
    device = torch.device(device)
    if device.type != "cuda":
        return None
    if stream is None:
        stream = torch.cuda.current_stream(device)
    event = torch.cuda.Event()
    event.record(stream)
    return event


def capture(device: Optional[torch.device] = None) -> EventOverlap:
    """An EventOverlap for everything issued so far on the current stream (empty on CPU)."""
    return EventOverlap(record_event(device))
