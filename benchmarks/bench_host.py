"""Host cost of each call: how long Python waits inside one public `deep_ep.Buffer` call, and how long one
iteration takes when the calls run back to back (DESIGN section 7, "Host cost per call").

Cases (record names):
  host_layout           get_dispatch_layout
  host_dispatch_cached  dispatch(x, handle=...)
  host_combine          combine(recv_x, handle)
  host_dispatch_fresh   dispatch with the layout tensors and top-k; the GPU is idle when the call starts
                        (synchronised before each call), so the wait for the receive counts is counted
  host_layer_roundtrip  layout + fresh dispatch + combine, the three calls' host times summed per iteration
                        (GPU idle when the iteration starts)
  host_ll_dispatch      low_latency_dispatch (FP8)
  host_ll_combine       low_latency_combine (BF16)
  ll_eager_roundtrip    low_latency_dispatch + low_latency_combine, no hooks; host times summed

With `--modes floor` (not run by default) the same protocol times the pieces a call is built from, so that
a case's host time can be read against this machine's floor:
  floor_empty           torch.empty of 1 MiB on the GPU (one caching-allocator allocation)
  floor_add             t.add_(1) on 1 MiB (one PyTorch kernel op: dispatcher + one launch)
  floor_current_stream  torch.cuda.current_stream()
  floor_event_record    torch.cuda.Event().record() (an event created and recorded)
  floor_binding_launch  torch.cuda.current_stream(), then deep_ep._C.testing.ptx_probe on it: one binding
                        call that checks three tensors and launches one 1-thread kernel (what every op pays
                        at least once; floor_current_stream is the first part)

host_us: perf_counter around the call (nothing else in the timed region; the previous call's outputs are
freed outside it), median over --calls calls on each rank, then the slowest rank's median; p10 / p90 are
that rank's spread over its calls. Before each call the device is synchronised and, except for the fresh
dispatch and the layer round trip, a GPU sleep of --gpu-lead-cycles is queued, so the GPU is busy while the
host works: a call that synchronises with the GPU shows up as the sleep in its host time, and no launch
waits for a full queue. iter_us: wall time per iteration of --iters back-to-back iterations (device
synchronised only before and after them), the slowest rank's.

Ranks run every case in the same order (the calls are collectives: each rank's time includes what it waits
for the others); the per-rank numbers are gathered with all_gather_object at the end.

Shapes (DESIGN section 6, decode-sized): 128 tokens per rank, hidden 7168; normal top-8 of 256 experts,
low-latency top-8 of 288 experts, FP8 dispatch, BF16 combine; uniform routing (scores rand, then topk).
Default configs, as a user calling the public API gets them. DeepEP V1's numbers (DESIGN section 6,
2 ranks sharing one H200) and this project's targets are printed beside ours; benchmarks never assert.
Kernel times and bandwidth of the normal (`intranode_*`) cases are bench_intranode.py's job, low-latency
ones bench_low_latency.py's.

    python benchmarks/bench_host.py --num-ranks 2 4
    python benchmarks/bench_host.py --backend reference --calls 100   # CPU machine (gloo, host timers)
    python -m deep_ep.bench host --num-ranks 2
    python -m deep_ep.bench host --sweep quick --results-dir /tmp/bench/results

`--sweep quick` is a preset (explicit options override it); rank 0 shows the progress over cases on stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from functools import partial

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import deep_ep  # noqa: E402
from benchmarks import common  # noqa: E402
from deep_ep.config import nvl_buffer_size_hint  # noqa: E402
from deep_ep.tools.launch import RankPool, visible_gpu_count  # noqa: E402

NORMAL_CASES = (
    "host_layout",
    "host_dispatch_cached",
    "host_combine",
    "host_dispatch_fresh",
    "host_layer_roundtrip",
)
LOW_LATENCY_CASES = ("host_ll_dispatch", "host_ll_combine", "ll_eager_roundtrip")
FLOOR_CASES = (
    "floor_empty",
    "floor_add",
    "floor_current_stream",
    "floor_event_record",
    "floor_binding_launch",
)
CASES = NORMAL_CASES + LOW_LATENCY_CASES + FLOOR_CASES
# Cases whose calls start with the GPU idle (no sleep queued ahead): the fresh dispatch waits for the
# receive counts, which would otherwise sit behind the sleep.
GPU_IDLE_CASES = ("host_dispatch_fresh", "host_layer_roundtrip")
# DESIGN section 6: DeepEP v1.2.1, 2 ranks sharing one H200, 128 tokens, median host time inside the call.
DEEPEP_V1_HOST_US = {
    "host_layout": 20.6,
    "host_dispatch_fresh": 70.0,
    "host_dispatch_cached": 43.0,
    "host_combine": 37.0,
    "host_layer_roundtrip": 135.0,
}
TARGET_HOST_US = {
    "host_layout": 10.0,
    "host_dispatch_cached": 20.0,
    "host_combine": 18.0,
    "host_dispatch_fresh": 45.0,
    "host_layer_roundtrip": 70.0,
    "host_ll_dispatch": 15.0,
    "host_ll_combine": 15.0,
}
TARGET_ITER_US = {"ll_eager_roundtrip": 80.0}


def _timed(fn, *args, **kwargs):
    """(result, host microseconds of the call). The result is returned, not stored, so the previous call's
    outputs are freed by the caller outside the timed region."""
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, (time.perf_counter() - start) * 1e6


def _host_us_of(fn):
    """A step that calls `fn` once and returns its host microseconds."""
    return lambda: _timed(fn)[1]


def _measure(group, step, opts: dict, progress, *, gpu_idle: bool) -> dict:
    """Per-call host times of `step` (it returns the host microseconds of one iteration) and the wall time
    per iteration of back-to-back iterations, on this rank."""

    def one_call() -> float:
        common.synchronize()
        if not gpu_idle:
            common.gpu_sleep(opts["gpu_lead_cycles"])
        return step()

    for _ in range(opts["warmup"]):
        one_call()
    common.synchronize()
    dist.barrier(group=group)
    host_us = [one_call() for _ in range(opts["calls"])]
    common.synchronize()
    dist.barrier(group=group)
    start = time.perf_counter()
    for _ in range(opts["iters"]):
        step()
    common.synchronize()
    iter_us = (time.perf_counter() - start) / opts["iters"] * 1e6
    dist.barrier(group=group)  # the next case starts with the ranks together
    progress.update()
    stats = common.summarize(host_us)
    return {
        "host_us": stats["median_us"],
        "host_p10_us": stats["p10_us"],
        "host_p90_us": stats["p90_us"],
        "iter_us": iter_us,
    }


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if common.on_gpu() else torch.device("cpu")


def _buffer_facts(buffer) -> dict:
    return {"loads": getattr(buffer, "load_kind", None), "backend": getattr(buffer, "backend_name", None)}


def _normal_cases(rank, num_ranks, group, opts, progress) -> tuple[dict, dict]:
    device = _device()
    tokens, hidden, experts, topk = opts["tokens"], opts["hidden"], opts["experts"], opts["topk"]
    x = common.random_bf16(tokens, hidden, 100 + rank, device)
    topk_idx = common.uniform_routing(tokens, experts, topk, 200 + rank, device)
    topk_weights = torch.rand(tokens, topk, device=device)
    size = nvl_buffer_size_hint(hidden * 2, num_ranks, num_max_tokens_per_rank=tokens)
    buffer = deep_ep.Buffer(group, num_nvl_bytes=size, backend=opts["backend"], explicitly_destroy=True)
    try:

        def fresh_dispatch_args(layout) -> dict:
            per_rank, per_rdma_rank, per_expert, in_rank, _ = layout
            return dict(
                num_tokens_per_rank=per_rank,
                num_tokens_per_rdma_rank=per_rdma_rank,
                is_token_in_rank=in_rank,
                num_tokens_per_expert=per_expert,
                topk_idx=topk_idx,
                topk_weights=topk_weights,
            )

        fresh_args = fresh_dispatch_args(buffer.get_dispatch_layout(topk_idx, experts))
        recv_x, _, _, _, handle, _ = buffer.dispatch(x, **fresh_args)

        def layer_roundtrip() -> float:
            new_layout, layout_us = _timed(buffer.get_dispatch_layout, topk_idx, experts)
            dispatched, dispatch_us = _timed(buffer.dispatch, x, **fresh_dispatch_args(new_layout))
            _, combine_us = _timed(buffer.combine, dispatched[0], dispatched[4])
            return layout_us + dispatch_us + combine_us

        steps = {
            "host_layout": _host_us_of(partial(buffer.get_dispatch_layout, topk_idx, experts)),
            "host_dispatch_cached": _host_us_of(partial(buffer.dispatch, x, handle=handle)),
            "host_combine": _host_us_of(partial(buffer.combine, recv_x, handle)),
            "host_dispatch_fresh": _host_us_of(partial(buffer.dispatch, x, **fresh_args)),
            "host_layer_roundtrip": layer_roundtrip,
        }
        results = {
            case: _measure(group, step, opts, progress, gpu_idle=case in GPU_IDLE_CASES)
            for case, step in steps.items()
        }
        common.synchronize()
        setup = {"num_sms": deep_ep.Buffer.num_sms, **_buffer_facts(buffer)}
        return results, setup
    finally:
        common.synchronize()
        buffer.destroy()


def _low_latency_cases(rank, num_ranks, group, opts, progress) -> tuple[dict, dict]:
    device = _device()
    tokens, hidden, experts, topk = opts["tokens"], opts["hidden"], opts["ll_experts"], opts["topk"]
    x = common.random_bf16(tokens, hidden, 300 + rank, device)
    topk_idx = common.uniform_routing(tokens, experts, topk, 400 + rank, device)
    topk_weights = torch.rand(tokens, topk, device=device)
    size = deep_ep.Buffer.get_low_latency_rdma_size_hint(tokens, hidden, num_ranks, experts)
    buffer = deep_ep.Buffer(
        group,
        num_rdma_bytes=size,
        low_latency_mode=True,
        num_qps_per_rank=max(1, experts // num_ranks),  # as DeepEP V1's tests create it
        backend=opts["backend"],
        explicitly_destroy=True,
    )
    try:
        dispatch = partial(buffer.low_latency_dispatch, x, topk_idx, tokens, experts, use_fp8=True)
        (recv_x, _), _, handle, _, _ = dispatch()
        # What the experts would return: one BF16 row per received row.
        expert_out = torch.randn(recv_x.shape, dtype=torch.bfloat16, device=device)

        def eager_roundtrip() -> float:
            dispatched, dispatch_us = _timed(dispatch)
            _, combine_us = _timed(
                buffer.low_latency_combine, expert_out, topk_idx, topk_weights, dispatched[2]
            )
            return dispatch_us + combine_us

        steps = {
            "host_ll_dispatch": _host_us_of(dispatch),
            "host_ll_combine": _host_us_of(
                partial(buffer.low_latency_combine, expert_out, topk_idx, topk_weights, handle)
            ),
            "ll_eager_roundtrip": eager_roundtrip,
        }
        results = {
            case: _measure(group, step, opts, progress, gpu_idle=False) for case, step in steps.items()
        }
        common.synchronize()
        setup = {"num_sms": common.low_latency_num_blocks(buffer), **_buffer_facts(buffer)}
        return results, setup
    finally:
        common.synchronize()
        buffer.destroy()


def _floor_cases(rank, num_ranks, group, opts, progress) -> tuple[dict, dict]:
    """The primitives' host cost in the cases' protocol (GPU busy with a sleep, device synchronised before
    each call), on every rank at once as the cases run."""
    device = _device()
    if device.type != "cuda":
        return {}, {"num_sms": None, "loads": None, "backend": opts["backend"]}
    from deep_ep import _C  # noqa: PLC0415 - only with the extension

    t = torch.zeros(1 << 18, dtype=torch.int32, device=device)
    probe = [
        torch.zeros(n, dtype=torch.int32, device=device)
        for n in (_C.testing.ptx_probe_inputs, _C.testing.ptx_probe_scratch, _C.testing.ptx_probe_outputs)
    ]

    def binding_launch() -> None:
        _C.testing.ptx_probe(*probe, torch.cuda.current_stream(device).cuda_stream)

    steps = {
        "floor_empty": _host_us_of(partial(torch.empty, 1 << 20, dtype=torch.uint8, device=device)),
        "floor_add": _host_us_of(partial(t.add_, 1)),
        "floor_current_stream": _host_us_of(partial(torch.cuda.current_stream, device)),
        "floor_event_record": _host_us_of(lambda: torch.cuda.Event().record()),
        "floor_binding_launch": _host_us_of(binding_launch),
    }
    results = {case: _measure(group, step, opts, progress, gpu_idle=False) for case, step in steps.items()}
    common.synchronize()
    return results, {"num_sms": None, "loads": None, "backend": "cuda"}


def _bench_rank(rank, num_ranks, group, opts):
    measured, setups = {}, {}
    num_cases = {
        "normal": len(NORMAL_CASES),
        "low-latency": len(LOW_LATENCY_CASES),
        "floor": len(FLOOR_CASES) if common.on_gpu() else 0,  # the primitives are CUDA ones
    }
    progress = common.Progress(
        sum(num_cases[mode] for mode in opts["modes"]), f"host, {num_ranks} ranks", enabled=rank == 0
    )
    if "normal" in opts["modes"]:
        results, setups["normal"] = _normal_cases(rank, num_ranks, group, opts, progress)
        measured.update(results)
    if "low-latency" in opts["modes"]:
        results, setups["low-latency"] = _low_latency_cases(rank, num_ranks, group, opts, progress)
        measured.update(results)
    if "floor" in opts["modes"]:
        results, setups["floor"] = _floor_cases(rank, num_ranks, group, opts, progress)
        measured.update(results)
    progress.close()
    per_rank: list = [None] * num_ranks
    dist.all_gather_object(per_rank, measured, group=group)
    return {"rows": _reduce(per_rank), "setups": setups, "gpus": min(num_ranks, visible_gpu_count())}


def _reduce(per_rank: list[dict]) -> list[dict]:
    """One row per case: the slowest rank's median host time (and that rank's p10 / p90), the slowest
    rank's time per iteration."""
    rows = []
    for case in CASES:
        if case not in per_rank[0]:
            continue
        items = [r[case] for r in per_rank]
        slowest = max(items, key=lambda r: r["host_us"])
        rows.append(
            dict(
                case=case,
                host_us=slowest["host_us"],
                host_p10_us=slowest["host_p10_us"],
                host_p90_us=slowest["host_p90_us"],
                host_us_per_rank=[r["host_us"] for r in items],
                iter_us=max(r["iter_us"] for r in items),
                iter_us_per_rank=[r["iter_us"] for r in items],
            )
        )
    return rows


