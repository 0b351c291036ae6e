"""Start a group of rank processes on this host: for tests, the demo and the benchmarks.

`RankPool(n)` spawns n workers once (each joins a torch.distributed group) and then runs module-level
functions `fn(rank, num_ranks, group, *args)` on all of them, returning the per-rank results or raising the
failing rank's exception with its traceback. Keeping the workers alive pays the ~2-5 s of process start and
`import torch` once per pool instead of once per test. `spawn_ranks` is the one-shot form.

Placement: with GPUs, rank r uses GPU r % num_gpus. The group uses NCCL only when every rank has a GPU of
its own (and NCCL exists); otherwise gloo, which works without GPUs and with ranks sharing one. With more
ranks than GPUs, CUDA MPS must run so the ranks' kernels execute concurrently (DESIGN section 5): the pool
starts the MPS daemon if it is not running and stops it when the last pool that started it closes.
The group's rendezvous is a FileStore in a fresh temporary directory, so pools never collide on ports.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
import time
import traceback
import warnings
from collections.abc import Callable
from datetime import timedelta
from multiprocessing.connection import wait as wait_for_connections
from typing import Any, Optional

import torch
import torch.multiprocessing as mp

DEFAULT_TIMEOUT_S = 300.0
# After one rank fails, the others get this long to finish (they may be blocked in a collective the failed
# rank never joined); then the pool is killed.
ERROR_GRACE_S = 10.0
MPS_CONTROL = "nvidia-cuda-mps-control"
# Always set in rank processes: NVLink SHARP / multicast are unavailable or unwanted on our machines.
ALWAYS_ENV = {"NCCL_NVLS_ENABLE": "0", "NVSHMEM_DISABLE_NVLS": "1", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
# Set in rank processes that share a GPU, unless the user set them (DESIGN section 5).
SHARED_GPU_ENV = {"NVSHMEM_IGNORE_CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "1", "NVSHMEM_DISABLE_NCCL": "1"}


class RankError(RuntimeError):
    """A rank process raised; `rank`, `exc_type` (the class name) and `remote_traceback` say where."""

    def __init__(self, rank: int, exc_type: str, message: str, remote_traceback: str, note: str = "") -> None:
        self.rank, self.exc_type, self.message, self.remote_traceback = (
            rank,
            exc_type,
            message,
            remote_traceback,
        )
        super().__init__(
            f"rank {rank} raised {exc_type}: {message}{note}\n--- rank {rank} traceback ---\n{remote_traceback}"
        )


def visible_gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


# --- CUDA MPS ----------------------------------------------------------------------------------------------

_mps_lock = threading.Lock()
_mps_users = 0  # pools relying on a daemon that this process started


def _mps_dirs() -> dict[str, str]:
    return {
        "CUDA_MPS_PIPE_DIRECTORY": os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/mps"),
        "CUDA_MPS_LOG_DIRECTORY": os.environ.get("CUDA_MPS_LOG_DIRECTORY", "/tmp/mpslog"),
    }


def _mps_control(command: str, env: dict[str, str]) -> bool:
    try:
        done = subprocess.run(
            [MPS_CONTROL],
            input=command + "\n",
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def _mps_running(env: dict[str, str]) -> bool:
    control = os.path.join(env["CUDA_MPS_PIPE_DIRECTORY"], "control")
    return os.path.exists(control) and _mps_control("get_server_list", env)


def _acquire_mps(env: dict[str, str]) -> bool:
    """Make sure an MPS daemon runs; True if this process started it (and so must stop it)."""
    global _mps_users
    with _mps_lock:
        if _mps_users > 0:
            _mps_users += 1
            return True
        if _mps_running(env):
            return False
        if shutil.which(MPS_CONTROL) is None:
            warnings.warn(
                f"{MPS_CONTROL} not found: ranks sharing a GPU will time-slice (slow)", stacklevel=3
            )
            return False
        for d in env.values():
            os.makedirs(d, exist_ok=True)
        subprocess.run([MPS_CONTROL, "-d"], env={**os.environ, **env}, check=True, timeout=30)
        _mps_users = 1
        return True


def _release_mps(env: dict[str, str]) -> None:
    global _mps_users
    with _mps_lock:
        _mps_users -= 1
        if _mps_users == 0:
            _mps_control("quit", env)


# --- worker side -------------------------------------------------------------------------------------------


def _worker_main(rank, num_ranks, store_path, pg_backend, num_gpus, env, conn, pg_timeout_s) -> None:
    # Before anything touches CUDA: the driver reads MPS and NVSHMEM settings when it initializes.
    os.environ.update(env)
    import torch.distributed as dist  # noqa: PLC0415

    def report_error(exc: BaseException) -> None:
        conn.send(("error", rank, type(exc).__name__, str(exc), traceback.format_exc()))

    try:
        if num_gpus > 0:
            torch.cuda.set_device(rank % num_gpus)
        store = dist.FileStore(store_path, num_ranks)
        dist.init_process_group(
            pg_backend, store=store, rank=rank, world_size=num_ranks, timeout=timedelta(seconds=pg_timeout_s)
        )
        conn.send(("ready", rank))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        report_error(exc)
        return
    group = dist.group.WORLD
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            break
        if task is None:
            break
        fn, args, kwargs = task
        try:
            result = fn(rank, num_ranks, group, *args, **kwargs)
            conn.send(("ok", result))
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            report_error(exc)
    try:
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - best effort on the way out
        pass


# --- parent side -------------------------------------------------------------------------------------------


class RankPool:
    """`num_ranks` long-lived rank processes in one torch.distributed group; see the module docstring."""

    def __init__(
        self,
        num_ranks: int,
        *,
        backend: Optional[str] = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        init_timeout_s: float = 120.0,
    ) -> None:
        if num_ranks < 1:
            raise ValueError(f"num_ranks: must be >= 1, got {num_ranks}")
        self.num_ranks, self.timeout_s = num_ranks, timeout_s
        num_gpus = visible_gpu_count()
        self.gpus_shared = num_gpus > 0 and num_ranks > num_gpus
        if backend is None:
            own_gpus = num_gpus > 0 and not self.gpus_shared and torch.distributed.is_nccl_available()
            backend = "nccl" if own_gpus else "gloo"
        self.backend = backend
        env = dict(ALWAYS_ENV)
        self._mps_env: Optional[dict[str, str]] = None
        self._started_mps = False
        if self.gpus_shared:
            self._mps_env = _mps_dirs()
            self._started_mps = _acquire_mps(self._mps_env)
            env.update(self._mps_env)
            env.update({k: os.environ.get(k, v) for k, v in SHARED_GPU_ENV.items()})
        self._tmpdir = tempfile.mkdtemp(prefix="deep_ep_ranks_")
        ctx = mp.get_context("spawn")
        self._conns, self._procs = [], []
        self.broken = False
        self._closed = False
        try:
            for rank in range(num_ranks):
                parent_conn, child_conn = ctx.Pipe()
                proc = ctx.Process(
                    target=_worker_main,
                    args=(
                        rank,
                        num_ranks,
                        os.path.join(self._tmpdir, "store"),
                        backend,
                        num_gpus,
                        env,
                        child_conn,
                        max(timeout_s, 60.0),
                    ),
                    daemon=True,
                )
                proc.start()
                child_conn.close()
                self._conns.append(parent_conn)
                self._procs.append(proc)
            self._collect(init_timeout_s, "start")
        except BaseException:
            self.close(kill=True)
            raise

    def _collect(self, timeout_s: float, what: str) -> list:
        """Wait for one message per rank; raise the first rank error or a timeout (killing the pool)."""
        results: list = [None] * self.num_ranks
        errors: dict[int, tuple] = {}
        pending = set(range(self.num_ranks))
        deadline = time.monotonic() + timeout_s
        grace_deadline = None
        while pending:
            limit = deadline if grace_deadline is None else min(deadline, grace_deadline)
            ready = wait_for_connections(
                [self._conns[r] for r in pending], timeout=max(0.0, limit - time.monotonic())
            )
            if not ready:
                break
            for conn in ready:
                rank = self._conns.index(conn)
                pending.discard(rank)
                try:
                    message = conn.recv()
                except (EOFError, OSError):
                    self._procs[rank].join(timeout=5)  # the pipe closes just before the exit code is known
                    code = self._procs[rank].exitcode
                    errors[rank] = ("ProcessDied", f"rank process exited (exit code {code})", "")
                    continue
                if message[0] == "error":
                    errors[rank] = message[2:]
                else:
                    results[rank] = message[1]
            if errors and grace_deadline is None:
                grace_deadline = time.monotonic() + ERROR_GRACE_S
        if pending or any(e[0] == "ProcessDied" for e in errors.values()):
            # Ranks still running are stuck (or one died): the group is unusable, start over next time.
            self.close(kill=True)
        if errors:
            rank = min(errors)
            note = f" (ranks {sorted(pending)} did not finish; pool killed)" if pending else ""
            raise RankError(rank, *errors[rank], note=note)
        if pending:
            raise TimeoutError(
                f"{what}: ranks {sorted(pending)} did not finish within {timeout_s:.0f} s; pool killed"
            )
        return results

    def run(
        self, fn: Callable[..., Any], *args: Any, timeout_s: Optional[float] = None, **kwargs: Any
    ) -> list:
        """Run `fn(rank, num_ranks, group, *args, **kwargs)` on every rank; returns the per-rank results.
        `fn` must be picklable (a module-level function) and so must its arguments and results."""
        if self.broken or self._closed:
            raise RuntimeError("RankPool: the pool was killed after an error or timeout; create a new one")
        for conn in self._conns:
            conn.send((fn, args, kwargs))
        return self._collect(
            self.timeout_s if timeout_s is None else timeout_s, getattr(fn, "__name__", "run")
        )

    def close(self, kill: bool = False) -> None:
        if self._closed:
            return
        self._closed = True
        self.broken = self.broken or kill
        for conn in self._conns:
            try:
                if not kill:
                    conn.send(None)
            except OSError:
                pass
        for proc in self._procs:
            proc.join(timeout=0 if kill else 10)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in self._conns:
            conn.close()
        if self._started_mps:
            _release_mps(self._mps_env)
            self._started_mps = False
        shutil.rmtree(self._tmpdir, ignore_errors=True)

    def __enter__(self) -> RankPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def spawn_ranks(
    fn: Callable[..., Any],
    num_ranks: int,
    args: tuple = (),
    *,
    backend: Optional[str] = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> list:
    """Start `num_ranks` processes, run `fn(rank, num_ranks, group, *args)` on each, return their results."""
    with RankPool(num_ranks, backend=backend, timeout_s=timeout_s) as pool:
        return pool.run(fn, *args)
