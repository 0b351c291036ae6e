"""Low-latency dispatch/combine timing through the public `deep_ep.Buffer(..., low_latency_mode=True)`
(DESIGN section 6 shapes): 128 tokens per rank, hidden 7168, top-8 of 288 experts, FP8 dispatch, BF16
combine; uniform random routing (scores rand, then topk).

Per rank, CUDA events around each call, warm-up first, a group barrier (and a device synchronisation)
before every run, then a GPU sleep (the host enqueues the call meanwhile, so Python's launch overhead is
not timed) and a device-side NVSHMEM barrier (so ranks' launch skew is not timed either; set
DEEP_EP_BENCH_GPU_BARRIER=0 to time with the skew), median and spread over --runs runs. Cases: dispatch,
combine, the combine with its hook called at once (two launches back to back, which the one-launch combine
should not be slower than), dispatch + combine, and with return_recv_hook the send launch and the receive
launch (the hook) timed apart. Each is run on both paths (`allow_nvlink_for_low_latency_mode`: mapped
stores or NVSHMEM puts) with both load kinds. "host us" is the host time inside the call (perf_counter
around it, median over the runs, the slowest rank's); the host-cost benchmark proper is bench_host.py.
With ranks sharing one GPU no NCCL baseline is possible (NCCL refuses two ranks on one device):
nccl_median_us is null there. Writes JSON records to benchmarks/results/ (one object per line) and prints
a table.

With `--backend reference` (a CPU machine: gloo, no CUDA) the same cases run on the reference backend,
timed with host timers, once (no paths or load kinds), without the GPU sleep and barrier.

    python benchmarks/bench_low_latency.py --num-ranks 2 4 [--commit SHA] [--device-name nvidia-h200]
    python benchmarks/bench_low_latency.py --backend reference --runs 20 --experts 16
    python benchmarks/bench_low_latency.py --sweep quick --results-dir /tmp/bench/results

`--tokens` takes several values (a sweep, one Buffer each); `--paths` and `--loads` narrow the combinations;
`--sweep quick` is a preset (explicit options override it). The sweep's progress goes to stderr.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import deep_ep  # noqa: E402
from benchmarks import common  # noqa: E402
from deep_ep.tools.launch import RankPool, visible_gpu_count  # noqa: E402

M, HIDDEN, EXPERTS, TOPK = 128, 7168, 288, 8
# GPU cycles of torch.cuda._sleep queued before each timed call (~150 us on an H100): the host enqueues
# the call while the GPU sleeps, so the events time the kernels, not Python's launch overhead.
SLEEP_CYCLES = 250_000
GPU_BARRIER = os.environ.get("DEEP_EP_BENCH_GPU_BARRIER", "1") == "1"


def _line_up_gpus(line_up: bool) -> None:
    """Queue a GPU sleep (the host enqueues the timed call meanwhile), then a device-side NVSHMEM barrier,
    so every rank's timed kernels start within a few microseconds of each other (CUDA backend only)."""
    if not line_up:
        return
    torch.cuda._sleep(SLEEP_CYCLES)
    if GPU_BARRIER:
        from deep_ep import _C  # noqa: PLC0415 - the compiled extension, CUDA backend only

        _C.low_latency_barrier(torch.cuda.current_stream().cuda_stream)


class _Timer:
    """Times a stretch of the current stream with CUDA events, or with host timers without CUDA."""

    def __init__(self) -> None:
        self.use_events = common.on_gpu()
        if self.use_events:
            self.start_event = torch.cuda.Event(enable_timing=True)
            self.end_event = torch.cuda.Event(enable_timing=True)

    def start(self) -> None:
        if self.use_events:
            self.start_event.record()
        self.host_start = time.perf_counter()

    def stop(self) -> None:
        self.host_us = (time.perf_counter() - self.host_start) * 1e6
        if self.use_events:
            self.end_event.record()

    def elapsed_us(self) -> float:
        """After the device finished the stretch (or right away without CUDA)."""
        if self.use_events:
            return self.start_event.elapsed_time(self.end_event) * 1000.0
        return self.host_us


