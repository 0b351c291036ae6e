"""Shared pieces of the benchmark scripts: timing (DESIGN section 6), the NCCL baseline written as a user would
write it, DeepSeek-style inputs, JSON records (DESIGN section 7), the printed table, sweep presets
(`--sweep quick`) and the sweep progress line (the last two shared with `python -m deep_ep.bench`).

Benchmarks never assert: they measure and report.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import time
from collections.abc import Callable
from typing import Optional

import torch
import torch.distributed as dist

from deep_ep.tools.bench import Progress, format_table  # noqa: F401 - shared with the entry point

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO_ROOT, "benchmarks", "results")


# --- timing ------------------------------------------------------------------------------------------------


# ~300 us on an H100: longer than the host takes to enqueue one operation from Python.
LAUNCH_COVER_CYCLES = 500_000


def on_gpu() -> bool:
    """CUDA events, device synchronisation and GPU sleeps exist; without them (the reference backend on a
    CPU machine) the scripts time with host timers and skip the CUDA-only parts."""
    return torch.cuda.is_available()


def synchronize() -> None:
    if on_gpu():
        torch.cuda.synchronize()


def gpu_sleep(cycles: int) -> None:
    """Keep the current stream busy for `cycles` GPU cycles (nothing without CUDA)."""
    if cycles > 0 and on_gpu():
        torch.cuda._sleep(cycles)


def time_op(
    group,
    fn: Callable[[], None],
    *,
    warmup: int = 5,
    runs: int = 20,
    device_barrier: Optional[Callable[[], None]] = None,
    host_times: Optional[list] = None,
) -> list[float]:
    """Microseconds of `fn` per run, CUDA events on the current stream, a group barrier before each run.

    The host barrier (a group collective after a device synchronisation) is what a user's code would do; the
    ranks then leave it tens of microseconds apart, and the first one's time includes waiting for the last.
    With `device_barrier` (a barrier kernel enqueued on the current stream after the host barrier, then a
    GPU sleep of LAUNCH_COVER_CYCLES) the start event is recorded once every rank's GPU passed the barrier
    and the sleep, by which time the host has enqueued the operation: the time is the GPU's, as in a
    pipeline where the host runs ahead, not Python's launch work. What the host must still do while the GPU
    waits (a fresh dispatch's wait for the receive counts, then its output allocation and launches) is
    counted. Without CUDA the time is the host's (the reference backend's calls are synchronous).
    """
    use_events = on_gpu()
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        synchronize()
        dist.barrier(group=group)
        if device_barrier is not None:
            device_barrier()
            gpu_sleep(LAUNCH_COVER_CYCLES)
        if use_events:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        host_start = time.perf_counter()
        fn()
        host_us = (time.perf_counter() - host_start) * 1e6
        if host_times is not None:  # how long the host spent in the call (launch work, CPU waits)
            host_times.append(host_us)
        if use_events:
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1000.0)
        else:
            times.append(host_us)
    return times


def summarize(times: list[float]) -> dict:
    ordered = sorted(times)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {
        "median_us": statistics.median(ordered),
        "p10_us": pick(0.1),
        "p90_us": pick(0.9),
        "runs": len(ordered),
    }


# --- inputs ------------------------------------------------------------------------------------------------


def uniform_routing(num_tokens: int, num_experts: int, topk: int, seed: int, device) -> torch.Tensor:
    """DESIGN section 6: scores `rand`, then `topk` (distinct experts per token), int64."""
    g = torch.Generator(device=device).manual_seed(seed)
    scores = torch.rand(num_tokens, num_experts, generator=g, device=device)
    return scores.topk(topk, dim=1).indices


def random_bf16(num_tokens: int, hidden: int, seed: int, device) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(num_tokens, hidden, generator=g, device=device).to(torch.bfloat16)


def per_token_cast_to_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BF16 [T, H] -> (float8_e4m3fn [T, H], float32 scales [T, H/128]), one scale per 128 elements (amax /
    448), as DeepEP's tests build FP8 inputs. Benchmarks only move these bytes, so the rounding details of
    the library's own cast do not matter here."""
    num_tokens, hidden = x.shape
    blocks = x.float().view(num_tokens, hidden // 128, 128)
    amax = blocks.abs().amax(dim=2).clamp(min=1e-4)
    scaled = blocks * (448.0 / amax.unsqueeze(2))
    return scaled.to(torch.float8_e4m3fn).view(num_tokens, hidden), amax / 448.0


def low_latency_num_blocks(buffer) -> Optional[int]:
    """Thread blocks a low-latency kernel launches per rank (the records' num_sms), where the backend says;
    the public API does not, so None when unknown."""
    runtime = getattr(buffer, "runtime", None)
    for owner in (runtime, getattr(runtime, "_low_latency", None)):
        blocks = getattr(owner, "num_blocks", None)
        if isinstance(blocks, int):
            return blocks
    return None


# --- the NCCL baseline, as user code -------------------------------------------------------------------------


class NcclAllToAll:
    """Dispatch/combine the way a user writes them with `all_to_all_single` (DESIGN section 6): membership,
    count exchange, permute by destination, all-to-all; for combine, all-to-all back and `index_add_`.
    Needs an NCCL group (one GPU per rank)."""

    def __init__(self, group, topk_idx: torch.Tensor, num_experts: int, num_ranks: int) -> None:
        self.group, self.num_ranks = group, num_ranks
        self.topk_idx, self.num_experts = topk_idx, num_experts

    def dispatch(self, x: torch.Tensor) -> torch.Tensor:
        num_local = self.num_experts // self.num_ranks
        owner = torch.where(self.topk_idx >= 0, self.topk_idx // num_local, self.num_ranks)
        in_rank = torch.zeros(x.size(0), self.num_ranks + 1, dtype=torch.bool, device=x.device)
        in_rank.scatter_(1, owner, True)
        in_rank = in_rank[:, : self.num_ranks]
        dest, token = in_rank.t().nonzero(as_tuple=True)  # grouped by destination, token order within
        send_counts = in_rank.sum(0)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        send_splits, recv_splits = send_counts.tolist(), recv_counts.tolist()
        recv = torch.empty(sum(recv_splits), x.size(1), dtype=x.dtype, device=x.device)
        dist.all_to_all_single(recv, x[token], recv_splits, send_splits, group=self.group)
        self._state = (token, send_splits, recv_splits)
        return recv

    def combine(self, y: torch.Tensor, num_tokens: int) -> torch.Tensor:
        token, send_splits, recv_splits = self._state
        back = torch.empty(sum(send_splits), y.size(1), dtype=y.dtype, device=y.device)
        dist.all_to_all_single(back, y, send_splits, recv_splits, group=self.group)
        out = torch.zeros(num_tokens, y.size(1), dtype=torch.float32, device=y.device)
        out.index_add_(0, token, back.float())
        return out.to(torch.bfloat16)


# --- records and table ---------------------------------------------------------------------------------------


def git_commit() -> str:
    env = os.environ.get("DEEP_EP_COMMIT")
    if env:
        return env
    try:
        done = subprocess.run(
            ["git", "-C", REPO_ROOT, "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return done.stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def device_kind(override: Optional[str] = None) -> str:
    """The machine's name for records and file names: `override`, else $DEEP_EP_DEVICE_KIND, else the GPU's
    name with the GPU count (`nvidia-h200`, `nvidia-h200-x2`), else `cpu`."""
    name = override or os.environ.get("DEEP_EP_DEVICE_KIND")
    if name:
        return name
    if not on_gpu():
        return "cpu"
    name = torch.cuda.get_device_name().strip().replace(" ", "-").lower()
    count = torch.cuda.device_count()
    return name if count == 1 else f"{name}-x{count}"


def today() -> str:
    return os.environ.get("DEEP_EP_BENCH_DATE") or datetime.date.today().isoformat()


def record(device: str, num_ranks: int, gpus: int, case: str, **fields) -> dict:
    """One DESIGN section 7 record; extra fields (spread, remote bytes) ride along."""
    base = {
        "device": device,
        "date": today(),
        "commit": git_commit(),
        "num_ranks": num_ranks,
        "gpus": gpus,
        "case": case,
    }
    base.update(fields)
    return base


def rounded(value: Optional[float], digits: int) -> Optional[float]:
    return None if value is None else round(value, digits)


def timing_fields(row: dict) -> dict:
    """A timed row's median, GPU-aligned median (None without a device barrier), host time inside the call
    and spread, rounded as the records carry them."""
    return dict(
        median_us=round(row["median_us"], 2),
        aligned_median_us=rounded(row["aligned_median_us"], 2),
        host_call_us=round(row["host_call_us"], 1),
        p10_us=round(row["p10_us"], 2),
        p90_us=round(row["p90_us"], 2),
    )


def append_records(records: list[dict], path: str) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """columns: (key, header, format) with format like '{:.1f}'; missing values print as '-'."""
    print(format_table(rows, columns))


# --- sweeps ----------------------------------------------------------------------------------------------


def parse_args_with_sweep(
    parser: argparse.ArgumentParser, argv, presets: dict[str, dict]
) -> argparse.Namespace:
    """Adds `--sweep NAME` to `parser`: a preset of option defaults (`quick`: a few configurations, sized so
    that every script's preset together takes a few minutes of one GPU); options given explicitly win."""
    parser.add_argument(
        "--sweep",
        choices=["default", *presets],
        default="default",
        help="a preset of sweep options; options given explicitly override it. "
        + "; ".join(f"{name}: {_describe(preset)}" for name, preset in presets.items()),
    )
    known, _ = parser.parse_known_args(argv)
    preset = presets.get(known.sweep, {})
    # An option whose default is None (an accumulating one, like bench_low_latency's --ranks 2 --ranks 4)
    # gets the preset after parsing: as a default it would be extended by the values given, not replaced.
    late = {key: value for key, value in preset.items() if parser.get_default(key) is None}
    parser.set_defaults(**{key: value for key, value in preset.items() if key not in late})
    args = parser.parse_args(argv)
    for key, value in late.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def _describe(preset: dict) -> str:
    def value(v) -> str:
        return " ".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)

    return " ".join(f"--{key.replace('_', '-')} {value(v)}" for key, v in preset.items())
