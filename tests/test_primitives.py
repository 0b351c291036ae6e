"""Every ptx.cuh wrapper gives the host-computed answer; a wait with nobody to wake it becomes an exception
naming the rank; the coherence kernel counts exactly what it reads (one process, producer = consumer)."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.gpu

try:
    from deep_ep import _C
except ImportError:
    _C = None

if _C is None or not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU and deep_ep._C", allow_module_level=True)


def _i32(values) -> list[int]:
    """Two's-complement int32 wrap-around, as the GPU computes."""
    return np.array(values, dtype=np.int64).astype(np.uint32).astype(np.int32).tolist()


def expected_ptx_probe(i: list[int]) -> dict[int, int]:
    """The slot map of ptx_probe_kernel in csrc/kernels/testing.cu."""
    slots = {}
    slots.update(enumerate(i[0:4]))  # ld.global.nc.L1::no_allocate.L2::256B, v4
    slots[4] = i[4]  # the same, s32
    slots[5] = i[5]  # ld.global.nc s32
    slots.update({6 + k: i[8 + k] for k in range(4)})  # ld.global.nc v4
    slots.update({10 + k: i[4 + k] for k in range(4)})  # ld.volatile v4
    slots[14], slots[15], slots[16] = i[6], i[7], i[12]  # ld.volatile, ld.acquire.sys, ld.relaxed.sys
    slots.update({17 + k: i[12 + k] for k in range(4)})  # ld_peer<kAggressive> v4
    slots.update({21 + k: i[k] for k in range(4)})  # ld_peer<kConservative> v4
    slots[25], slots[26] = i[13], i[14]  # ld_peer s32, both kinds
    slots.update(
        {27 + k: v for k, v in enumerate(_i32([x + 1 for x in i[0:4]]))}
    )  # st.global.L1::no_allocate v4
    slots[31] = _i32([i[4] ^ 0x5A5A])[0]  # st.volatile
    slots[32] = _i32([i[5] * 3])[0]  # st.release.sys
    slots[33] = _i32([i[6] - 7])[0]  # st.relaxed.sys
    slots[34], slots[35] = i[8], _i32([i[8] + i[9]])[0]  # atom.add.release.sys: old, new
    slots[36], slots[37] = i[10], i[11]  # atom.cas that matches: old, new
    slots[38], slots[39] = i[11], i[11]  # atom.cas that does not match: old, unchanged
    slots[40] = 1  # both fences executed
    slots[41], slots[42] = 1, 1  # globaltimer nonzero and advancing by less than a second
    return slots


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_ptx_wrapper_returns_the_host_answer(seed):
    testing = _C.testing
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randint(
        -(2**31), 2**31 - 1, (testing.ptx_probe_inputs,), generator=generator, dtype=torch.int64
    )
    inputs = inputs.to(torch.int32)
    if inputs[10] == inputs[11]:  # the failing compare-and-swap needs them different
        inputs[11] += 1
    scratch = torch.full((testing.ptx_probe_scratch,), -1, dtype=torch.int32, device="cuda")
    outputs = torch.full((testing.ptx_probe_outputs,), 0x7EADBEEF, dtype=torch.int32, device="cuda")  # poison
    inputs_gpu = inputs.cuda()
    testing.ptx_probe(inputs_gpu, scratch, outputs, torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    got = outputs.tolist()
    for slot, value in expected_ptx_probe(inputs.tolist()).items():
        assert got[slot] == value, f"slot {slot}: got {got[slot]}, expected {value}"


# Tests that need a C++ exception to cross into Python run it in a child process: on the H100 device build
# (torch 2.11, Python 3.12) every exception thrown by deep_ep._C killed the process with SIGSEGV, and a test
# must then fail with the child's output instead of ending the whole pytest session.
_TIMEOUT_SCRIPT = """
import torch
from deep_ep import _C
# Rank 2 of 3 waits for a flag in its own buffer that no peer will ever set.
buffer = _C.RuntimeBuffer(2, 3, 4096, 0.2)
stream = torch.cuda.current_stream().cuda_stream
_C.testing.wait_probe(buffer, 0, 1, 1, stream)
torch.cuda.synchronize()  # the kernel leaves by itself after the timeout
print("failed:", buffer.failed, flush=True)
for attempt in ("raise_if_failed", "next_launch"):
    try:
        if attempt == "raise_if_failed":
            buffer.raise_if_failed()
        else:  # sticky: the next launch refuses instead of running with diverged epochs
            _C.testing.wait_probe(buffer, 0, 1, 1, stream)
        print(attempt, "no exception", flush=True)
    except RuntimeError as error:
        print(attempt, "RuntimeError:", error, flush=True)
buffer.destroy()
"""


def _run_child(script: str) -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    child = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env, cwd=root
    )
    output = child.stdout + child.stderr
    assert child.returncode == 0, f"child exited with {child.returncode}:\n{output[-3000:]}"
    return output