def _time(group, fn, warmup, runs, line_up):
    """(per-run microseconds of fn() on this rank, per-run host microseconds inside the call)."""
    for _ in range(warmup):
        fn()
    common.synchronize()
    times, host_times = [], []
    for _ in range(runs):
        dist.barrier(group=group)
        common.synchronize()
        timer = _Timer()
        _line_up_gpus(line_up)
        timer.start()
        fn()
        timer.stop()
        common.synchronize()
        times.append(timer.elapsed_us())
        host_times.append(timer.host_us)
    return times, host_times


def _time_hook(group, send, warmup, runs, line_up):
    """((send_us, send_host_us), (recv_us, recv_host_us)) per run: send() returns the hook; the hook launch
    is timed on its own."""
    for _ in range(warmup):
        send()()
    common.synchronize()
    send_times, recv_times, send_host, recv_host = [], [], [], []
    for _ in range(runs):
        dist.barrier(group=group)
        common.synchronize()
        send_timer, recv_timer = _Timer(), _Timer()
        _line_up_gpus(line_up)
        send_timer.start()
        hook = send()
        send_timer.stop()
        # Let every rank's sends land first (what the compute between the two halves is for).
        common.synchronize()
        dist.barrier(group=group)
        _line_up_gpus(line_up)
        recv_timer.start()
        hook()
        recv_timer.stop()
        common.synchronize()
        send_times.append(send_timer.elapsed_us())
        recv_times.append(recv_timer.elapsed_us())
        send_host.append(send_timer.host_us)
        recv_host.append(recv_timer.host_us)
    return (send_times, send_host), (recv_times, recv_host)


