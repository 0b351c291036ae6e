"""deep_ep in processes where nvshmem4py (NVSHMEM's Python bindings; `pip install 'deep_ep[nvshmem4py]'`)
initialised NVSHMEM first (deep_ep/backends/nvshmem.py says how deep_ep attaches to it).

GPU (2 ranks, which may share a GPU; fresh rank processes per test, since NVSHMEM is initialised once per
process):
- nvshmem4py initialises NVSHMEM on the Buffer's group (PE i = rank i): a low-latency Buffer attaches, and
  dispatch + combine through NVLink mappings and through NVSHMEM puts (which need this extension's own device
  state) match the reference, with test_low_latency's harness; one libnvshmem_host is loaded.
- nvshmem4py initialises NVSHMEM on another group (PEs swapped, or each rank a world of its own): creating the
  Buffer raises on every rank, naming each rank's PE.
CPU: the same decisions over a stand-in for the extension's NVSHMEM runtime (which path every rank takes, the
agreed error), so CI checks them without a GPU.
"""

from __future__ import annotations

import os
import types

import pytest
import torch
import torch.distributed as dist
from oracle import low_latency_compiled
from test_low_latency import _case, _round_trip, _tokens

import deep_ep
from deep_ep.tools.launch import RankPool


def _nvshmem4py_import_error() -> str | None:
    """Why nvshmem4py cannot be used here, or None."""
    try:
        import nvshmem.core  # noqa: F401, PLC0415 - optional
    except Exception as error:  # noqa: BLE001 - whatever stops the import means: skip, saying why
        return f"nvshmem4py is not usable here: {type(error).__name__}: {error}"
    return None


NVSHMEM4PY_IMPORT_ERROR = _nvshmem4py_import_error()
GPU_MARKS = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not low_latency_compiled(), reason="needs a CUDA GPU and deep_ep._C built with NVSHMEM"
    ),
    pytest.mark.skipif(NVSHMEM4PY_IMPORT_ERROR is not None, reason=str(NVSHMEM4PY_IMPORT_ERROR)),
]
NUM_RANKS = 2


# --- rank side (module level: runs in the rank processes) ---------------------------------------------------


def _nvshmem_host_libraries() -> list[str]:
    with open("/proc/self/maps") as maps:
        return sorted({line.split()[-1] for line in maps if "libnvshmem_host" in line})


def _init_with_nvshmem4py(rank, group, pe_of_rank: list[int], num_pes: int) -> None:
    """nvshmem4py's unique-id initialisation, the way its documentation shows it, with the id carried over
    `group`: this rank becomes PE pe_of_rank[rank] of num_pes. The process that becomes PE 0 creates the id; a
    world of one PE (num_pes == 1) makes its own."""
    import numpy as np  # noqa: PLC0415
    import nvshmem.core  # noqa: PLC0415 - optional, present where this runs
    from cuda.core import Device  # noqa: PLC0415 - nvshmem4py's dependency

    device = Device(torch.cuda.current_device())
    device.set_current()
    if num_pes == 1:
        uid = nvshmem.core.get_unique_id()
    else:
        root = pe_of_rank.index(0)
        payload = [nvshmem.core.get_unique_id()._data.view(np.int8).tobytes() if rank == root else None]
        dist.broadcast_object_list(payload, src=dist.get_global_rank(group, root), group=group)
        uid = nvshmem.core.get_unique_id(empty=True)
        uid._data.view(np.int8)[:] = np.frombuffer(payload[0], dtype=np.int8)
    nvshmem.core.init(device=device, uid=uid, rank=pe_of_rank[rank], nranks=num_pes, initializer_method="uid")


def rank_nvshmem4py_same_group(rank, num_ranks, group, case):
    _init_with_nvshmem4py(rank, group, list(range(num_ranks)), num_ranks)
    from deep_ep import _C  # noqa: PLC0415
    from deep_ep.backends import nvshmem  # noqa: PLC0415

    assert _C.nvshmem.init_status() != 0, (
        f"rank {rank}: deep_ep does not see the NVSHMEM nvshmem4py initialised"
    )
    assert _C.nvshmem.my_pe_and_n_pes() == (rank, num_ranks), f"rank {rank}: PE"
    assert _round_trip(rank, num_ranks, group, case), f"rank {rank}: round trip"
    assert nvshmem.attached(), f"rank {rank}: deep_ep initialised NVSHMEM again instead of attaching"
    libraries = _nvshmem_host_libraries()
    assert len(libraries) == 1, f"rank {rank}: NVSHMEM host libraries loaded: {libraries}"
    return libraries[0]


