"""examples/moe_layer.py runs end to end and reports that its expert-parallel training steps match the dense
computation (it exits 1 otherwise): on the CPU (reference backend over gloo) and, marked gpu, through the
CUDA kernels with 2 and 4 ranks sharing the GPU(s)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "moe_layer.py"
SMALL = ["--tokens", "32", "--hidden", "64", "--ffn-hidden", "64", "--steps", "2"]


def run_example(*args: str, timeout_s: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return subprocess.run(
        [sys.executable, str(EXAMPLE), *args], env=env, capture_output=True, text=True, timeout=timeout_s
    )


def assert_matched(done: subprocess.CompletedProcess) -> None:
    output = f"--- stdout ---\n{done.stdout}\n--- stderr ---\n{done.stderr}"
    assert done.returncode == 0, f"example exited {done.returncode}\n{output}"
    assert ": MATCH" in done.stdout, f"example did not report a match\n{output}"


def test_moe_layer_example_two_ranks_cpu():
    assert_matched(run_example("--num-ranks", "2", "--backend", "reference", *SMALL))


@pytest.mark.gpu
@pytest.mark.parametrize("num_ranks", [2, 4])
def test_moe_layer_example_gpu(num_ranks):
    assert_matched(run_example("--num-ranks", str(num_ranks), "--backend", "cuda", "--optimizer", "sgd"))
