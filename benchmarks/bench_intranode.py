"""Intra-node normal dispatch/combine: time, bandwidth, SM and tokens-per-rank sweeps, both load kinds, direct
and staged reads of peers' rows, NCCL in the same run.

Shapes (DESIGN section 6): 4096 tokens per rank, hidden 7168, top-8 of 256 experts, uniform routing; BF16 and
FP8 dispatch (fresh, i.e. with the count exchange and its CPU sync), BF16 cached dispatch (through the
handle, no CPU sync), BF16 combine. Each configuration: warm-up, then the median of `--runs` runs timed
with CUDA events, a group barrier before each. A configuration's time is the slowest rank's median.

GB/s: bytes the rank receives (its own share included) over time, as DeepEP reports it (dispatch: rows
received x row bytes, FP8 rows counted with their scales; combine: the same rows sent back in BF16),
averaged over ranks. The remote-only bytes are reported too; their fraction of the NVLink ceiling (478 GB/s
per direction per GPU) only means something when every rank has its own GPU.

With `--backend reference` (a CPU machine: gloo, no CUDA) the cases run on the reference backend, timed
with host timers, once (no load kinds, read modes, GPU-aligned pass or copy reference).

    python benchmarks/bench_intranode.py --num-ranks 2 4
    python -m deep_ep.bench intranode --num-ranks 2
    python benchmarks/bench_intranode.py --backend reference --tokens 256 --sms 24 --runs 20
    python benchmarks/bench_intranode.py --sweep quick --results-dir /tmp/bench/results

`--tokens` and `--sms` take several values (every combination is measured); `--sweep quick` is a preset of
both sweeps at 2 and 4 ranks (explicit options override it). Rank 0 shows the sweep's progress on stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
from functools import partial

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import deep_ep  # noqa: E402
from benchmarks import common  # noqa: E402
from deep_ep.config import Config, nvl_buffer_size_hint  # noqa: E402
from deep_ep.tools.launch import RankPool, visible_gpu_count  # noqa: E402

NVLINK_CEILING_GBPS = 478.0
CASES = (
    "intranode_dispatch_bf16",
    "intranode_dispatch_fp8",
    "intranode_cached_dispatch_bf16",
    "intranode_combine_bf16",
)


def _bench_rank(rank, num_ranks, group, opts):
    num_gpus = min(num_ranks, visible_gpu_count())
    own_gpus = num_gpus >= num_ranks
    with_nccl = own_gpus and torch.distributed.get_backend(group) == "nccl"
    # Progress steps: one per measured case; configurations skipped (SMs over the cap, no read modes on the
    # reference backend) are counted when their block ends.
    per_loads = len(opts["reads"]) * len(opts["sms"]) * len(CASES)
    per_tokens = len(opts["conservative"]) * per_loads + (2 if with_nccl else 0)
    progress = common.Progress(
        len(opts["tokens"]) * per_tokens, f"intranode, {num_ranks} ranks", enabled=rank == 0
    )
    results, nccl = [], {}
    for i, tokens in enumerate(opts["tokens"]):
        step = i * per_tokens
        for j, conservative in enumerate(opts["conservative"]):
            results += _bench_buffer(rank, num_ranks, group, opts, tokens, conservative, j == 0, progress)
            progress.advance_to(step + (j + 1) * per_loads)
        if with_nccl:
            nccl.update(_bench_nccl(rank, num_ranks, group, opts, tokens, progress))
    progress.close()
    return {"results": results, "nccl": nccl, "gpus": num_gpus}


def _inputs(rank, opts, tokens):
    device = torch.device("cuda", torch.cuda.current_device()) if common.on_gpu() else torch.device("cpu")
    x = common.random_bf16(tokens, opts["hidden"], 100 + rank, device)
    topk_idx = common.uniform_routing(tokens, opts["experts"], opts["topk"], 200 + rank, device)
    topk_weights = torch.rand(tokens, opts["topk"], device=device)
    return device, x, topk_idx, topk_weights


def _bench_buffer(rank, num_ranks, group, opts, tokens, conservative, with_copy_reference, progress):
    """Every (reads, SMs, case) of one Buffer (one load kind) at `tokens` tokens per rank."""
    hidden, experts = opts["hidden"], opts["experts"]
    device, x, topk_idx, topk_weights = _inputs(rank, opts, tokens)
    x_fp8 = common.per_token_cast_to_fp8(x)
    size = nvl_buffer_size_hint(hidden * 2, num_ranks, num_max_tokens_per_rank=tokens)
    results = []
    buffer = deep_ep.Buffer(
        group,
        num_nvl_bytes=size,
        backend=opts["backend"],
        conservative_loads=conservative,
        explicitly_destroy=True,
    )
    loads = buffer.load_kind
    runtime = buffer.runtime
    # CUDA backend only: a group barrier on the GPU (lines the ranks up), the SM share of a rank.
    device_barrier = getattr(runtime, "barrier_on_current_stream", None) if common.on_gpu() else None
    sm_cap = getattr(runtime, "sm_cap", None)
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, experts)
    layout = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
    layout.update(topk_idx=topk_idx, topk_weights=topk_weights)
    recv_x, _, _, _, handle, _ = buffer.dispatch(x, **layout)
    prefix = handle.rank_prefix_matrix.cpu()
    rows = int(prefix[-1][rank])
    local_rows = int(prefix[rank][rank]) - (int(prefix[rank - 1][rank]) if rank > 0 else 0)
    bf16_row, fp8_row = hidden * 2, hidden + hidden // 128 * 4
    combine_x = recv_x.clone()
    reads_modes = opts["reads"] if hasattr(runtime, "direct_reads") else ["n/a"]
    for reads, sms in [(r, n) for r in reads_modes for n in opts["sms"]]:
        if sm_cap is not None and sms > sm_cap:
            continue  # more SMs than this rank may take while it shares the GPU
        if reads != "n/a":
            runtime.direct_reads = reads == "direct"
        config = Config(sms, 8, 256)
        fns = {
            "intranode_dispatch_bf16": (partial(buffer.dispatch, x, config=config, **layout), bf16_row),
            "intranode_dispatch_fp8": (partial(buffer.dispatch, x_fp8, config=config, **layout), fp8_row),
            "intranode_cached_dispatch_bf16": (
                partial(buffer.dispatch, x, handle=handle, config=config),
                bf16_row,
            ),
            "intranode_combine_bf16": (
                partial(buffer.combine, combine_x, handle, config=config),
                bf16_row,
            ),
        }
        for case, (fn, row_bytes) in fns.items():
            host = []  # host time inside the call: of the GPU-aligned runs where there are some
            times = common.time_op(group, fn, warmup=opts["warmup"], runs=opts["runs"], host_times=host)
            stats = common.summarize(times)
            stats["aligned_median_us"] = None
            if device_barrier is not None:
                host = []
                aligned = common.time_op(
                    group, fn, warmup=1, runs=opts["runs"], device_barrier=device_barrier, host_times=host
                )
                stats["aligned_median_us"] = common.summarize(aligned)["median_us"]
            stats["host_call_us"] = common.summarize(host)["median_us"]
            results.append(
                dict(
                    case=case,
                    loads=loads,
                    reads=reads,
                    num_sms=sms,
                    tokens=tokens,
                    rank=rank,
                    recv_bytes=rows * row_bytes,
                    remote_bytes=(rows - local_rows) * row_bytes,
                    **stats,
                )
            )
            progress.update()
    if with_copy_reference and device_barrier is not None:
        # What the same bytes cost as one plain device copy per rank, all SMs, ranks lined up on the GPU:
        # the stage (own tokens) plus the pull (received rows) of a BF16 dispatch.
        copy_bytes = (tokens + rows) * bf16_row
        src = torch.empty(copy_bytes, dtype=torch.uint8, device=device).fill_(1)
        dst = torch.empty_like(src)
        copy = common.time_op(
            group,
            partial(dst.copy_, src),
            warmup=2,
            runs=opts["runs"],
            device_barrier=device_barrier,
        )
        copy_us = common.summarize(copy)["median_us"]
        results.append(
            dict(case="hbm_copy_reference", rank=rank, tokens=tokens, copy_us=copy_us, copy_bytes=copy_bytes)
        )
        del src, dst
    buffer.destroy()
    return results


def _bench_nccl(rank, num_ranks, group, opts, tokens, progress) -> dict:
    """{(case, tokens): the NCCL baseline's median us} for the BF16 dispatch and the combine."""
    _, x, topk_idx, _ = _inputs(rank, opts, tokens)
    baseline = common.NcclAllToAll(group, topk_idx, opts["experts"], num_ranks)
    recv = baseline.dispatch(x)
    nccl = {}
    for case, fn in (
        ("intranode_dispatch_bf16", lambda: baseline.dispatch(x)),
        ("intranode_combine_bf16", lambda: baseline.combine(recv, tokens)),
    ):
        times = common.time_op(group, fn, warmup=opts["warmup"], runs=opts["runs"])
        nccl[(case, tokens)] = common.summarize(times)["median_us"]
        progress.update()
    return nccl


def _aggregate(per_rank: list[dict], num_ranks: int) -> list[dict]:
    """One row per (case, loads, reads, tokens, SMs): the slowest rank's median and spread; GB/s averaged over
    ranks."""
    groups: dict = {}
    for rank_out in per_rank:
        for r in rank_out["results"]:
            if r["case"] == "hbm_copy_reference":
                continue
            groups.setdefault((r["case"], r["loads"], r["reads"], r["tokens"], r["num_sms"]), []).append(r)
    nccl = per_rank[0]["nccl"]
    rows = []
    for (case, loads, reads, tokens, sms), items in groups.items():
        slowest = max(items, key=lambda r: r["median_us"])
        recv_gbps = sum(r["recv_bytes"] / r["median_us"] / 1e3 for r in items) / len(items)
        remote_gbps = sum(r["remote_bytes"] / r["median_us"] / 1e3 for r in items) / len(items)
        rows.append(
            dict(
                case=case,
                loads=loads,
                reads=reads,
                tokens=tokens,
                num_sms=sms,
                median_us=slowest["median_us"],
                aligned_median_us=None
                if any(r["aligned_median_us"] is None for r in items)
                else max(r["aligned_median_us"] for r in items),
                host_call_us=max(r["host_call_us"] for r in items),
                p10_us=slowest["p10_us"],
                p90_us=slowest["p90_us"],
                recv_gbps=recv_gbps,
                remote_gbps=remote_gbps,
                nccl_median_us=nccl.get((case, tokens)),
            )
        )
    rows.sort(key=lambda r: (CASES.index(r["case"]), r["loads"], r["reads"], r["tokens"], r["num_sms"]))
    return rows


# `--sweep quick`: GB/s over SMs x tokens per rank at 2 and 4 ranks, default loads and reads (~1 minute of
# one GPU shared by the ranks, most of it process and Buffer start-up).
QUICK = dict(
    num_ranks=[2, 4],
    sms=[8, 16, 24, 32, 48],
    tokens=[512, 1024, 2048, 4096],
    loads="aggressive",
    reads="direct",
    warmup=3,
    runs=20,
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num-ranks", type=int, nargs="+", default=[2])
    parser.add_argument("--sms", type=int, nargs="+", default=[8, 12, 16, 24])
    parser.add_argument("--loads", choices=["both", "aggressive", "conservative"], default="both")
    parser.add_argument(
        "--reads", choices=["both", "direct", "staged"], default="both", help="peer rows: direct or staged"
    )
    parser.add_argument("--backend", choices=["cuda", "reference", "auto"], default="cuda")
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096], help="tokens per rank (a sweep)")
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--device-kind", default=os.environ.get("DEEP_EP_DEVICE_KIND"))
    parser.add_argument("--results-dir", default=common.RESULTS_DIR)
    return common.parse_args_with_sweep(parser, argv, {"quick": QUICK})