def test_wait_timeout_becomes_exception_naming_the_rank():
    output = _run_child(_TIMEOUT_SCRIPT)
    assert "failed: True" in output
    expected = r"raise_if_failed RuntimeError: rank 2 timed out .*test flag of rank/channel 1 \(expected 1, last read 0\)"
    assert re.search(expected, output), output
    assert re.search(r"next_launch RuntimeError: rank 2 timed out", output), output


def test_wait_that_is_already_satisfied_does_not_fail():
    buffer = _C.RuntimeBuffer(0, 1, 4096, 0.2)
    try:
        _C.testing.wait_probe(buffer, 0, 0, 0, torch.cuda.current_stream().cuda_stream)  # flag is 0 >= 0
        torch.cuda.synchronize()
        assert not buffer.failed
        buffer.raise_if_failed()
    finally:
        buffer.destroy()


@pytest.mark.parametrize("variant", ["aggressive", "conservative"])
@pytest.mark.parametrize("placement", ["pull", "push"])
@pytest.mark.parametrize("slice_bytes", [16, 4096])
def test_coherence_kernel_counts_every_load_in_one_process(variant, placement, slice_bytes):
    if variant == "aggressive" and not _C.aggressive_loads_compiled():
        pytest.skip("aggressive loads compiled out")
    testing = _C.testing
    num_blocks, rounds = 3, 50
    buffer = _C.RuntimeBuffer(0, 1, testing.coherence_buffer_bytes(num_blocks, slice_bytes), 5.0)
    try:
        buffer.connect([buffer.local_ipc_handle()])
        counters = torch.zeros(testing.num_coherence_counters, dtype=torch.int64, device="cuda")
        stream = torch.cuda.current_stream().cuda_stream
        # Two launches: the second continues the sequence numbers left in the flags by the first.
        for seq_base in (0, rounds):
            testing.coherence_round_trip(
                buffer, 0, 0, variant, placement, num_blocks, slice_bytes, rounds, seq_base, counters, stream
            )
        torch.cuda.synchronize()
        buffer.raise_if_failed()
        checked, stale, torn, invalid, rounds_done = counters.tolist()
        assert checked == 2 * rounds * num_blocks * slice_bytes // 16
        assert rounds_done == 2 * rounds * num_blocks
        assert (stale, torn, invalid) == (0, 0, 0)
    finally:
        buffer.destroy()


def test_coherence_launch_rejects_a_buffer_too_small():
    script = """
import torch
from deep_ep import _C
buffer = _C.RuntimeBuffer(0, 1, 4096, 1.0)
counters = torch.zeros(_C.testing.num_coherence_counters, dtype=torch.int64, device="cuda")
try:
    _C.testing.coherence_round_trip(buffer, 0, 0, "conservative", "pull", 4, 65536, 1, 0, counters, 0)
    print("no exception")
except RuntimeError as error:
    print("RuntimeError:", error)
buffer.destroy()
"""
    assert "RuntimeError: deep_ep: the coherence regions need" in _run_child(script)
