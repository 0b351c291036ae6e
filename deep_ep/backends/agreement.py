"""Errors agreed by every rank of a call, and the identity a handle carries from the dispatch that made it.

A collective call must fail on every rank or on none: a rank that raises alone leaves its peers waiting in a
collective that then pairs with that rank's NEXT call and mixes the data of two different calls. So a backend
checks its arguments locally, keeps the error instead of raising it, and exchanges one small record per rank
before any payload moves (deep_ep.backends.reference_backend folds it into the exchange it makes anyway):

- the operation (`dispatch`, `combine`, ...): ranks making different calls raise first (`check_operations`);
- the local error, as (exception type, message) or None: if any rank failed, every rank raises the same type
  with the lowest failing rank's message, which names the rank(s) (`raise_if_failed`);
- a signature, the fields every rank must agree on for this call (hidden size, dtype, top-k, expert count,
  ...; never per-rank token counts): a field that differs raises a ValueError naming it and each rank's value
  (`check_signatures`).

Every rank sees the same records, so every rank takes the same branch: all raise the same error, or all
move the payload, and the ranks stay in step for the next call.

Handle identity: a dispatch stamps its handle with (the Buffer's uid, agreed at construction; the dispatch's
sequence number on that Buffer), kept in a map from one of the handle's tensors, weakly, so the handle keeps
V1's tuple layout and a handle nobody holds costs nothing. With it go the tensors' version counters, so an
element modified in place after the dispatch returned it is refused (tensors made under inference mode track
no versions: not for them). A handle whose key tensor is not the one the dispatch returned (a clone, a copy, a
handle rebuilt from saved tensors) has no identity: it is accepted, checked only by what the backend can check
on its contents, and matches any identity in the signature.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any, NamedTuple, Optional

import torch

# The exception types an agreed error keeps; any other is raised as its nearest base among them (first match
# wins: NotImplementedError is a RuntimeError), so that every rank can rebuild it from (type, message).
_PORTABLE_TYPES = (
    NotImplementedError,
    TypeError,
    ValueError,
    IndexError,
    KeyError,
    AttributeError,
    OverflowError,
    RuntimeError,
)

# A rank's outcome of its local checks: None, or the portable exception type and the message.
Outcome = Optional[tuple[type, str]]


def outcome_of(error: Optional[BaseException]) -> Outcome:
    if error is None:
        return None
    for portable in _PORTABLE_TYPES:
        if isinstance(error, portable):
            return portable, str(error)
    return RuntimeError, f"{type(error).__name__}: {error}"


def dispatch_op(cached: bool) -> str:
    """The operation a dispatch agrees on (both backends; csrc/ops/intranode_arguments.cpp names it alike):
    a cached and a fresh dispatch are different calls."""
    return "dispatch (cached: handle given)" if cached else "dispatch"


def _ranks_str(ranks: Sequence[int], num_ranks: int) -> str:
    label = "rank" if len(ranks) == 1 else "ranks"
    return f"{label} {', '.join(str(r) for r in ranks)} of {num_ranks}"


def check_operations(operations: Sequence[Any]) -> None:
    """ValueError on every rank when the ranks are not making the same call. Every agreed call's record starts
    with its operation's name, so a record of another kind of exchange (one rank in another collective) shows
    up here too."""
    if any(op != operations[0] for op in operations):
        calls = ", ".join(f"rank {r}: {op}" for r, op in enumerate(operations))
        raise ValueError(
            f"operation: ranks disagree on the call ({calls}); every rank of the group must make the same "
            "collective calls in the same order"
        )


def raise_if_failed(op: str, outcomes: Sequence[Outcome], cause: Optional[BaseException] = None) -> None:
    """If any rank's local checks failed, raise on every rank: the lowest failing rank's exception type and
    message, naming the failing ranks (and the other failing ranks' messages where they differ). `cause` is
    this rank's own exception, chained for its traceback."""
    failed = [r for r, outcome in enumerate(outcomes) if outcome is not None]
    if not failed:
        return
    error_type, message = outcomes[failed[0]]
    others = "".join(f"; rank {r}: {outcomes[r][1]}" for r in failed[1:] if outcomes[r][1] != message)
    where = _ranks_str(failed, len(outcomes))
    raise error_type(f"{message} (on {where}{others}; {op} rejected on every rank)") from cause


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_signatures(op: str, signatures: Sequence[dict], unknown_ok: Sequence[str] = ()) -> None:
    """ValueError on every rank naming the first field of the call's signature the ranks disagree on, with
    each rank's value. In the fields of `unknown_ok`, None means unknown and matches any value."""
    for field in signatures[0]:
        values = [signature.get(field) for signature in signatures]
        known = [v for v in values if v is not None] if field in unknown_ok else values
        if any(v != known[0] for v in known):
            per_rank = ", ".join(f"rank {r}: {_shown(v)}" for r, v in enumerate(values))
            raise ValueError(
                f"{field}: ranks disagree on this {op} call ({per_rank}); every rank must pass the same"
            )


# ---------------------------------------------------------------------------------------------------------
# Handle identity
# ---------------------------------------------------------------------------------------------------------


class _Stamp(NamedTuple):
    key: weakref.ref  # the handle's key tensor (the stamps map is indexed by its id)
    buffer_uid: str
    seq: int
    # Per handle element: a weak reference to the tensor and its version counter when stamped (None, None
    # for a non-tensor element or a tensor that tracks no versions).
    elements: tuple


_stamps: dict[int, _Stamp] = {}


def _version(t: torch.Tensor) -> Optional[int]:
    try:
        return t._version
    except RuntimeError:  # an inference-mode tensor tracks no versions
        return None


def _forget(key_ref: weakref.ref, key_id: int) -> None:
    stamp = _stamps.get(key_id)
    if stamp is not None and stamp.key is key_ref:
        del _stamps[key_id]


def stamp_handle(handle: Sequence[Any], key_index: int, buffer_uid: str, seq: int) -> None:
    """Record that `handle` is dispatch number `seq` of the Buffer `buffer_uid` (see the module docstring)."""
    key = handle[key_index]
    key_id = id(key)
    key_ref = weakref.ref(key, lambda ref: _forget(ref, key_id))
    elements = tuple(
        (weakref.ref(t), _version(t)) if isinstance(t, torch.Tensor) else (None, None) for t in handle
    )
    _stamps[key_id] = _Stamp(key_ref, buffer_uid, seq, elements)


def handle_identity(handle: Sequence[Any], key_index: int, buffer_uid: str) -> Optional[int]:
    """The sequence number of the dispatch that made `handle`, or None when it carries no identity.

    ValueError when the handle was made by another Buffer, or when one of the tensors the dispatch returned was
    modified in place since (a tensor replaced by another object is not this check's business)."""
    key = handle[key_index]
    stamp = _stamps.get(id(key))
    if stamp is None or stamp.key() is not key:
        return None
    if stamp.buffer_uid != buffer_uid:
        raise ValueError(
            "handle: it was made by another Buffer's dispatch; pass a handle to the Buffer that returned it"
        )
    for index, (t, (ref, version)) in enumerate(zip(handle, stamp.elements)):
        if ref is None or version is None or ref() is not t:
            continue
        if _version(t) != version:
            name = handle._fields[index] if hasattr(handle, "_fields") else f"[{index}]"
            raise ValueError(
                f"handle.{name}: modified in place after the dispatch returned it (dispatch #{stamp.seq} of "
                "this Buffer); a handle must be passed on as the dispatch returned it"
            )
    return stamp.seq
