"""``python -m deep_ep.check``: is it safe to use the aggressive peer loads on this machine, and what do they buy?

1. Environment: GPUs, compute capability, SM count, peer access and NVLink topology, CUDA MPS, NVSHMEM
   version and transports, which load kind the extension compiled and which one a Buffer would select.
2. Coherence stress: in every process, one kernel is producer for one peer and consumer of another at
   the same time. The producer writes sequence-numbered payloads and releases a flag; the consumer
   acquires the flag, reads the payload with the load under test, counts words from an older round
   (stale), 16-byte loads mixing rounds (torn) and words from no round (invalid), then acks. Run across
   every GPU pair (one process per GPU) and across 2 and 4 processes sharing one GPU (CUDA MPS), for
   both placements (consumer pulls from the producer's buffer / producer pushes into the consumer's),
   several payload sizes, and each load kind. Two deliberately wrong variants (plain ``ld.global.nc``,
   which allocates in L1, with and without an acquiring flag wait) show whether the test can see
   staleness at all.
3. Inter-node check (deep_ep.tools.check_internode): the same producer/consumer between nodes, over NVSHMEM.
   The ranks are split into nodes of ``--num-nvl-ranks`` consecutive ranks (default: half of them, two
   virtual nodes on this host, ranks sharing a GPU when there is one); rank r produces for the rank
   ``--num-nvl-ranks`` further on, so no store of one reaches the other. The producer stages each round in
   its symmetric buffer and delivers it with NVSHMEM device calls only (puts, quiet, then a signal; or one
   put with the signal attached: the two patterns of the inter-node and low-latency kernels); the consumer
   waits for the signal, reads the payload from its own symmetric buffer with each load kind (and the wrong
   variants), counts as above and acks with a signal. Also rank 0's NVSHMEM put bandwidth into the next
   node. Under torchrun (``torchrun --nnodes 2 --nproc-per-node 8 ... -m deep_ep.check``) every process is a
   rank, the nodes are the hosts (deep_ep.topology's detection, or ``--num-nvl-ranks``), and only the
   environment report and this check run; rank 0 prints.
4. Peer read bandwidth of both load kinds (GB/s).

Prints a table; ``--json`` prints one JSON object instead. Benchmarks here never fail the command; the
exit status is 1 only if a coherence scenario (intra- or inter-node) failed to run or a load kind the library
uses (aggressive, conservative) read stale data. ``--skip-stress``, ``--skip-internode`` and
``--skip-bandwidth`` leave parts out.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys

import torch

from deep_ep.backends import loads

LIBRARY_VARIANTS = ("aggressive", "conservative")
WRONG_VARIANTS = ("nc_allocating_acquire", "nc_allocating_relaxed")
PLACEMENTS = ("pull", "push")
COUNTER_NAMES = ("checked_loads", "stale_words", "torn_loads", "invalid_words", "rounds")


# ----------------------------------------------------------------------------------------------------------
# Environment


def _run_text(command: list[str], timeout_s: float = 10.0) -> str | None:
    if shutil.which(command[0]) is None:
        return None
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def mps_status() -> dict:
    pipe_dir = os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps")
    running = os.path.exists(os.path.join(pipe_dir, "control"))
    return {"running": running, "pipe_directory": pipe_dir}


def _nvshmem_report() -> dict:
    report: dict = {"compiled": False}
    try:
        from deep_ep import _C

        report["compiled"] = bool(_C.nvshmem.is_compiled())
        report["version"] = _C.nvshmem.version()
    except (ImportError, AttributeError):
        return report
    lib_dirs = []
    if os.environ.get("NVSHMEM_DIR"):
        lib_dirs.append(os.path.join(os.environ["NVSHMEM_DIR"], "lib"))
    try:
        import nvidia.nvshmem as wheel

        lib_dirs += [os.path.join(p, "lib") for p in wheel.__path__]
    except ImportError:
        pass
    # NVSHMEM loads each remote transport as a plugin; P2P over NVLink is built in.
    plugins = sorted(
        {
            os.path.basename(p).split(".so")[0]
            for d in lib_dirs
            for p in glob.glob(f"{d}/nvshmem_transport_*.so*")
        }
    )
    report["transports_available"] = ["p2p (built in)"] + [
        p.replace("nvshmem_transport_", "") for p in plugins
    ]
    report["remote_transport_env"] = os.environ.get("NVSHMEM_REMOTE_TRANSPORT", "(default: ibrc)")
    return report


def environment_report() -> dict:
    report: dict = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "extension_built": False,
        "gpus": [],
        "mps": mps_status(),
    }
    try:
        from deep_ep import _C

        report["extension_built"] = True
        report["aggressive_loads_compiled"] = bool(_C.aggressive_loads_compiled())
    except ImportError as error:
        report["extension_error"] = str(error)
        report["aggressive_loads_compiled"] = False
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        for index in range(count):
            props = torch.cuda.get_device_properties(index)
            report["gpus"].append(
                {
                    "index": index,
                    "name": props.name,
                    "compute_capability": f"{props.major}.{props.minor}",
                    "sm_count": props.multi_processor_count,
                    "memory_gib": round(props.total_memory / 2**30, 1),
                    "peer_access": [
                        j for j in range(count) if j != index and torch.cuda.can_device_access_peer(index, j)
                    ],
                }
            )
        kind, why = loads.explain_load_kind(None, 0)
        report["load_kind_selected"] = kind
        report["load_kind_reason"] = why
    else:
        report["load_kind_selected"] = loads.CONSERVATIVE
        report["load_kind_reason"] = "no CUDA GPU visible"
    report["nvlink_topology"] = _run_text(["nvidia-smi", "topo", "-m"])
    report["nvshmem"] = _nvshmem_report()
    report["env"] = {k: os.environ[k] for k in (loads.ENV_VAR, "CUDA_VISIBLE_DEVICES") if k in os.environ}
    return report


# ----------------------------------------------------------------------------------------------------------
# Rank processes come from deep_ep.launch: rank r on GPU r % num_gpus, a gloo group (NCCL with one GPU per
# rank), CUDA MPS started when ranks share a GPU. With k ranks per GPU, ranks r and r + num_gpus share one,
# so the stress covers same-GPU pairs and cross-GPU pairs in the same run.


def _connected_buffer(rank: int, num_ranks: int, group, num_bytes: int, timeout_s: float):
    from deep_ep import _C

    buffer = _C.RuntimeBuffer(rank, num_ranks, num_bytes, timeout_s)
    handles = [None] * num_ranks
    torch.distributed.all_gather_object(handles, buffer.local_ipc_handle(), group=group)
    buffer.connect(handles)
    torch.distributed.barrier(group=group)
    return buffer


# ----------------------------------------------------------------------------------------------------------
# Coherence stress


def coherence_job(rank: int, num_ranks: int, group, options: dict) -> list[dict]:
    """One rank's part: every (variant, placement, slice size, shift) configuration, in the same order on
    every rank (sequence numbers and barriers depend on it). Returns this rank's consumer counters."""
    from deep_ep import _C

    testing = _C.testing
    num_blocks, rounds = options["num_blocks"], options["rounds"]
    num_bytes = testing.coherence_buffer_bytes(num_blocks, max(options["slice_bytes"]))
    buffer = _connected_buffer(rank, num_ranks, group, num_bytes, options["timeout_s"])
    stream = torch.cuda.Stream()
    shifts = range(1, num_ranks) if num_ranks > 1 else [0]
    seq_base, records = 0, []
    try:
        for variant in options["variants"]:
            for placement in options["placements"]:
                for slice_bytes in options["slice_bytes"]:
                    for shift in shifts:
                        counters = torch.zeros(
                            testing.num_coherence_counters, dtype=torch.int64, device="cuda"
                        )
                        # Every rank's previous kernel has finished (each synchronised before this barrier),
                        # so nobody still reads a region the next round overwrites.
                        torch.distributed.barrier(group=group)
                        producer, consumer = (rank - shift) % num_ranks, (rank + shift) % num_ranks
                        testing.coherence_round_trip(
                            buffer,
                            producer,
                            consumer,
                            variant,
                            placement,
                            num_blocks,
                            slice_bytes,
                            rounds,
                            seq_base,
                            counters,
                            stream.cuda_stream,
                        )
                        stream.synchronize()
                        buffer.raise_if_failed()
                        seq_base += rounds
                        values = dict(zip(COUNTER_NAMES, counters.tolist()))
                        records.append(
                            dict(
                                rank=rank,
                                producer=producer,
                                variant=variant,
                                placement=placement,
                                slice_bytes=slice_bytes,
                                **values,
                            )
                        )
        torch.distributed.barrier(group=group)
    finally:
        buffer.destroy()
    return records