def main(argv=None) -> None:
    args = parse_args(argv)
    conservative = {"both": [False, True], "aggressive": [False], "conservative": [True]}[args.loads]
    if args.backend == "reference":
        conservative = [None]  # the reference has no peer loads
    opts = dict(
        tokens=args.tokens,
        hidden=args.hidden,
        experts=args.experts,
        topk=args.topk,
        warmup=args.warmup,
        runs=max(20, args.runs),
        backend=args.backend,
        sms=args.sms,
        conservative=conservative,
        reads=["direct", "staged"] if args.reads == "both" else [args.reads],
    )
    device = common.device_kind(args.device_kind)
    tokens_text = "/".join(str(t) for t in args.tokens)
    for num_ranks in args.num_ranks:
        with RankPool(num_ranks, timeout_s=900) as pool:
            per_rank = pool.run(_bench_rank, opts)
        gpus = per_rank[0]["gpus"]
        rows = _aggregate(per_rank, num_ranks)
        shared = gpus < num_ranks
        why_not = "n/a (no GPU)" if gpus == 0 else "n/a (shared GPU)"
        for r in rows:
            r["link_fraction"] = why_not if shared else f"{r['remote_gbps'] / NVLINK_CEILING_GBPS:.0%}"
            if r["nccl_median_us"] is None:
                r["nccl"] = ("n/a (no GPU)" if gpus == 0 else "n/a (ranks share a GPU)") if shared else "n/a"
            else:
                r["nccl"] = f"{r['nccl_median_us']:.0f}"
        print(
            f"\n== intra-node, {num_ranks} ranks on {gpus} GPU(s) ({device}), {tokens_text} tokens/rank, "
            f"hidden {args.hidden}, top-{args.topk} of {args.experts} =="
        )
        common.print_table(
            rows,
            [
                ("case", "case", "{}"),
                ("loads", "loads", "{}"),
                ("reads", "reads", "{}"),
                ("tokens", "tokens", "{}"),
                ("num_sms", "SMs", "{}"),
                ("median_us", "median us", "{:.1f}"),
                ("aligned_median_us", "GPU-aligned us", "{:.1f}"),
                ("host_call_us", "host call us", "{:.0f}"),
                ("p10_us", "p10", "{:.1f}"),
                ("p90_us", "p90", "{:.1f}"),
                ("recv_gbps", "recv GB/s", "{:.0f}"),
                ("remote_gbps", "remote GB/s", "{:.0f}"),
                ("link_fraction", "of NVLink", "{}"),
                ("nccl", "NCCL us", "{}"),
            ],
        )
        records = [
            common.record(
                device,
                num_ranks,
                gpus,
                r["case"],
                num_sms=r["num_sms"],
                tokens=r["tokens"],
                hidden=args.hidden,
                topk=args.topk,
                experts=args.experts,
                loads=r["loads"],
                reads=r["reads"],
                **common.timing_fields(r),
                recv_gbps=round(r["recv_gbps"], 1),
                remote_gbps=round(r["remote_gbps"], 1),
                nccl_median_us=common.rounded(r["nccl_median_us"], 2),
            )
            for r in rows
        ]
        copies = [r for out in per_rank for r in out["results"] if r["case"] == "hbm_copy_reference"]
        for tokens in args.tokens:
            at_tokens = [r for r in copies if r["tokens"] == tokens]
            if not at_tokens:
                continue
            slowest = max(at_tokens, key=lambda r: r["copy_us"])
            total = sum(r["copy_bytes"] for r in at_tokens)
            print(
                f"reference, {tokens} tokens/rank: every rank copying its BF16-dispatch stage+pull bytes "
                f"({slowest['copy_bytes'] / 1e6:.0f} MB) with one copy_ at once, all SMs: {slowest['copy_us']:.1f} us "
                f"({2 * total / slowest['copy_us'] / 1e3:.0f} GB/s read+write over the GPU)"
            )
        path = os.path.join(args.results_dir, f"intranode_{device}_{num_ranks}ranks.jsonl")
        print(f"records appended to {common.append_records(records, path)}")


if __name__ == "__main__":
    main()