def rank_nvshmem4py_other_group(rank, num_ranks, group, pe_of_rank, num_pes):
    """The message the Buffer raised with, or None if it did not raise."""
    _init_with_nvshmem4py(rank, group, pe_of_rank, num_pes)
    hint = deep_ep.Buffer.get_low_latency_rdma_size_hint(32, 2048, num_ranks, 4 * num_ranks)
    try:
        buffer = deep_ep.Buffer(
            group, 0, hint, low_latency_mode=True, explicitly_destroy=True, backend="cuda"
        )
    except RuntimeError as error:
        return str(error)
    buffer.destroy()
    return None


# --- GPU tests ----------------------------------------------------------------------------------------------


def _with_marks(test):
    for mark in GPU_MARKS:
        test = mark(test)
    return test


@_with_marks
@pytest.mark.parametrize("allow_nvlink", [True, False], ids=["mapped", "put"])
def test_buffer_attaches_to_nvshmem4py_on_the_same_group(allow_nvlink):
    tokens = _tokens(NUM_RANKS, 64, "full") + _tokens(NUM_RANKS, 64, "partial")
    case = _case(m=64, experts=16 * NUM_RANKS, tokens=tokens, allow_nvlink=allow_nvlink, seed=29)
    with RankPool(NUM_RANKS, timeout_s=600) as pool:
        libraries = pool.run(rank_nvshmem4py_same_group, case)
    assert len(set(libraries)) == 1, libraries


OTHER_GROUPS = {  # name: (PE of each rank, number of PEs, what the error names)
    "swapped_pes": ([1, 0], 2, ["rank 0: PE 1 of 2", "rank 1: PE 0 of 2"]),
    "a_world_per_rank": ([0, 0], 1, ["rank 0: PE 0 of 1", "rank 1: PE 0 of 1"]),
}


@_with_marks
@pytest.mark.parametrize("case", list(OTHER_GROUPS))
def test_nvshmem4py_on_another_group_is_a_clear_error(case):
    pe_of_rank, num_pes, named = OTHER_GROUPS[case]
    with RankPool(NUM_RANKS, timeout_s=600) as pool:
        messages = pool.run(rank_nvshmem4py_other_group, pe_of_rank, num_pes)
    for rank, message in enumerate(messages):
        assert message is not None, f"rank {rank}: the Buffer was created on a group NVSHMEM does not match"
        assert "another library" in message and f"{NUM_RANKS} ranks" in message, message
        for part in named:
            assert part in message, f"rank {rank}: {part!r} missing from: {message}"


# --- CPU: the decisions, over a stand-in for deep_ep._C.nvshmem ---------------------------------------------


class _StandInNvshmem:
    """What init_once asks of deep_ep._C.nvshmem, with NVSHMEM's state of one process given up front."""

    def __init__(self, status: int, pe) -> None:
        self.status, self.pe, self.calls, self.initialized = status, pe, [], False

    def is_initialized(self) -> bool:
        return self.initialized

    def init_status(self) -> int:
        return self.status

    def my_pe_and_n_pes(self):
        assert self.status != 0, "asked for the PE of an NVSHMEM that is not initialised"
        return self.pe

    def get_unique_id(self) -> bytes:
        return b"unique id"

    def init(self, unique_id, rank, num_ranks) -> None:
        assert unique_id == b"unique id"
        self.calls.append(("init", rank, num_ranks))
        self.initialized, self.status, self.pe = True, 2, (rank, num_ranks)

    def attach(self, rank, num_ranks) -> None:
        self.calls.append(("attach", rank, num_ranks))
        self.initialized = True


