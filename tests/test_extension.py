"""The compiled extension: a C++ error must reach Python as an exception, never crash the interpreter.

Runs without a GPU (the checks below fail before any CUDA call) wherever deep_ep._C was built, so CI
covers it. Each case runs in a fresh interpreter: a crash shows as a failed test, not a dead pytest.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

try:
    import deep_ep._C  # noqa: F401

    HAS_EXTENSION = True
except ImportError:
    HAS_EXTENSION = False

pytestmark = pytest.mark.skipif(not HAS_EXTENSION, reason="deep_ep._C is not built")


@pytest.mark.parametrize(
    "call, message",
    [
        ("C.RuntimeBuffer(0, 0, 0, 1.0)", "support 1..8 ranks, got 0"),
        ("C.RuntimeBuffer(3, 2, 0, 1.0)", "rank 3 out of range for 2 ranks"),
    ],
)
def test_cpp_error_becomes_python_runtime_error(call, message):
    script = (
        "import deep_ep._C as C\n"
        "try:\n"
        f"    {call}\n"
        "except RuntimeError as error:\n"
        "    print('RAISED', error)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"interpreter died with {result.returncode}: {result.stderr[-2000:]}"
    assert "RAISED" in result.stdout and message in result.stdout, result.stdout + result.stderr


@pytest.mark.parametrize("num_ranks", [1, 2, 4, 8])
@pytest.mark.parametrize("hidden", [128, 2048, 4096, 7168])
@pytest.mark.parametrize("num_topk", [0, 1, 8, 16])
def test_validation_capacity_bounds_the_cpp_layout(num_ranks, hidden, num_topk):
    """Validation alone checks the NVLink buffer's capacity (deep_ep.config's formula); the C++ layout the
    kernels use must never need more, or a validated call would reach the C++ check."""
    from deep_ep import _C, config  # noqa: PLC0415

    for num_rows in (0, 1, 127, 4096):
        for elem_bytes in (1, 2):  # FP8 rows with their per-128 scales, BF16 rows without
            hidden_bytes = hidden * elem_bytes
            num_scales = hidden // 128 if elem_bytes == 1 else 0
            cpp = _C.intranode_dispatch_buffer_bytes(hidden_bytes, num_scales, num_topk, num_ranks, num_rows)
            python = config.nvl_buffer_bytes_needed(num_rows, hidden_bytes, num_ranks, num_topk, "dispatch")
            assert cpp <= python, (num_rows, elem_bytes)
        cpp = _C.intranode_combine_buffer_bytes(hidden, num_topk, num_rows)
        python = config.nvl_buffer_bytes_needed(num_rows, hidden * 2, num_ranks, num_topk, "combine")
        assert cpp <= python, num_rows