def summarize_coherence(records: list[dict]) -> dict[str, dict]:
    """Totals per variant over ranks, placements, sizes and pairs."""
    summary: dict[str, dict] = {}
    for record in records:
        total = summary.setdefault(record["variant"], {name: 0 for name in COUNTER_NAMES})
        for name in COUNTER_NAMES:
            total[name] += record[name]
    for variant, total in summary.items():
        bad = total["stale_words"] + total["torn_loads"] + total["invalid_words"]
        if variant in LIBRARY_VARIANTS:
            total["verdict"] = "OK: no stale data" if bad == 0 else "STALE DATA: do not use this load kind"
        else:
            total["verdict"] = (
                "staleness detected (expected: the test can see it)"
                if bad
                else "no staleness seen on this machine"
            )
    return summary


def coherence_options(**overrides) -> dict:
    from deep_ep import _C

    variants = list(LIBRARY_VARIANTS if _C.aggressive_loads_compiled() else ("conservative",))
    if _C.aggressive_loads_compiled():
        variants += WRONG_VARIANTS
    options = dict(
        variants=variants,
        placements=list(PLACEMENTS),
        slice_bytes=[256, 4096, 65536],
        num_blocks=4,
        rounds=2000,
        timeout_s=30.0,
    )
    options.update(overrides)
    return options