def _meets(row: dict) -> str:
    """'yes' / 'no' against the case's target (host_us, or iter_us where the target is on that)."""
    verdicts = []
    if row["case"] in TARGET_HOST_US:
        verdicts.append(row["host_us"] <= TARGET_HOST_US[row["case"]])
    if row["case"] in TARGET_ITER_US:
        verdicts.append(row["iter_us"] <= TARGET_ITER_US[row["case"]])
    return "-" if not verdicts else ("yes" if all(verdicts) else "no")


# `--sweep quick`: 2 and 4 ranks, the fewest calls the medians take (~20 s of one GPU).
QUICK = dict(num_ranks=[2, 4], calls=100, iters=50, warmup=5)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num-ranks", type=int, nargs="+", default=[2])
    parser.add_argument("--tokens", type=int, default=128, help="tokens per rank (both modes)")
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--experts", type=int, default=256, help="experts of the normal-mode cases")
    parser.add_argument("--ll-experts", type=int, default=288, help="experts of the low-latency cases")
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--backend", choices=["cuda", "reference", "auto"], default="cuda")
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=["normal", "low-latency", "floor"],
        default=["normal", "low-latency"],
        help="floor: the primitives a call is built from (torch.empty, one PyTorch op, one launch, ...)",
    )
    parser.add_argument("--calls", type=int, default=200, help="timed calls per case (at least 100)")
    parser.add_argument("--iters", type=int, default=100, help="back-to-back iterations for iter_us")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument(
        "--gpu-lead-cycles",
        type=int,
        default=common.LAUNCH_COVER_CYCLES,
        help="GPU sleep queued before each timed call of the cases that do not start with the GPU idle "
        "(0: none)",
    )
    parser.add_argument("--device-kind", default=None, help="name in records (default: detected)")
    parser.add_argument("--results-dir", "--out-dir", dest="out_dir", default=common.RESULTS_DIR)
    return common.parse_args_with_sweep(parser, argv, {"quick": QUICK})


