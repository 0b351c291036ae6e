"""The inter-node section of ``python -m deep_ep.check``: is it safe for a receiver to read, with either load
kind, what NVSHMEM puts delivered into its symmetric buffer?

The ranks are split into nodes of ``num_nvl_ranks`` consecutive ranks; rank r produces for rank
r + k * num_nvl_ranks and consumes from rank r - k * num_nvl_ranks (mod the ranks, k = 1 .. nodes - 1), so
every pair crosses a node boundary and no store of one reaches the other: the producer stages each round in
its own symmetric buffer and delivers it with NVSHMEM device calls only, either as puts completed by quiet and
followed by a signal (the inter-node dispatch and combine) or as one put with the signal attached (the notify
and low-latency kernels). The consumer waits for the signal with an acquire, reads the payload from its OWN
symmetric buffer with the load under test, counts stale / torn / invalid words as the intra-node stress does
(same kernel code), and acks with an NVSHMEM signal. Optionally rank 0 times a bulk put into the first rank
of the next node.

On one host the nodes are virtual (deep_ep.launch's RankPool; ranks may share a GPU), and NVSHMEM's P2P
transport carries the puts; under torchrun across hosts it is the remote transport (IBGDA, IBRC, UCX,
libfabric), with the nodes deep_ep.topology detects.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import sys
import traceback
from collections.abc import Mapping
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from deep_ep import topology
from deep_ep.tools.check import (
    COUNTER_NAMES,
    coherence_options,
    environment_report,
    exit_status,
    format_coherence_table,
    format_report,
    summarize_coherence,
    time_launches,
)

DELIVERIES = ("put_then_signal", "put_with_signal")
TITLE = "Inter-node coherence (NVSHMEM put + signal)"


# ----------------------------------------------------------------------------------------------------------
# Planning (pure: tested on CPU)


def default_num_nvl_ranks(num_ranks: int) -> int:
    """Half of the ranks (2 nodes) when that fits an NVLink domain; otherwise the largest divisor of the ranks
    that is at most half of them and at most topology.MAX_NVL_RANKS; at least 1."""
    for num_nvl_ranks in range(min(num_ranks // 2, topology.MAX_NVL_RANKS), 0, -1):
        if num_ranks % num_nvl_ranks == 0:
            return num_nvl_ranks
    return 1


def check_split(num_ranks: int, num_nvl_ranks: int, source: str) -> None:
    """ValueError unless num_nvl_ranks is a valid node size (deep_ep.topology's rules) that leaves at least 2
    nodes: with one node nothing crosses a node boundary."""
    if num_ranks < 2:
        raise ValueError(f"--internode-ranks: the inter-node check needs at least 2 ranks, got {num_ranks}")
    try:
        topology.resolve_num_nvl_ranks(num_nvl_ranks, ["localhost"] * num_ranks, 0)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{source}: {error}") from None
    if num_ranks // num_nvl_ranks < 2:
        raise ValueError(
            f"{source}: {num_nvl_ranks} ranks a node make {num_ranks} ranks one node; the inter-node check "
            "needs at least 2"
        )


def plan_internode(
    num_gpus: int, num_ranks: Optional[int] = None, num_nvl_ranks: Optional[int] = None
) -> dict:
    """The one-host scenario: {"name", "num_ranks", "num_nvl_ranks"}. Default ranks: one per GPU when there are
    several, 4 sharing the GPU when there is one; default node size: default_num_nvl_ranks (2 nodes)."""
    if num_ranks is None:
        num_ranks = num_gpus if num_gpus >= 2 else 4
    if num_nvl_ranks is None:
        num_nvl_ranks = default_num_nvl_ranks(num_ranks)
    check_split(num_ranks, num_nvl_ranks, "--num-nvl-ranks")
    where = "one GPU" if num_gpus <= 1 else f"{num_gpus} GPUs"
    return dict(
        name=f"{num_ranks} ranks as {num_ranks // num_nvl_ranks} virtual nodes x {num_nvl_ranks} on {where}",
        num_ranks=num_ranks,
        num_nvl_ranks=num_nvl_ranks,
    )


def choose_num_nvl_ranks(
    requested: Optional[int], detected: Optional[int], num_ranks: int
) -> tuple[int, str]:
    """Under torchrun: (ranks a node, where that came from). --num-nvl-ranks when given; else what
    deep_ep.topology detects (DEEP_EP_NUM_NVL_RANKS, else the ranks of a host) when that makes several
    nodes; else, the group being one NVLink domain, virtual nodes as on one host."""
    if requested is not None:
        return requested, "--num-nvl-ranks"
    if detected is not None and detected < num_ranks:
        return detected, "detected"
    return default_num_nvl_ranks(num_ranks), "virtual nodes: the group is one NVLink domain"


def launched_by_torchrun(env: Mapping[str, str]) -> bool:
    """Whether this process is one rank of a torchrun (torch.distributed.elastic) job of several ranks."""
    return "TORCHELASTIC_RUN_ID" in env and int(env.get("WORLD_SIZE", "1")) > 1


def internode_options(num_nvl_ranks: int, **overrides) -> dict:
    """The intra-node stress's defaults (variants, payload sizes, blocks, rounds, timeout) with deliveries in
    place of placements, the node size, and the put bandwidth sample (0 bytes: none)."""
    options = coherence_options()
    del options["placements"]
    options.update(
        deliveries=list(DELIVERIES),
        num_nvl_ranks=num_nvl_ranks,
        bandwidth_bytes=256 << 20,
        warmup=3,
        iterations=20,
    )
    options.update(overrides)
    return options


# ----------------------------------------------------------------------------------------------------------
# One rank's part


def _all_gather(group, num_ranks: int, obj: object) -> list:
    gathered: list = [None] * num_ranks
    dist.all_gather_object(gathered, obj, group=group)
    return gathered


def _time_puts(runtime, dst_rank: int, offset: int, options: dict) -> list[dict]:
    from deep_ep import _C

    testing = _C.testing
    num_bytes = options["bandwidth_bytes"]
    sm_count = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    stream = torch.cuda.Stream()
    records = []
    for num_blocks in sorted({min(24, sm_count), sm_count}):
        args = (runtime, dst_rank, offset, num_bytes, num_blocks, stream.cuda_stream)
        timing = time_launches(lambda args=args: testing.put_bandwidth(*args), stream, num_bytes, options)
        records.append(dict(source=0, target=dst_rank, num_blocks=num_blocks, num_bytes=num_bytes, **timing))
    return records


def internode_job(rank: int, num_ranks: int, group, options: dict) -> dict:
    """One rank's part: every (variant, delivery, slice size, node shift) configuration in the same order on
    every rank, then rank 0's put bandwidth. Returns {"records": this rank's consumer counters, "bandwidth"}."""
    from deep_ep import _C
    from deep_ep.backends import nvshmem

    testing = _C.testing
    num_nvl_ranks, num_blocks, rounds = options["num_nvl_ranks"], options["num_blocks"], options["rounds"]
    coherence_bytes = testing.coherence_buffer_bytes(num_blocks, max(options["slice_bytes"]))
    num_bytes = coherence_bytes + options["bandwidth_bytes"]
    # Ranks sharing a GPU run NVSHMEM under MPS, which init_once prepares for.
    me = (socket.gethostname(), str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid))
    shared_gpu = len(set(_all_gather(group, num_ranks, me))) < num_ranks
    nvshmem.init_once(lambda obj: _all_gather(group, num_ranks, obj), rank, num_ranks, num_bytes, shared_gpu)
    # The RuntimeBuffer brings the wait timeout and error word; it has no NVLink buffer of its own.
    runtime = _C.RuntimeBuffer(rank, num_ranks, 0, options["timeout_s"], num_nvl_ranks=num_nvl_ranks)
    # Ranks of other nodes come back unmapped: the kernels reach them with NVSHMEM puts only.
    base, mapped = nvshmem.allocate_symmetric(num_bytes, rank, num_ranks, num_nvl_ranks, True)
    stream = torch.cuda.Stream()
    records: list[dict] = []
    bandwidth: list[dict] = []
    try:
        runtime.attach_symmetric(base, num_bytes, mapped, 1)
        seq_base = 0
        configurations = itertools.product(
            options["variants"],
            options["deliveries"],
            options["slice_bytes"],
            range(1, num_ranks // num_nvl_ranks),
        )
        for variant, delivery, slice_bytes, node_shift in configurations:
            shift = node_shift * num_nvl_ranks
            producer, consumer = (rank - shift) % num_ranks, (rank + shift) % num_ranks
            counters = torch.zeros(testing.num_coherence_counters, dtype=torch.int64, device="cuda")
            stream.wait_stream(torch.cuda.current_stream())  # the zeros land before the kernel adds to them
            # Every rank's previous kernel has finished (each synchronised before this barrier).
            dist.barrier(group=group)
            testing.internode_coherence_round_trip(
                runtime,
                producer,
                consumer,
                variant,
                delivery,
                num_blocks,
                slice_bytes,
                rounds,
                seq_base,
                counters,
                stream.cuda_stream,
            )
            stream.synchronize()
            runtime.raise_if_failed()
            seq_base += rounds
            values = dict(zip(COUNTER_NAMES, counters.tolist()))
            records.append(
                dict(
                    rank=rank,
                    producer=producer,
                    variant=variant,
                    delivery=delivery,
                    slice_bytes=slice_bytes,
                    node_shift=node_shift,
                    **values,
                )
            )
        dist.barrier(group=group)
        if options["bandwidth_bytes"] > 0:
            # The first rank of the next node; it and the others wait at the barrier meanwhile.
            if rank == 0:
                bandwidth = _time_puts(runtime, num_nvl_ranks, coherence_bytes, options)
                runtime.raise_if_failed()
            dist.barrier(group=group)
    except BaseException:
        # No collective free here: the other ranks may never reach it. The process's NVSHMEM goes with it.
        runtime.destroy()
        raise
    nvshmem.free_symmetric(base)  # collective; every rank's kernels are done
    runtime.destroy()
    return {"records": records, "bandwidth": bandwidth}


def merge_results(per_rank: list[dict], num_ranks: int, options: dict) -> dict:
    """The scenario's result from every rank's internode_job result."""
    records = [record for result in per_rank for record in result["records"]]
    num_nvl_ranks = options["num_nvl_ranks"]
    return {
        "num_ranks": num_ranks,
        "num_nvl_ranks": num_nvl_ranks,
        "num_nodes": num_ranks // num_nvl_ranks,
        "options": options,
        "records": records,
        "summary": summarize_coherence(records),
        "bandwidth": per_rank[0]["bandwidth"],
    }


def run_internode(pool, num_nvl_ranks: int, **overrides) -> dict:
    """Runs the inter-node check on a deep_ep.launch.RankPool split into nodes of num_nvl_ranks ranks."""
    options = internode_options(num_nvl_ranks, **overrides)
    return merge_results(pool.run(internode_job, options), pool.num_ranks, options)


def unavailable() -> Optional[str]:
    """Why the inter-node check cannot run in this process, or None when it can."""
    if not torch.cuda.is_available():
        return "no CUDA GPU visible"
    try:
        from deep_ep import _C
    except ImportError as error:
        return f"deep_ep._C is not importable ({error})"
    if not getattr(_C.testing, "internode_compiled", False):
        return "deep_ep._C was built without NVSHMEM"
    return None


def run_on_this_host(plan: dict, **overrides) -> dict:
    """plan_internode's scenario in a fresh RankPool; a report entry with "skipped" or "error" instead of
    results when it cannot run."""
    from deep_ep.tools.launch import RankPool

    name = plan["name"]
    if (why := unavailable()) is not None:
        return dict(name=name, skipped=why)
    try:
        with RankPool(plan["num_ranks"]) as pool:
            return dict(name=name, **run_internode(pool, plan["num_nvl_ranks"], **overrides))
    except Exception as error:  # noqa: BLE001 - reported as a failed scenario
        return dict(name=name, num_ranks=plan["num_ranks"], error=f"{type(error).__name__}: {error}")


# ----------------------------------------------------------------------------------------------------------
# Under torchrun: every process is one rank, across real nodes


def main_torchrun(args) -> int:
    """This process's part of a torchrun job (check.main's parsed arguments): the inter-node check over the
    whole job, reported by rank 0; every rank returns the same exit status."""
    rank, num_ranks = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    # gloo: only object collectives and barriers cross the group, and ranks may share a GPU.
    dist.init_process_group("gloo", timeout=timedelta(seconds=max(300.0, 10 * args.timeout_s)))
    group = dist.group.WORLD
    try:
        report: dict = {"environment": environment_report() if rank == 0 else {}, "internode": []}
        why = "--skip-internode" if args.skip_internode else unavailable()
        if why is not None:
            report["skipped"] = f"inter-node check: {why}"
        else:
            report["internode"].append(_torchrun_scenario(args, rank, num_ranks, group))
        if rank == 0:
            print(json.dumps(report, indent=1) if args.json else format_report(report))
        return exit_status(report)
    except Exception:  # noqa: BLE001 - this rank stops; torchrun stops the others
        print(f"rank {rank}:\n{traceback.format_exc()}", file=sys.stderr)
        return 1
    finally:
        dist.destroy_process_group()


def _torchrun_scenario(args, rank: int, num_ranks: int, group) -> dict:
    def gather(obj: object) -> list:
        return _all_gather(group, num_ranks, obj)

    hostnames = gather(socket.gethostname())
    detected = (
        None
        if args.num_nvl_ranks is not None
        else topology.agree_num_nvl_ranks(None, hostnames, rank, gather)
    )
    num_nvl_ranks, source = choose_num_nvl_ranks(args.num_nvl_ranks, detected, num_ranks)
    check_split(num_ranks, num_nvl_ranks, source)
    # Every node's ranks on one host (raises on every rank otherwise).
    topology.agree_num_nvl_ranks(num_nvl_ranks, hostnames, rank, gather)
    num_hosts = len(set(hostnames))
    name = (
        f"{num_ranks} ranks as {num_ranks // num_nvl_ranks} nodes x {num_nvl_ranks} ({source}) "
        f"on {num_hosts} host{'s' if num_hosts > 1 else ''}, torchrun"
    )
    options = internode_options(num_nvl_ranks, **overrides_from_args(args))
    result = internode_job(rank, num_ranks, group, options)
    return dict(name=name, **merge_results(gather(result), num_ranks, options))


def overrides_from_args(args) -> dict:
    """The options check.main's command line sets for the inter-node check."""
    return dict(
        rounds=args.rounds,
        slice_bytes=args.slice_bytes,
        num_blocks=args.num_blocks,
        timeout_s=args.timeout_s,
        bandwidth_bytes=0 if args.skip_bandwidth else args.bandwidth_mib << 20,
    )


