"""How a group of ranks splits into NVLink domains ("nodes").

A group of R ranks is cut into R / L nodes of L = num_nvl_ranks consecutive ranks: rank g sits on node g // L
with local index g % L. L == R is the intra-node case; L < R makes a Buffer inter-node (DeepEP V1's
internode mode). L may be smaller than the ranks a host holds, so one host can be split into virtual nodes
whose traffic takes the inter-node path.

L comes from, in this order: the Buffer's `num_nvl_ranks=` keyword, the environment variable
DEEP_EP_NUM_NVL_RANKS, and detection (the group's ranks on this host, at most MAX_NVL_RANKS, and at most
torchrun's LOCAL_WORLD_SIZE). `resolve_num_nvl_ranks` is pure in the group's hostnames, so it is testable
without processes; `agree_num_nvl_ranks` runs it on every rank and makes the ranks agree.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Optional

NUM_NVL_RANKS_ENV = "DEEP_EP_NUM_NVL_RANKS"
# Largest NVLink domain the kernels address (DeepEP V1's NUM_MAX_NVL_PEERS).
MAX_NVL_RANKS = 8
# Set by torchrun: the processes it started on this host.
LOCAL_WORLD_SIZE_ENV = "LOCAL_WORLD_SIZE"


def _parse_env_int(name: str) -> Optional[int]:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"num_nvl_ranks: {name}={value!r} is not an integer") from None


def env_num_nvl_ranks() -> Optional[int]:
    """DEEP_EP_NUM_NVL_RANKS as an int, None when unset or empty (ValueError naming it when malformed)."""
    return _parse_env_int(NUM_NVL_RANKS_ENV)


def detect_num_nvl_ranks(hostnames: Sequence[str], rank: int) -> int:
    """The group's ranks on this rank's host (ranks sharing a GPU count separately), capped at
    MAX_NVL_RANKS and at LOCAL_WORLD_SIZE when that is set and smaller."""
    num_nvl_ranks = min(sum(1 for host in hostnames if host == hostnames[rank]), MAX_NVL_RANKS)
    local_world_size = _parse_env_int(LOCAL_WORLD_SIZE_ENV)
    if local_world_size is not None and 1 <= local_world_size < num_nvl_ranks:
        num_nvl_ranks = local_world_size
    return num_nvl_ranks


def resolve_num_nvl_ranks(requested: Optional[int], hostnames: Sequence[str], rank: int) -> int:
    """This rank's L: `requested` if given, else DEEP_EP_NUM_NVL_RANKS if set, else detected (see module).

    `hostnames[g]` is rank g's host. Raises (TypeError / ValueError naming `num_nvl_ranks`) unless
    1 <= L <= MAX_NVL_RANKS, L divides the group size, and each node's L consecutive ranks share a host.
    """
    num_ranks = len(hostnames)
    if not 0 <= rank < num_ranks:
        raise ValueError(f"rank: {rank} out of range for {num_ranks} hostnames")
    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, int):
            raise TypeError(f"num_nvl_ranks: expected an int or None, got {type(requested).__name__}")
        num_nvl_ranks, source = requested, "num_nvl_ranks="
    elif (from_env := env_num_nvl_ranks()) is not None:
        num_nvl_ranks, source = from_env, NUM_NVL_RANKS_ENV
    else:
        num_nvl_ranks, source = detect_num_nvl_ranks(hostnames, rank), "detected"

    if not 1 <= num_nvl_ranks <= MAX_NVL_RANKS:
        raise ValueError(f"num_nvl_ranks: must be in [1, {MAX_NVL_RANKS}], got {num_nvl_ranks} ({source})")
    if num_ranks % num_nvl_ranks != 0:
        raise ValueError(
            f"num_nvl_ranks: {num_nvl_ranks} ({source}) must divide the group's {num_ranks} ranks"
        )
    for node in range(num_ranks // num_nvl_ranks):
        first = node * num_nvl_ranks
        hosts = sorted(set(hostnames[first : first + num_nvl_ranks]))
        if len(hosts) > 1:
            raise ValueError(
                f"num_nvl_ranks: node {node} (ranks {first}..{first + num_nvl_ranks - 1}, {num_nvl_ranks} "
                f"consecutive ranks a node, {source}) spans hosts {hosts}; an NVLink domain must be on one "
                f"host: place ranks host by host, or set {NUM_NVL_RANKS_ENV} / num_nvl_ranks= to a divisor "
                "of the ranks per host"
            )
    return num_nvl_ranks


def agree_num_nvl_ranks(
    requested: Optional[int],
    hostnames: Sequence[str],
    rank: int,
    all_gather_object: Callable[[object], list],
) -> int:
    """`resolve_num_nvl_ranks` on every rank, then one all-gather so that every rank raises when any rank
    failed or the ranks resolved different values (e.g. DEEP_EP_NUM_NVL_RANKS set on some ranks only)."""
    try:
        outcome: object = resolve_num_nvl_ranks(requested, hostnames, rank)
    except (TypeError, ValueError) as error:
        outcome = error
    outcomes = all_gather_object(outcome if isinstance(outcome, int) else f"{outcome}")
    if not isinstance(outcome, int):
        raise outcome
    for other, value in enumerate(outcomes):
        if not isinstance(value, int):
            raise ValueError(f"num_nvl_ranks: rank {other} could not resolve it: {value}")
    if any(value != outcomes[0] for value in outcomes):
        raise ValueError(
            f"num_nvl_ranks: ranks disagree: {outcomes}; pass num_nvl_ranks= or set {NUM_NVL_RANKS_ENV} "
            "the same on every rank"
        )
    return outcome