def main(argv=None) -> None:
    args = parse_args(argv)
    opts = dict(
        tokens=args.tokens,
        hidden=args.hidden,
        experts=args.experts,
        ll_experts=args.ll_experts,
        topk=args.topk,
        backend=args.backend,
        modes=args.modes,
        calls=max(100, args.calls),
        iters=args.iters,
        warmup=args.warmup,
        gpu_lead_cycles=args.gpu_lead_cycles,
    )
    device = common.device_kind(args.device_kind)
    path = os.path.join(args.out_dir, f"host_{device}_{common.today()}.jsonl")
    for num_ranks in args.num_ranks:
        with RankPool(num_ranks, timeout_s=900) as pool:
            out = pool.run(_bench_rank, opts)[0]  # every rank returns the same reduced rows
        rows, gpus = out["rows"], out["gpus"]
        for r in rows:
            r["ranks"] = " / ".join(f"{v:.1f}" for v in r["host_us_per_rank"])
            r["v1_host_us"] = DEEPEP_V1_HOST_US.get(r["case"])
            r["target_host_us"] = TARGET_HOST_US.get(r["case"])
            r["target_iter_us"] = TARGET_ITER_US.get(r["case"])
            r["meets"] = _meets(r)
        print(
            f"\n== host cost per call, {num_ranks} ranks on {gpus} GPU(s) ({device}, {args.backend} backend), "
            f"{args.tokens} tokens/rank, hidden {args.hidden}, top-{args.topk} of {args.experts} (normal) / "
            f"{args.ll_experts} (low-latency), {opts['calls']} calls, {args.iters} iterations =="
        )
        common.print_table(
            rows,
            [
                ("case", "case", "{}"),
                ("host_us", "host us", "{:.1f}"),
                ("host_p10_us", "p10", "{:.1f}"),
                ("host_p90_us", "p90", "{:.1f}"),
                ("ranks", "each rank's median", "{}"),
                ("v1_host_us", "V1 host us", "{:.1f}"),
                ("target_host_us", "target host us", "{:.0f}"),
                ("iter_us", "iter us", "{:.1f}"),
                ("target_iter_us", "target iter us", "{:.0f}"),
                ("meets", "meets target", "{}"),
            ],
        )
        print(
            "host us: the slowest rank's median over its calls (p10 / p90: that rank's spread over its calls);\n"
            "iter us: the slowest rank's wall time per back-to-back iteration. V1 (DeepEP v1.2.1) and the\n"
            "targets are for 2 ranks sharing one H200. Kernel times: bench_intranode.py, bench_low_latency.py."
        )
        records = []
        for r in rows:
            mode = (
                "normal"
                if r["case"] in NORMAL_CASES
                else "floor"
                if r["case"] in FLOOR_CASES
                else "low-latency"
            )
            setup = out["setups"][mode]
            idle = r["case"] in GPU_IDLE_CASES
            records.append(
                common.record(
                    device,
                    num_ranks,
                    gpus,
                    r["case"],
                    num_sms=setup["num_sms"],
                    tokens=args.tokens,
                    hidden=args.hidden,
                    topk=args.topk,
                    experts=args.experts if mode == "normal" else args.ll_experts,
                    loads=setup["loads"],
                    median_us=None,  # kernel time: not measured here
                    recv_gbps=None,
                    nccl_median_us=None,
                    host_us=round(r["host_us"], 2),
                    iter_us=round(r["iter_us"], 2),
                    host_p10_us=round(r["host_p10_us"], 2),
                    host_p90_us=round(r["host_p90_us"], 2),
                    host_us_per_rank=[round(v, 2) for v in r["host_us_per_rank"]],
                    iter_us_per_rank=[round(v, 2) for v in r["iter_us_per_rank"]],
                    backend=setup["backend"] or args.backend,
                    calls=opts["calls"],
                    iters=args.iters,
                    gpu_lead_cycles=0 if idle or not common.on_gpu() else args.gpu_lead_cycles,
                )
            )
        print(f"records appended to {common.append_records(records, path)}")


if __name__ == "__main__":
    main()
