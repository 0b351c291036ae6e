"""Build for deep_ep: sources, flags, NVSHMEM discovery and knobs; nothing else.

Without nvcc or without a CUDA build of torch the package installs with the pure-PyTorch reference
backend only, and says so. Knobs (environment variables):
  TORCH_CUDA_ARCH_LIST            default "9.0"
  NVSHMEM_DIR                     an NVSHMEM install (include/, lib/); default: the nvidia-nvshmem-cu13 wheel
  DISABLE_NVSHMEM=1               build the intra-node kernels only
  DISABLE_SM90_FEATURES=1         no Hopper-only instructions (TMA, mbarrier); also implied by non-9.x archs
  DISABLE_AGGRESSIVE_PTX_INSTRS=1 compile only the conservative ld.volatile peer loads
  MAX_JOBS                        parallel compile jobs (read by torch's ninja builder)
"""

import glob
import os
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _log(message: str) -> None:
    print(f"[deep_ep setup] {message}", file=sys.stderr)


def _cuda_home() -> str | None:
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:  # /usr/local/bin/nvcc may be a wrapper script: only a real toolkit root has include/
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for home in candidates:
        if (
            home
            and os.path.exists(os.path.join(home, "bin", "nvcc"))
            and os.path.isdir(os.path.join(home, "include"))
        ):
            return home
    return None


def _nvshmem_dir() -> str | None:
    if _env_flag("DISABLE_NVSHMEM"):
        return None
    explicit = os.environ.get("NVSHMEM_DIR")
    if explicit:
        return explicit
    try:
        import nvidia.nvshmem as wheel  # the nvidia-nvshmem-cu13 wheel is a namespace package

        return list(wheel.__path__)[0]
    except ImportError:
        return None


def _shared_libstdcxx_link_args() -> list[str]:
    """Links the shared libstdc++ that torch runs on when the host compiler has only a static one.

    A compiler built without a shared libstdc++ (seen: CXX=/opt/gcc/bin/g++ on the device image) links a
    private static copy into deep_ep._C. That copy's locale is never set up, so the first ostream
    insertion while raising a C++ error segfaults instead of reaching Python. Naming the loaded shared
    library before g++'s implicit -lstdc++ resolves every symbol there and leaves the archive unused.
    """
    cxx = os.environ.get("CXX", "c++")
    try:
        found = subprocess.run([cxx, "-print-file-name=libstdc++.so"], capture_output=True, text=True).stdout
    except OSError:
        return []
    if os.path.isabs(found.strip()):
        return []  # the compiler links a shared libstdc++ of its own
    with open("/proc/self/maps") as maps:  # torch (imported by now) has loaded the one it runs on
        loaded = {line.split()[-1] for line in maps if "/libstdc++.so" in line}
    if not loaded:
        _log(f"{cxx} has no shared libstdc++ and none is loaded: C++ errors may crash deep_ep._C")
        return []
    path = sorted(loaded)[0]
    _log(f"{cxx} has no shared libstdc++: linking {path}")
    return [path]


