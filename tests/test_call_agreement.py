"""The CUDA backend's agreed errors (csrc/runtime/call_agreement.hpp), over a bare host exchange in CPU
processes: no GPU, so CI runs it wherever deep_ep._C is built. Every rank publishes its call record (the
operation, its own check's error, the signature) and every rank takes the same decision: the tests check that
all ranks raise the same exception with the same message, worded exactly as deep_ep.backends.agreement words
it for the reference backend, and that the exchange stays in step for the next call.

Handle identity (csrc/runtime/handle_identity.hpp) is checked here on CPU tensors, with the reference's
messages. The normal ops' use of both (a bad argument or handle on one rank of a CUDA Buffer) is GPU-tested
in tests/test_agreed_errors.py.
"""

from __future__ import annotations

import gc
import os
import uuid

import pytest
import torch
import torch.distributed as dist

from deep_ep.backends import agreement

try:
    from deep_ep import _C

    HAS_EXTENSION = hasattr(_C, "testing") and hasattr(_C.testing, "handle_identity")
except ImportError:
    HAS_EXTENSION = False

pytestmark = pytest.mark.skipif(not HAS_EXTENSION, reason="deep_ep._C is not built")

TIMEOUT_NS = 20 * 10**9


def _exchange(rank, num_ranks, group, first_rank=0, timeout_ns=TIMEOUT_NS):
    """Every rank's HostExchange over one shared-memory segment (rank 0 creates it)."""
    names = [f"/deep_ep_test_{os.getpid()}_{uuid.uuid4().hex[:12]}"]
    dist.broadcast_object_list(names, src=0, group=group)
    if rank == 0:
        exchange = _C.testing.HostExchange(names[0], 0, num_ranks, True, timeout_ns, first_rank)
    dist.barrier(group=group)
    if rank != 0:
        exchange = _C.testing.HostExchange(names[0], rank, num_ranks, False, timeout_ns, first_rank)
    dist.barrier(group=group)
    if rank == 0:
        exchange.unlink()
    return exchange


def _outcome(exchange, call, group_size):
    op, error_type, message, signature, payload = call
    try:
        return ("ok", exchange.agree(op, error_type, message, signature, payload, group_size))
    except Exception as e:  # noqa: BLE001 - the test compares every rank's exception
        return (type(e).__name__, str(e))


SIGNATURE = [("x.dtype", "'torch.bfloat16'"), ("x.size(1)", "7168"), ("topk_idx.size(1)", "8")]


def _valid(rank):
    return ("dispatch", "", "", SIGNATURE, f"payload of {rank}".encode())


def _rank_calls(rank, num_ranks, group, scenarios):
    """Each scenario: per rank, the call record it publishes; every scenario is followed by a valid round."""
    exchange = _exchange(rank, num_ranks, group)
    results = []
    for calls in scenarios:
        results.append(_outcome(exchange, calls[rank], num_ranks))
        results.append(_outcome(exchange, _valid(rank), num_ranks))
    return results


class _Shown(str):
    """A signature value as the C++ side stores it (already Python's repr), printed as it is."""

    def __repr__(self) -> str:
        return str(self)


def _expected_error(calls):
    """(type name, message) that deep_ep.backends.agreement raises for the same records: the reference
    backend's checks, order and wording."""
    types = {"TypeError": TypeError, "ValueError": ValueError}
    op = calls[0][0]
    try:
        agreement.check_operations([c[0] for c in calls])
        agreement.raise_if_failed(
            op, [(types.get(c[1], RuntimeError), c[2]) if c[1] else None for c in calls]
        )
        signatures = [
            {f: None if f == "handle" and v == "None" else _Shown(v) for f, v in c[3]} for c in calls
        ]
        agreement.check_signatures(op, signatures, unknown_ok=("handle",))
    except Exception as e:  # noqa: BLE001 - compared with the C++ side's exception
        return type(e).__name__, str(e)
    return None


def _scenarios(num_ranks):
    scenarios = []
    for bad in range(num_ranks):  # one bad rank at a time: its own check failed
        calls = [_valid(r) for r in range(num_ranks)]
        calls[bad] = ("dispatch", "TypeError", "x: expected torch.bfloat16, got torch.float32", [], b"")
        scenarios.append(calls)
    # two failing ranks with different messages: the lowest's type and message, the other's appended
    calls = [_valid(r) for r in range(num_ranks)]
    calls[-1] = ("dispatch", "ValueError", "num_worst_tokens: must be >= 0, got -1", [], b"")
    calls[0] = ("dispatch", "ValueError", "expert_alignment: must be >= 1, got 0", [], b"")
    scenarios.append(calls)
    # a rank making another call
    calls = [_valid(r) for r in range(num_ranks)]
    calls[num_ranks // 2] = (
        "combine",
        "",
        "",
        [("x.size(1)", "7168"), ("topk_weights.size(1)", "None")],
        b"x",
    )
    scenarios.append(calls)
    # a rank whose hidden size differs
    calls = [_valid(r) for r in range(num_ranks)]
    calls[1] = ("dispatch", "", "", [SIGNATURE[0], ("x.size(1)", "4096"), SIGNATURE[2]], b"y")
    scenarios.append(calls)
    # handles of different dispatches; a handle without identity (None) does not hide the difference
    calls = [_cached(r, "'dispatch #3'") for r in range(num_ranks)]
    calls[-1] = _cached(num_ranks - 1, "'dispatch #4'")
    if num_ranks > 2:
        calls[0] = _cached(0, "None")
    scenarios.append(calls)
    return scenarios


