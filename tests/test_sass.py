"""The compiled code uses the loads the build asked for (CPU only: runs in CI without a GPU).

The default build must contain the non-allocating non-coherent loads (SASS ``LDG.E.NA.LTC256B...CONSTANT``);
a ``DISABLE_AGGRESSIVE_PTX_INSTRS`` build must contain no non-coherent load at all, only the volatile ones
(``LDG.E...STRONG.SYS``). cuobjdump is not part of every toolkit install; Triton's wheel ships one.
"""

import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTING_TU = os.path.join(ROOT, "csrc", "kernels", "testing.cu")

AGGRESSIVE_LOAD = re.compile(r"\bLDG\.E\.NA\.LTC256B(\.\d+)?\.CONSTANT\b")
ANY_NONCOHERENT_LOAD = re.compile(r"\bLDG\.[A-Z0-9.]*CONSTANT\b")
VOLATILE_LOAD = re.compile(r"\bLDG\.E(\.\d+)?\.STRONG\.SYS\b")


def _cuobjdump() -> str:
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import triton
    except ImportError:
        pytest.skip("no cuobjdump in PATH and no triton wheel (which ships one)")
    candidate = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(candidate):
        pytest.skip(f"triton has no cuobjdump at {candidate}")
    return candidate


def _nvcc() -> str:
    for candidate in (
        shutil.which("nvcc"),
        os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"),
    ):
        if candidate and os.path.exists(candidate):
            return candidate
    pytest.skip("nvcc not found")


def _sass(path: str) -> str:
    result = subprocess.run([_cuobjdump(), "-sass", path], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return result.stdout


def _compile_testing_cubin(tmp_path, defines: list[str]) -> str:
    cubin = str(tmp_path / "testing.cubin")
    command = [
        _nvcc(),
        "-std=c++20",
        "-arch=sm_90",
        "--expt-relaxed-constexpr",
        "-cubin",
        "-I",
        os.path.join(ROOT, "csrc"),
        *(f"-D{d}" for d in defines),
        TESTING_TU,
        "-o",
        cubin,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return cubin


def test_built_extension_matches_its_load_switch():
    try:
        from deep_ep import _C
    except ImportError as error:
        pytest.skip(f"deep_ep._C is not built: {error}")
    sass = _sass(_C.__file__)
    if _C.aggressive_loads_compiled():
        assert AGGRESSIVE_LOAD.search(sass), (
            "default build lacks ld.global.nc.L1::no_allocate.L2::256B in SASS"
        )
    else:
        assert not ANY_NONCOHERENT_LOAD.search(sass), "a DISABLE_AGGRESSIVE_PTX_INSTRS build emits .nc loads"
    assert VOLATILE_LOAD.search(sass), "the conservative ld.volatile loads are missing"


def test_disable_knob_removes_every_noncoherent_load(tmp_path):
    sass = _sass(_compile_testing_cubin(tmp_path, ["DEEP_EP_DISABLE_AGGRESSIVE_PTX_INSTRS"]))
    assert not ANY_NONCOHERENT_LOAD.search(sass), ANY_NONCOHERENT_LOAD.search(sass).group(0)
    assert VOLATILE_LOAD.search(sass)


def test_same_translation_unit_has_aggressive_loads_by_default(tmp_path):
    # The control for the test above: without the knob the same file does emit them.
    sass = _sass(_compile_testing_cubin(tmp_path, []))
    assert AGGRESSIVE_LOAD.search(sass)
    assert VOLATILE_LOAD.search(sass)