def _extension_modules():
    """Returns (ext_modules, cmdclass), or ([], {}) when this machine cannot build CUDA code."""
    cuda_home = _cuda_home()
    if cuda_home is None:
        _log("no nvcc found: installing the reference backend only (no deep_ep._C)")
        return [], {}
    # torch.utils.cpp_extension reads both at import time: without them it picks the wrong CUDA root,
    # or fails with an IndexError on a machine with no GPU to query for an arch.
    os.environ["CUDA_HOME"] = cuda_home
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except ImportError:
        _log("torch is not importable: installing the reference backend only (no deep_ep._C)")
        return [], {}
    if torch.version.cuda is None:
        _log(f"torch {torch.__version__} is a CPU build: installing the reference backend only")
        return [], {}

    archs = os.environ["TORCH_CUDA_ARCH_LIST"]
    sm90 = all(a.strip().startswith("9") for a in archs.replace(";", " ").split() if a.strip())
    disable_sm90 = _env_flag("DISABLE_SM90_FEATURES") or not sm90
    disable_aggressive = _env_flag("DISABLE_AGGRESSIVE_PTX_INSTRS") or disable_sm90
    nvshmem_dir = _nvshmem_dir()

    sources = sorted(
        glob.glob("csrc/*.cpp")
        + glob.glob("csrc/runtime/*.cpp")
        + glob.glob("csrc/runtime/*.cu")
        + glob.glob("csrc/ops/*.cpp")
        + glob.glob("csrc/kernels/*.cu")
        + glob.glob("csrc/kernels/intranode/*.cu")
    )
    include_dirs = [os.path.join(ROOT, "csrc")]
    defines = []
    cxx_flags = ["-O3", "-std=c++20", "-Wno-deprecated-declarations"]
    # torch's defaults hide half/bf16 operators; NVSHMEM's headers (and our bf16 math) need them.
    nvcc_flags = [
        "-O3",
        "-std=c++20",
        "--expt-relaxed-constexpr",
        "-Xcompiler",
        "-fPIC",
        "-U__CUDA_NO_HALF_OPERATORS__",
        "-U__CUDA_NO_HALF_CONVERSIONS__",
        "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
        "-U__CUDA_NO_HALF2_OPERATORS__",
        "-lineinfo",
    ]
    # CUDA 13 keeps libcu++ (cuda/std/...) under include/cccl; host code including cuda_bf16.h needs it.
    cccl = os.path.join(cuda_home, "include", "cccl")
    if os.path.isdir(cccl):
        cxx_flags.append(f"-I{cccl}")
    if disable_sm90:
        defines.append("DEEP_EP_DISABLE_SM90_FEATURES")
    if disable_aggressive:
        defines.append("DEEP_EP_DISABLE_AGGRESSIVE_PTX_INSTRS")

    library_dirs, extra_link_args, nvcc_dlink = [], [], []
    if nvshmem_dir is not None:
        sources += sorted(
            glob.glob("csrc/kernels/low_latency/*.cu") + glob.glob("csrc/kernels/internode/*.cu")
        )
        defines.append("DEEP_EP_WITH_NVSHMEM")
        nvshmem_lib = os.path.join(nvshmem_dir, "lib")
        include_dirs.append(os.path.join(nvshmem_dir, "include"))
        library_dirs.append(nvshmem_lib)
        # NVSHMEM device code needs relocatable device code and a device link against its static lib;
        # torch's dlink=True would add -dlto, which fails with this library, so the link is spelled out.
        nvcc_flags.append("-rdc=true")
        nvcc_dlink = ["-dlink", f"-L{nvshmem_lib}", "-lnvshmem_device"]
        # The wheel ships only versioned names (no libnvshmem_host.so), hence -l:<file> and an rpath.
        extra_link_args = [
            f"-L{nvshmem_lib}",
            "-l:libnvshmem_host.so.3",
            "-l:libnvshmem_device.a",
            f"-Wl,-rpath,{nvshmem_lib}",
        ]
    else:
        _log("NVSHMEM not found (or DISABLE_NVSHMEM=1): building the intra-node kernels only")

    extra_link_args += _shared_libstdcxx_link_args()
    define_flags = [f"-D{d}" for d in defines]
    extra_compile_args = {"cxx": cxx_flags + define_flags, "nvcc": nvcc_flags + define_flags}
    if nvcc_dlink:
        extra_compile_args["nvcc_dlink"] = nvcc_dlink
    _log(
        f"building deep_ep._C for TORCH_CUDA_ARCH_LIST={archs} with CUDA at {cuda_home}; "
        f"NVSHMEM={'off' if nvshmem_dir is None else nvshmem_dir}; defines={defines}"
    )
    extension = CUDAExtension(
        name="deep_ep._C",
        sources=sources,
        include_dirs=include_dirs,
        library_dirs=library_dirs,
        extra_compile_args=extra_compile_args,
        extra_link_args=extra_link_args,
    )
    return [extension], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extension_modules()

setup(
    name="deep_ep",
    version="0.1.0",
    description="Expert-parallel dispatch/combine for Mixture-of-Experts, DeepEP V1 compatible",
    packages=find_packages(include=["deep_ep", "deep_ep.*", "deep_ep_cpp"]),
    python_requires=">=3.10",
    # `pip install 'deep_ep[bench]'`: the plots and progress bars of `python -m deep_ep.bench` (optional).
    # `pip install 'deep_ep[nvshmem4py]'`: NVSHMEM's Python bindings, for programs that initialise NVSHMEM
    # themselves before deep_ep (deep_ep attaches to it: deep_ep/backends/nvshmem.py); deep_ep needs none.
    extras_require={"bench": ["matplotlib", "tqdm"], "nvshmem4py": ["nvshmem4py-cu13"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