# ----------------------------------------------------------------------------------------------------------
# Report


def format_scenario(scenario: dict) -> list[str]:
    """The report's lines for one inter-node scenario (check.format_report's section)."""
    lines = [f"== {TITLE}: {scenario['name']}"]
    if "skipped" in scenario:
        return lines + [f"skipped: {scenario['skipped']}"]
    if "error" in scenario:
        return lines + [f"FAILED: {scenario['error'].splitlines()[-1]}"]
    options = scenario["options"]
    num_nvl_ranks, num_nodes = scenario["num_nvl_ranks"], scenario["num_nodes"]
    shifts = "k = 1" if num_nodes == 2 else f"k = 1..{num_nodes - 1}"
    lines.append(
        f"{options['rounds']} rounds x {options['num_blocks']} block pairs per launch; payload per block "
        f"{options['slice_bytes']} B; deliveries {options['deliveries']}; rank r produces for rank "
        f"r + k x {num_nvl_ranks} ({shifts}) and reads what lands in its own symmetric buffer"
    )
    lines += format_coherence_table(scenario["summary"])
    for r in scenario.get("bandwidth", []):
        lines.append(
            f"NVSHMEM put bandwidth, rank {r['source']} -> rank {r['target']}: {r['num_bytes'] >> 20} MiB with "
            f"{r['num_blocks']} blocks, median {r['median_us']:.1f} us, {r['gbps']:.1f} GB/s"
        )
    return lines
