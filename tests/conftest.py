"""Test set-up. Triton's interpreter must be switched on before any @triton.jit is created, i.e.
before exgrpo.kernels' Triton modules are imported, so it happens here, at collection time."""
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


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