def run_coherence(pool, **overrides) -> dict:
    """Runs the stress on a deep_ep.launch.RankPool; returns {"options", "records", "summary"}."""
    options = coherence_options(**overrides)
    per_rank = pool.run(coherence_job, options)
    records = [record for rank_records in per_rank for record in rank_records]
    return {
        "num_ranks": pool.num_ranks,
        "options": options,
        "records": records,
        "summary": summarize_coherence(records),
    }


# ----------------------------------------------------------------------------------------------------------
# Bandwidth


def time_launches(launch, stream, num_bytes: int, options: dict) -> dict:
    """Times `launch()` (which enqueues on `stream`) with CUDA events after options["warmup"] untimed runs;
    median, min and max over options["iterations"], and GB/s of num_bytes at the median."""
    for _ in range(options["warmup"]):
        launch()
    times_ms = []
    for _ in range(options["iterations"]):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        launch()
        end.record(stream)
        end.synchronize()
        times_ms.append(start.elapsed_time(end))
    median_ms = statistics.median(times_ms)
    return dict(
        median_us=median_ms * 1e3,
        min_us=min(times_ms) * 1e3,
        max_us=max(times_ms) * 1e3,
        gbps=num_bytes / (median_ms * 1e-3) / 1e9,
    )


def _time_peer_read(buffer, peer: int, kind: str, num_blocks: int, options: dict) -> dict:
    from deep_ep import _C

    testing = _C.testing
    num_bytes = options["bandwidth_bytes"]
    stream = torch.cuda.Stream()
    sink = torch.empty(num_blocks * testing.peer_read_threads, dtype=torch.int32, device="cuda")
    args = (buffer, peer, num_bytes, kind == "conservative", num_blocks, sink, stream.cuda_stream)
    timing = time_launches(lambda: testing.peer_read_bandwidth(*args), stream, num_bytes, options)
    return dict(
        reader=0,
        source=peer,
        local=peer == 0,
        load_kind=kind,
        num_blocks=num_blocks,
        num_bytes=num_bytes,
        **timing,
    )


def bandwidth_job(rank: int, num_ranks: int, group, options: dict) -> list[dict]:
    """Rank 0 reads each other rank's buffer (and its own, as the local baseline) with both load kinds while
    the others wait; GB/s from CUDA events, median of options["iterations"]."""
    from deep_ep import _C

    buffer = _connected_buffer(rank, num_ranks, group, options["bandwidth_bytes"], options["timeout_s"])
    records = []
    try:
        if rank == 0:
            sm_count = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
            kinds = ["conservative"] + (["aggressive"] if _C.aggressive_loads_compiled() else [])
            for peer in list(range(1, num_ranks)) + [0]:
                for num_blocks in sorted({min(24, sm_count), sm_count}):
                    for kind in kinds:
                        records.append(_time_peer_read(buffer, peer, kind, num_blocks, options))
            buffer.raise_if_failed()
        torch.distributed.barrier(group=group)
    finally:
        buffer.destroy()
    return records


def run_bandwidth(pool, **overrides) -> dict:
    options = dict(bandwidth_bytes=256 << 20, warmup=3, iterations=20, timeout_s=30.0)
    options.update(overrides)
    return {"num_ranks": pool.num_ranks, "records": pool.run(bandwidth_job, options)[0]}


