"""Optional CUDA extension exgrpo._C (csrc/); everything else is declared in pyproject.toml.

    EXGRPO_BUILD_CUDA=auto   (default) build when torch is importable here, is a CUDA build, and nvcc
                             is found; otherwise install without it and say why on stderr
    EXGRPO_BUILD_CUDA=1      build, or fail loudly saying why not
    EXGRPO_BUILD_CUDA=0      never build
    EXGRPO_CUDA_ARCHS        ";"-separated SASS targets, default "90a;80" (Hopper with its wgmma/TMA
                             features, Ampere); "80+PTX" also embeds PTX for newer GPUs to JIT
    MAX_JOBS                 parallel compile jobs (read by torch's BuildExtension with ninja)

pip builds in an isolated environment that has no torch, so a CUDA build needs the installed torch:
    EXGRPO_BUILD_CUDA=1 pip install --no-build-isolation -e .
"""
import glob
import os
import re
import sys

from setuptools import setup

KERNEL_SOURCES = ["csrc/bindings.cpp", "csrc/lmhead_epilogue.cu", "csrc/loss.cu"]


def _arch_flags(spec: str) -> list[str]:
    flags = []
    for item in filter(None, (s.strip() for s in spec.replace(",", ";").split(";"))):
        m = re.fullmatch(r"(\d+)\.?(\d*[af]?)(\+PTX)?", item)
        if not m:
            raise SystemExit(f"EXGRPO_CUDA_ARCHS: cannot read {item!r} (expected e.g. '90a', '80', '8.0', '80+PTX')")
        arch = m.group(1) + m.group(2)
        flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
        if m.group(3):
            flags.append(f"-gencode=arch=compute_{arch},code=compute_{arch}")
    if not flags:
        raise SystemExit("EXGRPO_CUDA_ARCHS is empty")
    return flags


def _why_not_cuda() -> str | None:
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as e:
        return (f"torch is not importable in the build environment ({e}); pip's build isolation hides the "
                "installed torch: use `pip install --no-build-isolation`")
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU build"
    if cpp_extension.CUDA_HOME is None:
        return "nvcc was not found (set CUDA_HOME)"
    home = cpp_extension.CUDA_HOME
    include_dirs = [os.path.join(home, "include"), *glob.glob(os.path.join(home, "targets", "*", "include"))]
    if os.environ.get("CUDA_INC_PATH"):                     # torch's cpp_extension honours it too
        include_dirs.append(os.environ["CUDA_INC_PATH"])
    if not any(os.path.exists(os.path.join(d, "cuda_runtime.h")) for d in include_dirs):
        # torch guesses CUDA_HOME as nvcc's grandparent, which is wrong for a wrapper script such as /usr/local/bin/nvcc
        source = "CUDA_HOME" if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") else "nvcc's location"
        return (f"the CUDA toolkit folder {home} (from {source}) has no include/cuda_runtime.h (nor "
                "targets/*/include, nor CUDA_INC_PATH): set CUDA_HOME to the toolkit, e.g. CUDA_HOME=/usr/local/cuda")
    return None


def _cuda_extension() -> dict:
    mode = (os.environ.get("EXGRPO_BUILD_CUDA", "auto").strip().lower() or "auto")
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"EXGRPO_BUILD_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return {}
    why = _why_not_cuda()
    if why is not None:
        if mode == "1":
            raise SystemExit(f"EXGRPO_BUILD_CUDA=1 but the CUDA extension exgrpo._C cannot be built: {why}")
        print(f"exgrpo: not building the CUDA extension exgrpo._C: {why} (EXGRPO_BUILD_CUDA=1 makes this an error)",
              file=sys.stderr)
        return {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    here = os.path.dirname(os.path.abspath(__file__))
    archs = _arch_flags(os.environ.get("EXGRPO_CUDA_ARCHS", "90a;80"))
    ext = CUDAExtension(
        "exgrpo._C",
        KERNEL_SOURCES,
        include_dirs=[os.path.join(here, "csrc")],
        # torch adds its own -std (C++20 for torch 2.13) and, seeing our -gencode flags, no arch flags.
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo", *archs]},
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension}}


setup(**_cuda_extension())
