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