# ----------------------------------------------------------------------------------------------------------
# CLI


def plan_scenarios(num_gpus: int, ranks_per_gpu: list[int]) -> list[tuple[str, int]]:
    """(name, num_ranks): one process per GPU across GPUs, then k processes per GPU (rank r on r % num_gpus)."""
    scenarios = []
    if num_gpus >= 2:
        scenarios.append((f"{num_gpus} GPUs, 1 process each", num_gpus))
    for count in ranks_per_gpu:
        where = "one GPU" if num_gpus == 1 else f"each of {num_gpus} GPUs"
        scenarios.append((f"{count} processes sharing {where}", count * num_gpus))
    return scenarios


def _format_environment(env: dict) -> list[str]:
    lines = [f"python {env['python']}, torch {env['torch']} (CUDA {env['torch_cuda']})"]
    for gpu in env["gpus"]:
        lines.append(
            f"GPU {gpu['index']}: {gpu['name']}, sm_{gpu['compute_capability'].replace('.', '')}, "
            f"{gpu['sm_count']} SMs, {gpu['memory_gib']} GiB, peer access to {gpu['peer_access'] or 'none'}"
        )
    if not env["gpus"]:
        lines.append("no CUDA GPU visible")
    mps = env["mps"]
    lines.append(
        f"CUDA MPS: {'running' if mps['running'] else 'not running'} (pipe directory {mps['pipe_directory']})"
    )
    nv = env["nvshmem"]
    if nv.get("compiled"):
        lines.append(
            f"NVSHMEM {nv['version']}; transports: {', '.join(nv['transports_available'])}; "
            f"NVSHMEM_REMOTE_TRANSPORT={nv['remote_transport_env']}"
        )
    else:
        lines.append("NVSHMEM: not compiled into deep_ep._C")
    lines.append(
        f"extension built: {env['extension_built']}; aggressive loads compiled: {env['aggressive_loads_compiled']}"
    )
    lines.append(f"load kind a Buffer selects: {env['load_kind_selected']} ({env['load_kind_reason']})")
    if env.get("nvlink_topology"):
        lines += ["nvidia-smi topo -m:"] + ["  " + line for line in env["nvlink_topology"].splitlines()]
    return lines


def format_coherence_table(summary: dict[str, dict]) -> list[str]:
    """One row per variant of summarize_coherence's totals, with its verdict."""
    header = f"{'variant':24} {'checked 16B loads':>18} {'stale words':>12} {'torn loads':>11} {'invalid':>8}  verdict"
    lines = [header, "-" * len(header)]
    for variant, total in summary.items():
        lines.append(
            f"{variant:24} {total['checked_loads']:>18,} {total['stale_words']:>12,} {total['torn_loads']:>11,} "
            f"{total['invalid_words']:>8,}  {total['verdict']}"
        )
    return lines


def format_report(report: dict) -> str:
    # Imported here: check_internode builds on this module.
    from deep_ep.tools import check_internode

    lines = ["== Environment"] + _format_environment(report["environment"])
    if "skipped" in report:
        lines += ["", f"skipped: {report['skipped']}"]
    for scenario in report.get("coherence", []):
        lines += ["", f"== Coherence stress: {scenario['name']}"]
        if "error" in scenario:
            lines.append(f"FAILED: {scenario['error'].splitlines()[-1]}")
            continue
        options = scenario["options"]
        lines.append(
            f"{options['rounds']} rounds x {options['num_blocks']} block pairs per launch; payload per block "
            f"{options['slice_bytes']} B; placements {options['placements']}"
        )
        lines += format_coherence_table(scenario["summary"])
    for scenario in report.get("internode", []):
        lines += [""] + check_internode.format_scenario(scenario)
    for scenario in report.get("bandwidth", []):
        lines += [
            "",
            f"== Peer read bandwidth: {scenario['name']} (rank 0 reads; median of CUDA-event timings)",
        ]
        if "error" in scenario:
            lines.append(f"FAILED: {scenario['error'].splitlines()[-1]}")
            continue
        header = f"{'source':>10} {'blocks':>6} {'load kind':>13} {'MiB':>6} {'median us':>10} {'GB/s':>8}"
        lines += [header, "-" * len(header)]
        for r in scenario["records"]:
            source = "local" if r["local"] else f"rank {r['source']}"
            lines.append(
                f"{source:>10} {r['num_blocks']:>6} {r['load_kind']:>13} {r['num_bytes'] >> 20:>6} "
                f"{r['median_us']:>10.1f} {r['gbps']:>8.1f}"
            )
    return "\n".join(lines)