def _cached(rank, identity):
    return ("combine", "", "", [("x.size(1)", "7168"), ("handle", identity)], f"payload of {rank}".encode())


def _rank_handles_without_identity(rank, num_ranks, group):
    """Handles of one dispatch, some of them copies without identity: accepted."""
    exchange = _exchange(rank, num_ranks, group)
    return _outcome(exchange, _cached(rank, "None" if rank % 2 else "'dispatch #3'"), num_ranks)


def test_handles_without_identity_match_any(rank_pool):
    results = rank_pool(4).run(_rank_handles_without_identity)
    assert results == [("ok", [f"payload of {r}".encode() for r in range(4)])] * 4


@pytest.mark.parametrize("num_ranks", [2, 4])
def test_every_rank_raises_the_reference_backends_error_and_stays_in_step(rank_pool, num_ranks):
    scenarios = _scenarios(num_ranks)
    results = rank_pool(num_ranks).run(_rank_calls, scenarios)
    valid_payloads = [f"payload of {r}".encode() for r in range(num_ranks)]
    for s, calls in enumerate(scenarios):
        expected = _expected_error(calls)
        assert expected is not None, f"scenario {s}: the Python module raised nothing"
        for rank in range(num_ranks):
            got, after = results[rank][2 * s], results[rank][2 * s + 1]
            assert got == expected, f"scenario {s}, rank {rank}: {got} != {expected}"
            assert after == ("ok", valid_payloads), f"scenario {s}, rank {rank}: next round {after}"


def _rank_node_of_a_larger_group(rank, num_ranks, group):
    """The exchange of the second node (ranks 4, 5) of an 8-rank group: errors name group ranks."""
    exchange = _exchange(rank, num_ranks, group, first_rank=4)
    bad = ("combine", "ValueError", "x: expected 10 rows, got 11", [], b"")
    return _outcome(exchange, bad if rank == 1 else ("combine", "", "", [], b""), 8)


def test_a_nodes_exchange_names_group_ranks(rank_pool):
    want = ("ValueError", "x: expected 10 rows, got 11 (on rank 5 of 8; combine rejected on every rank)")
    assert rank_pool(2).run(_rank_node_of_a_larger_group) == [want, want]


def _rank_missing_peer(rank, num_ranks, group):
    exchange = _exchange(rank, num_ranks, group, timeout_ns=500_000_000)
    if rank == 1:
        return None  # never arrives
    return _outcome(exchange, _valid(rank), num_ranks)


def test_a_missing_peer_times_out_naming_it(rank_pool):
    kind, message = rank_pool(2).run(_rank_missing_peer)[0]
    assert kind == "RuntimeError" and "timed out" in message and "waiting for rank 1" in message, message


# --- handle identity (csrc/runtime/handle_identity.hpp), on CPU tensors ------------------------------------

NAMES = ["rank_prefix_matrix", "channel_prefix_matrix", "recv_channel_prefix_matrix", "recv_src_idx",
         "is_token_in_rank", "send_head"]  # fmt: skip
KEY = 3  # recv_src_idx, as the reference keys it


def _handle():
    return [torch.zeros(2, 2, dtype=torch.int32) + i for i in range(len(NAMES))]


def _identity(handle, buffer_uid):
    return _C.testing.handle_identity(handle, NAMES, KEY, buffer_uid)


def test_a_stamped_handle_is_known_to_its_buffer_only():
    handle = _handle()
    _C.testing.stamp_handle(handle, NAMES, KEY, 7, 3)
    assert _identity(handle, 7) == 3
    assert _identity(list(handle), 7) == 3  # another list of the same tensors
    with pytest.raises(ValueError) as raised:
        _identity(handle, 8)
    assert (
        str(raised.value)
        == "handle: it was made by another Buffer's dispatch; pass a handle to the Buffer that returned it"
    )


def test_copies_carry_no_identity_and_replaced_elements_are_not_checked():
    handle = _handle()
    _C.testing.stamp_handle(handle, NAMES, KEY, 7, 4)
    assert _identity([t.clone() for t in handle], 7) is None
    replaced = list(handle)
    replaced[0] = handle[0].clone().add_(1)  # another tensor in that place: not this check's business
    assert _identity(replaced, 7) == 4


def test_an_element_modified_in_place_is_named():
    handle = _handle()
    _C.testing.stamp_handle(handle, NAMES, KEY, 7, 5)
    handle[0].add_(0)  # same values, but written after the dispatch returned it
    with pytest.raises(ValueError) as raised:
        _identity(handle, 7)
    assert str(raised.value) == (
        "handle.rank_prefix_matrix: modified in place after the dispatch returned it (dispatch #5 of this "
        "Buffer); a handle must be passed on as the dispatch returned it"
    )


def test_a_freed_handle_leaves_no_identity_behind():
    handle = _handle()
    _C.testing.stamp_handle(handle, NAMES, KEY, 7, 6)
    del handle
    gc.collect()
    for _ in range(200):  # new tensors, possibly at the freed ones' addresses, and sweeps of dead stamps
        fresh = _handle()
        assert _identity(fresh, 7) is None
        _C.testing.stamp_handle(_handle(), NAMES, KEY, 9, 1)


def test_inference_tensors_are_identified_without_versions():
    with torch.inference_mode():
        handle = _handle()
        _C.testing.stamp_handle(handle, NAMES, KEY, 7, 8)
        handle[0].add_(0)
    assert _identity(handle, 7) == 8