def _bench(rank, num_ranks, group, allow_nvlink, conservative_loads, opts):
    device = torch.device("cuda", torch.cuda.current_device()) if common.on_gpu() else torch.device("cpu")
    tokens, hidden, experts, topk = opts["tokens"], opts["hidden"], opts["experts"], opts["topk"]
    warmup, runs = opts["warmup"], opts["runs"]
    g = torch.Generator(device=device).manual_seed(rank)
    x = torch.randn(tokens, hidden, generator=g, device=device).to(torch.bfloat16)
    topk_idx = torch.rand(tokens, experts, generator=g, device=device).topk(topk, dim=1).indices
    topk_weights = torch.rand(tokens, topk, generator=g, device=device)
    size = deep_ep.Buffer.get_low_latency_rdma_size_hint(tokens, hidden, num_ranks, experts)
    buffer = deep_ep.Buffer(
        group,
        num_rdma_bytes=size,
        low_latency_mode=True,
        num_qps_per_rank=max(1, experts // num_ranks),  # as DeepEP V1's tests create it
        allow_nvlink_for_low_latency_mode=allow_nvlink,
        explicitly_destroy=True,
        backend=opts["backend"],
        conservative_loads=conservative_loads,
    )
    backend_name = getattr(buffer, "backend_name", None) or (
        "cuda" if opts["backend"] != "reference" and common.on_gpu() else "reference"
    )
    line_up = backend_name == "cuda"
    try:

        def dispatch(hook_mode=False):
            return buffer.low_latency_dispatch(
                x, topk_idx, tokens, experts, use_fp8=True, return_recv_hook=hook_mode
            )

        (recv_x, _), recv_count, handle, _, _ = dispatch()
        expert_out = torch.randn(recv_x.shape, device=device).to(torch.bfloat16)

        def combine(hook_mode=False):
            return buffer.low_latency_combine(
                expert_out, topk_idx, topk_weights, handle, return_recv_hook=hook_mode
            )

        def both():
            dispatch()
            combine()

        layout_range = handle[1]  # packed_recv_layout_range [L, R]: (begin << 32) | count per source rank
        recv_rows = int(recv_count.sum())
        fp8_row_bytes = hidden + hidden // 128 * 4
        dispatch_bytes = recv_rows * fp8_row_bytes
        sent_pairs = int((topk_idx >= 0).sum())
        combine_bytes = sent_pairs * hidden * 2
        # Remote-only: rows from (dispatch) or to (combine) experts on other ranks.
        local = slice(rank * (experts // num_ranks), (rank + 1) * (experts // num_ranks))
        own_rows = int(((topk_idx >= local.start) & (topk_idx < local.stop)).sum())
        remote_dispatch_rows = recv_rows - int(layout_range[:, rank].bitwise_and(0xFFFFFFFF).sum())
        results = {}
        for name, fn, recv_bytes, remote_bytes in (
            ("dispatch", dispatch, dispatch_bytes, remote_dispatch_rows * fp8_row_bytes),
            ("combine", combine, combine_bytes, (sent_pairs - own_rows) * hidden * 2),
            # The same combine as two launches back to back: the one-launch combine should not be slower.
            ("combine (hook at once)", lambda: combine(True)[-1](), combine_bytes, 0),
            ("dispatch+combine", both, dispatch_bytes + combine_bytes, 0),
        ):
            times, host = _time(group, fn, warmup, runs, line_up)
            results[name] = (times, recv_bytes, remote_bytes, host)
        send, recv = _time_hook(group, lambda: dispatch(True)[-1], warmup, runs, line_up)
        results["dispatch send (hook)"] = (send[0], 0, 0, send[1])
        results["dispatch recv (hook)"] = (recv[0], dispatch_bytes, 0, recv[1])
        send, recv = _time_hook(group, lambda: combine(True)[-1], warmup, runs, line_up)
        results["combine send (hook)"] = (send[0], 0, 0, send[1])
        results["combine recv (hook)"] = (recv[0], combine_bytes, 0, recv[1])
        common.synchronize()
        return {
            "num_blocks": common.low_latency_num_blocks(buffer),
            "loads": getattr(buffer, "load_kind", None),
            "backend": backend_name,
            "results": results,
        }
    finally:
        common.synchronize()
        buffer.destroy()


def _case_name(name: str) -> str:
    known = {"dispatch": "low_latency_dispatch_fp8", "combine": "low_latency_combine_bf16"}
    if name in known:
        return known[name]
    return "low_latency_" + name.replace(" ", "_").replace("(", "").replace(")", "").replace("+", "_")


# `--sweep quick`: latency and GB/s over tokens per rank at 2 and 4 ranks, mapped path, default loads (up to
# the DESIGN shape's 128 tokens, so the first Buffer's NVSHMEM heap holds every later one).
QUICK = dict(
    num_ranks=[2, 4], tokens=[16, 32, 64, 128], paths="mapped", loads="aggressive", warmup=5, runs=20
)
TABLE = [
    ("tokens", "tokens", "{}"),
    ("name", "case", "{}"),
    ("median_us", "median us", "{:.1f}"),
    ("p10_us", "p10", "{:.1f}"),
    ("p90_us", "p90", "{:.1f}"),
    ("recv_gbps", "recv GB/s", "{:.1f}"),
    ("remote_gbps", "remote GB/s", "{:.1f}"),
    ("host_us", "host us", "{:.1f}"),
]


def _rows(per_rank: list[dict], tokens: int) -> list[dict]:
    """One row per case: the slowest rank's median (what the step waits for) and that rank's spread."""
    num_ranks = len(per_rank)
    rows = []
    for name in per_rank[0]["results"]:
        samples = [sorted(r["results"][name][0]) for r in per_rank]
        medians = [statistics.median(s) for s in samples]
        worst = max(range(num_ranks), key=lambda i: medians[i])
        s, median = samples[worst], medians[worst]
        recv_bytes = per_rank[worst]["results"][name][1]
        remote_bytes = per_rank[worst]["results"][name][2]
        rows.append(
            dict(
                tokens=tokens,
                name=name,
                median_us=median,
                p10_us=s[len(s) // 10],
                p90_us=s[(len(s) * 9) // 10],
                recv_gbps=recv_bytes / median / 1e3 if recv_bytes else 0.0,
                remote_gbps=remote_bytes / median / 1e3 if remote_bytes else 0.0,
                host_us=max(statistics.median(r["results"][name][3]) for r in per_rank),
            )
        )
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--num-ranks", "--ranks", dest="num_ranks", type=int, nargs="+", action="extend", default=None
    )
    parser.add_argument("--backend", choices=["cuda", "reference", "auto"], default="cuda")
    parser.add_argument("--tokens", type=int, nargs="+", default=[M], help="tokens per rank (a sweep)")
    parser.add_argument("--hidden", type=int, default=HIDDEN)
    parser.add_argument("--experts", type=int, default=EXPERTS)
    parser.add_argument("--topk", type=int, default=TOPK)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument(
        "--paths", choices=["both", "mapped", "put"], default="both", help="mapped stores, NVSHMEM puts"
    )
    parser.add_argument("--loads", choices=["both", "aggressive", "conservative"], default="both")
    parser.add_argument("--commit", default=None, help="commit in records (default: git / $DEEP_EP_COMMIT)")
    parser.add_argument(
        "--device-name", "--device-kind", dest="device_name", default=os.environ.get("DEEP_EP_DEVICE")
    )
    parser.add_argument("--results-dir", default=common.RESULTS_DIR)
    parser.add_argument(
        "--out", default=None, help="default: <results-dir>/low_latency_<device>_<date>.jsonl"
    )
    return common.parse_args_with_sweep(parser, argv, {"quick": QUICK})


def main(argv=None):
    args = parse_args(argv)
    device = common.device_kind(args.device_name)
    out = args.out or os.path.join(args.results_dir, f"low_latency_{device}_{common.today()}.jsonl")
    opts = dict(
        backend=args.backend,
        hidden=args.hidden,
        experts=args.experts,
        topk=args.topk,
        warmup=args.warmup,
        runs=args.runs,
    )
    gpus = visible_gpu_count()
    # Both load kinds on both paths by default: the conservative fallback's cost is a measured number. The
    # reference backend has neither.
    paths = {"both": (True, False), "mapped": (True,), "put": (False,)}[args.paths]
    loads = {"both": (False, True), "aggressive": (False,), "conservative": (True,)}[args.loads]
    combos = [(True, None)] if args.backend == "reference" else list(itertools.product(paths, loads))
    records = []
    for num_ranks in args.num_ranks or [2]:
        with RankPool(num_ranks, timeout_s=900) as pool:
            for allow_nvlink, conservative in combos:
                progress = common.Progress(len(args.tokens), f"low-latency, {num_ranks} ranks")
                rows, setups = [], []
                for tokens in args.tokens:
                    per_rank = pool.run(_bench, allow_nvlink, conservative, {**opts, "tokens": tokens})
                    rows += _rows(per_rank, tokens)
                    setups += [per_rank[0]] * len(per_rank[0]["results"])
                    progress.update()
                progress.close()
                setup = setups[0]
                path = "n/a" if setup["backend"] == "reference" else ("mapped" if allow_nvlink else "put")
                load_kind = setup["loads"] or ("conservative" if conservative else "aggressive")
                blocks = setup["num_blocks"]
                print(f"\n{num_ranks} ranks on {min(gpus, num_ranks)} GPU(s), {setup['backend']} backend, "
                      f"{path} path, {load_kind} loads, {'?' if blocks is None else blocks} blocks per rank")  # fmt: skip
                common.print_table(rows, TABLE)
                for row, row_setup in zip(rows, setups):
                    record = common.record(
                        device,
                        num_ranks,
                        min(gpus, num_ranks),
                        _case_name(row["name"]),
                        num_sms=row_setup["num_blocks"],
                        tokens=row["tokens"],
                        hidden=args.hidden,
                        topk=args.topk,
                        experts=args.experts,
                        loads=load_kind,
                        path=path,
                        median_us=round(row["median_us"], 2),
                        p10_us=round(row["p10_us"], 2),
                        p90_us=round(row["p90_us"], 2),
                        recv_gbps=round(row["recv_gbps"], 2),
                        remote_gbps=round(row["remote_gbps"], 2),
                        nccl_median_us=None,
                        host_us=round(row["host_us"], 2),
                        gpu_barrier=GPU_BARRIER and setup["backend"] == "cuda",
                        backend=setup["backend"],
                    )
                    if args.commit:
                        record["commit"] = args.commit
                    records.append(record)
    common.append_records(records, out)
    print(f"\nwrote {len(records)} records to {out}")


if __name__ == "__main__":
    main()