def exit_status(report: dict) -> int:
    """1 if a coherence scenario (intra- or inter-node) failed to run or a load kind the library uses read
    stale data; 0 otherwise (skipped scenarios, staleness of the wrong variants and benchmarks never fail)."""
    for scenario in report.get("coherence", []) + report.get("internode", []):
        if "error" in scenario:
            return 1
        summary = scenario.get("summary", {})
        if any(summary.get(v, {}).get("verdict", "OK").startswith("STALE") for v in LIBRARY_VARIANTS):
            return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deep_ep.check", description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument(
        "--ranks-per-gpu",
        type=int,
        nargs="*",
        default=[2, 4],
        help="process counts to run on one shared GPU (default: 2 4)",
    )
    parser.add_argument("--rounds", type=int, default=2000, help="producer/consumer rounds per launch")
    parser.add_argument(
        "--slice-bytes",
        type=int,
        nargs="+",
        default=[256, 4096, 65536],
        help="payload bytes per block pair (multiples of 16)",
    )
    parser.add_argument("--num-blocks", type=int, default=4, help="block pairs per rank (SMs used: 2x this)")
    parser.add_argument(
        "--bandwidth-mib",
        type=int,
        default=256,
        help="bytes per bandwidth sample (peer read, NVSHMEM put), MiB",
    )
    parser.add_argument("--timeout-s", type=float, default=30.0, help="spin-wait timeout inside the kernels")
    parser.add_argument(
        "--internode-ranks",
        type=int,
        default=None,
        help="ranks of the inter-node check on this host (default: one per GPU with several GPUs, else 4)",
    )
    parser.add_argument(
        "--num-nvl-ranks",
        type=int,
        default=None,
        help="ranks a node in the inter-node check (default: half of the ranks, i.e. 2 virtual nodes; "
        "under torchrun: deep_ep.topology's detection when the job spans several hosts)",
    )
    parser.add_argument("--skip-stress", action="store_true", help="skip the intra-node coherence stress")
    parser.add_argument("--skip-internode", action="store_true", help="skip the inter-node (NVSHMEM) check")
    parser.add_argument("--skip-bandwidth", action="store_true", help="skip peer read and put bandwidth")
    args = parser.parse_args(argv)

    # Imported here: check_internode builds on this module.
    from deep_ep.tools import check_internode
    from deep_ep.tools.launch import RankPool, visible_gpu_count

    if check_internode.launched_by_torchrun(os.environ):
        return check_internode.main_torchrun(args)
    internode_plan = None
    if not args.skip_internode:
        try:
            internode_plan = check_internode.plan_internode(
                visible_gpu_count(), args.internode_ranks, args.num_nvl_ranks
            )
        except ValueError as error:
            parser.error(str(error))

    report: dict = {"environment": environment_report(), "coherence": [], "internode": [], "bandwidth": []}
    env = report["environment"]
    if not env["gpus"] or not env["extension_built"]:
        report["skipped"] = "no CUDA GPU or no deep_ep._C: only the environment report ran"
    else:
        for name, num_ranks in plan_scenarios(len(env["gpus"]), args.ranks_per_gpu):
            try:
                with RankPool(num_ranks) as pool:
                    if not args.skip_stress:
                        result = run_coherence(
                            pool,
                            rounds=args.rounds,
                            slice_bytes=args.slice_bytes,
                            num_blocks=args.num_blocks,
                            timeout_s=args.timeout_s,
                        )
                        report["coherence"].append(dict(name=name, **result))
                    if not args.skip_bandwidth:
                        result = run_bandwidth(
                            pool, bandwidth_bytes=args.bandwidth_mib << 20, timeout_s=args.timeout_s
                        )
                        report["bandwidth"].append(dict(name=name, **result))
            except Exception as error:  # noqa: BLE001 - a failed scenario is reported, the others still run
                failed = (
                    report["bandwidth"]
                    if len(report["coherence"]) > len(report["bandwidth"])
                    else report["coherence"]
                )
                failed.append(dict(name=name, num_ranks=num_ranks, error=f"{type(error).__name__}: {error}"))
        if internode_plan is not None:
            overrides = check_internode.overrides_from_args(args)
            report["internode"].append(check_internode.run_on_this_host(internode_plan, **overrides))
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return exit_status(report)


if __name__ == "__main__":
    sys.exit(main())