def rank_init_once_decision(rank, num_ranks, group, states, then=None):
    """init_once over a stand-in whose NVSHMEM state on rank r is states[r] = (status, pe): returns (calls,
    attached, error). `then` = (rank, num_ranks) calls init_once once more afterwards, as another Buffer of a
    different group would."""
    from deep_ep.backends import nvshmem  # noqa: PLC0415 - imported in the rank processes

    def all_gather(obj):
        gathered = [None] * num_ranks
        dist.all_gather_object(gathered, obj, group=group)
        return gathered

    stand_in = _StandInNvshmem(*states[rank])
    saved = (nvshmem._C, nvshmem._members, nvshmem._attached)
    nvshmem._C = types.SimpleNamespace(nvshmem=stand_in)
    saved_env = {k: v for k, v in os.environ.items() if k.startswith("NVSHMEM_")}
    try:
        nvshmem.init_once(all_gather, rank, num_ranks, 1 << 20, False)
        attached = nvshmem.attached()
        if then is not None:
            nvshmem.init_once(all_gather, *then, 1 << 20, False)
    except RuntimeError as error:
        return stand_in.calls, None, str(error)
    finally:
        nvshmem._C, nvshmem._members, nvshmem._attached = saved
        for key in [k for k in os.environ if k.startswith("NVSHMEM_") and k not in saved_env]:
            del os.environ[key]  # what the init path set for NVSHMEM
    return stand_in.calls, attached, None


NOT_INITIALISED = (0, None)
DECISIONS = {  # name: (each rank's NVSHMEM state, expected calls per rank or the error's per-rank parts)
    "nobody_initialised": ([NOT_INITIALISED] * 2, [[("init", 0, 2)], [("init", 1, 2)]]),
    "nvshmem4py_same_group": ([(2, (0, 2)), (2, (1, 2))], [[("attach", 0, 2)], [("attach", 1, 2)]]),
    "bootstrapped_only": ([(1, (0, 2)), (1, (1, 2))], [[("attach", 0, 2)], [("attach", 1, 2)]]),
    "swapped_pes": ([(2, (1, 2)), (2, (0, 2))], ["rank 0: PE 1 of 2", "rank 1: PE 0 of 2"]),
    "a_world_per_rank": ([(2, (0, 1)), (2, (0, 1))], ["rank 0: PE 0 of 1", "rank 1: PE 0 of 1"]),
    "one_rank_initialised": ([NOT_INITIALISED, (2, (1, 2))], ["rank 0: not initialised"]),
    "larger_world": ([(2, (0, 4)), (2, (1, 4))], ["rank 0: PE 0 of 4", "rank 1: PE 1 of 4"]),
}


@pytest.mark.parametrize("case", list(DECISIONS))
def test_init_once_attaches_or_raises_on_every_rank(rank_pool, case):
    pytest.importorskip("deep_ep._C", reason="deep_ep.backends.nvshmem needs the compiled extension")
    states, expected = DECISIONS[case]
    results = rank_pool(2).run(rank_init_once_decision, states)
    if isinstance(expected[0], list):  # calls per rank
        for rank, (calls, attached, error) in enumerate(results):
            assert error is None, f"rank {rank}: {error}"
            assert calls == expected[rank], f"rank {rank}: {calls}"
            assert attached == (calls[0][0] == "attach"), f"rank {rank}: attached() is {attached}"
        return
    for rank, (calls, _, error) in enumerate(results):
        assert calls == [], f"rank {rank}: NVSHMEM was touched before the error: {calls}"
        assert error is not None and "another library" in error, f"rank {rank}: {error}"
        for part in expected:
            assert part in error, f"rank {rank}: {part!r} missing from: {error}"


def test_a_second_group_after_attaching_is_refused(rank_pool):
    pytest.importorskip("deep_ep._C", reason="deep_ep.backends.nvshmem needs the compiled extension")
    states = [(2, (0, 2)), (2, (1, 2))]
    results = rank_pool(2).run(rank_init_once_decision, states, then=(0, 1))
    for rank, (calls, _, error) in enumerate(results):
        assert calls == [("attach", rank, 2)], f"rank {rank}: {calls}"
        assert error is not None and "must share one group" in error, f"rank {rank}: {error}"
