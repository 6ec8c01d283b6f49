"""csrc/ without a GPU: every .cu compiles with plain nvcc for sm_90a and sm_80, ptxas reports no spills.

The kernel translation units include no torch header (that is what makes this check possible without
CUDA torch); the torch binding, csrc/bindings.cpp, is parsed against the installed torch's headers.
Also here: setup.py's EXGRPO_BUILD_CUDA modes, and the "cuda" backend slot without the extension.
"""
import json
import os
import re
import runpy
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
NVCC = shutil.which("nvcc")
ARCHS = ("sm_90a", "sm_80")
# Kernel families that stream the [n, V] chunk or run per token: no spills, no stack frame.
HOT = ("lmhead_stats_kernel", "lmhead_backward_kernel", "loss_terms_kernel")
ALL_KERNELS = HOT + ("advantages_kernel",)
TORCH_INCLUDE = re.compile(r'#\s*include\s*[<"](torch/|ATen/|c10/|pybind11/|Python\.h)')


def _nvcc(cu: Path, out: Path):
    cmd = [NVCC, "-c", "-std=c++20", "-O3", "-I", str(CSRC), "-Xptxas", "-v", "-o", str(out), str(cu)]
    for arch in ARCHS:
        cmd.insert(1, f"-gencode=arch=compute_{arch[3:]},code={arch}")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def _bindings_parse_cmd(stub_dir: Path):
    """g++ -fsyntax-only on the torch binding TU, or None without g++ / CUDA headers. The CPU wheel ships
    c10/cuda but not the generated cuda_cmake_macros.h, which a stub stands in for; the CUDA runtime
    headers come from the toolkit."""
    gxx = shutil.which("g++")
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    if NVCC:
        homes.append(str(Path(NVCC).resolve().parent.parent))
    cuda_inc = next((Path(h) / "include" for h in homes if h and (Path(h) / "include" / "cuda_runtime_api.h").exists()),
                    None)
    if gxx is None or cuda_inc is None:
        return None
    stub = stub_dir / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    inc = Path(torch.__file__).parent / "include"
    return [gxx, "-std=c++20", "-fsyntax-only", "-Wall", "-Wextra", "-Werror", "-isystem", str(stub_dir),
            "-isystem", str(inc), "-isystem", str(inc / "torch" / "csrc" / "api" / "include"), "-isystem",
            str(cuda_inc), "-isystem", sysconfig.get_paths()["include"], "-I", str(CSRC), str(CSRC / "bindings.cpp")]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Every csrc/*.cu through nvcc for both architectures, and the binding TU through g++ -fsyntax-only,
    all at once (the CI machine has 2 cores). -> ({cu: CompletedProcess}, CompletedProcess | None)."""
    if NVCC is None:
        pytest.skip("nvcc not found")
    out = tmp_path_factory.mktemp("nvcc")
    cmd = _bindings_parse_cmd(tmp_path_factory.mktemp("stub"))
    parse = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) if cmd else None
    sources = sorted(CSRC.glob("*.cu"))
    with ThreadPoolExecutor(2) as pool:
        results = dict(zip(sources, pool.map(lambda cu: _nvcc(cu, out / (cu.stem + ".o")), sources)))
    parsed = None
    if parse is not None:
        stdout, stderr = parse.communicate(timeout=300)
        parsed = subprocess.CompletedProcess(cmd, parse.returncode, stdout, stderr)
    return results, parsed


@pytest.fixture(scope="module")
def ptxas_report(compiled):
    return compiled[0]


def parse_ptxas(stderr: str):
    """-> [{kernel, arch, registers, stack, spill_stores, spill_loads}] from `ptxas -v` output."""
    recs, cur = [], None
    for line in stderr.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for '(sm_\w+)'", line)
        if m:
            cur = {"kernel": m.group(1), "arch": m.group(2)}
            recs.append(cur)
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            cur.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur["registers"] = int(m.group(1))
    return recs


def test_kernel_sources_include_no_torch_headers():
    kernel_files = sorted(CSRC.glob("*.cu")) + sorted(CSRC.glob("*.cuh")) + sorted(CSRC.glob("*.h"))
    assert kernel_files, "csrc/ holds no kernel sources"
    for f in kernel_files:
        bad = [line for line in f.read_text().splitlines() if TORCH_INCLUDE.search(line)]
        assert not bad, f"{f.name} includes torch/Python headers {bad}: kernels must compile with plain nvcc"
    code = [f for f in CSRC.iterdir() if f.suffix in (".cu", ".cuh", ".h", ".cpp")]
    binders = [f.name for f in code if "TORCH_LIBRARY(" in f.read_text()]
    assert binders == ["bindings.cpp"], binders


def test_every_cu_compiles_for_sm90a_and_sm80_without_spills(ptxas_report):
    seen = set()
    for cu, r in ptxas_report.items():
        assert r.returncode == 0, f"nvcc failed on {cu.name}:\n{r.stderr[-4000:]}"
        assert "warning" not in r.stderr.lower(), f"{cu.name}: compiler warnings:\n{r.stderr[-4000:]}"
        for rec in parse_ptxas(r.stderr):
            family = next((k for k in ALL_KERNELS if k in rec["kernel"]), rec["kernel"])
            print(f"{cu.name:22s} {rec['arch']:7s} {family:24s} regs {rec.get('registers'):3d} "
                  f"stack {rec.get('stack')} spills {rec.get('spill_stores')}/{rec.get('spill_loads')}")
            assert "spill_stores" in rec and "registers" in rec, f"no ptxas usage line for {rec}"
            assert rec["spill_stores"] == 0 and rec["spill_loads"] == 0, f"register spills in {rec}"
            if family in HOT:
                assert rec["stack"] == 0, f"hot kernel uses local memory (stack frame) {rec}"
            seen.add((family, rec["arch"]))
    for fam in ALL_KERNELS:
        for arch in ARCHS:
            assert (fam, arch) in seen, f"{fam} was not compiled for {arch}"


def test_every_epilogue_variant_is_instantiated(ptxas_report):
    """3 dtypes × softcap on/off × entropy on/off, for each of the two epilogue kernels and each arch."""
    recs = parse_ptxas(ptxas_report[CSRC / "lmhead_epilogue.cu"].stderr)
    for fam in ("lmhead_stats_kernel", "lmhead_backward_kernel"):
        for arch in ARCHS:
            assert sum(fam in r["kernel"] and r["arch"] == arch for r in recs) == 12, (fam, arch)


def test_bindings_parse_against_torch_headers(compiled):
    parsed = compiled[1]
    if parsed is None:
        pytest.skip("g++ or the CUDA toolkit headers not found")
    assert parsed.returncode == 0, parsed.stderr[-4000:]


# ----------------------------------------------------------------------------- setup.py and the backend slot

def run_setup(monkeypatch, mode, archs=None):
    import setuptools
    captured = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kw: captured.update(kw))
    monkeypatch.setenv("EXGRPO_BUILD_CUDA", mode)
    if archs is not None:
        monkeypatch.setenv("EXGRPO_CUDA_ARCHS", archs)
    return runpy.run_path(str(ROOT / "setup.py")), captured


def test_setup_modes_without_cuda_torch(monkeypatch, capsys):
    if torch.version.cuda is not None:
        pytest.skip("CUDA torch: the extension can be built here")
    mod, kw = run_setup(monkeypatch, "0")
    assert kw == {}
    mod, kw = run_setup(monkeypatch, "auto")
    assert kw == {} and "CPU build" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="EXGRPO_BUILD_CUDA=1 but the CUDA extension exgrpo._C cannot be built.*CPU"):
        run_setup(monkeypatch, "1")
    with pytest.raises(SystemExit, match="must be auto, 0 or 1"):
        run_setup(monkeypatch, "yes")
    assert mod["_arch_flags"]("90a;80") == ["-gencode=arch=compute_90a,code=sm_90a",
                                            "-gencode=arch=compute_80,code=sm_80"]
    assert mod["_arch_flags"]("8.0+PTX") == ["-gencode=arch=compute_80,code=sm_80",
                                             "-gencode=arch=compute_80,code=compute_80"]
    with pytest.raises(SystemExit, match="EXGRPO_CUDA_ARCHS"):
        mod["_arch_flags"]("hopper")


def test_setup_names_a_toolkit_folder_without_headers(monkeypatch, capsys, tmp_path):
    """CUDA torch, but CUDA_HOME is not a toolkit (torch's guess from a wrapper nvcc): say so before compiling."""
    if torch.version.cuda is None:
        pytest.skip("CPU torch: setup.py stops earlier (test_setup_modes_without_cuda_torch)")
    from torch.utils import cpp_extension
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(tmp_path))
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    _, kw = run_setup(monkeypatch, "auto")
    assert kw == {} and f"{tmp_path} (from nvcc's location) has no include/cuda_runtime.h" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="cannot be built: the CUDA toolkit folder .* set CUDA_HOME"):
        run_setup(monkeypatch, "1")
    inc = tmp_path / "elsewhere"                            # CUDA_INC_PATH, which torch also honours
    inc.mkdir()
    (inc / "cuda_runtime.h").write_text("")
    monkeypatch.setenv("CUDA_INC_PATH", str(inc))
    assert "ext_modules" in run_setup(monkeypatch, "1")[1]
    monkeypatch.delenv("CUDA_INC_PATH")
    conda = tmp_path / "targets" / "x86_64-linux" / "include"   # conda's CUDA 12+ layout
    conda.mkdir(parents=True)
    (conda / "cuda_runtime.h").write_text("")
    assert "ext_modules" in run_setup(monkeypatch, "1")[1]


def test_cuda_backend_reports_why_it_is_unavailable():
    import exgrpo.kernels as K
    from exgrpo.kernels import cuda_backend
    why = K.available("cpu")["cuda"]
    assert why, "the cuda backend cannot run on CPU tensors"
    if torch.version.cuda is None:
        assert "CPU build" in why
        assert "exgrpo._C" not in sys.modules, "asking must not import the extension on CPU torch"
    elif cuda_backend._load() is not None:
        assert "not importable" in why
    h, W, t = torch.randn(4, 8), torch.randn(10, 8), torch.randint(0, 10, (4,))
    with pytest.raises(RuntimeError, match=r"backend 'cuda' is unavailable: .*Available here"):
        K.token_logprobs(h, W, t, backend="cuda")


BUILT_SCRIPT = r'''
import json, re, sys, torch
sys.path.insert(0, sys.argv[1])
from torch._subclasses.fake_tensor import FakeTensorMode
import exgrpo
from exgrpo.kernels import cuda_backend as cb
assert exgrpo.__file__.startswith(sys.argv[1]), exgrpo.__file__
assert cb._load() is None, cb._load()
doc = re.sub(r"\s+", " ", cb.__doc__)
out = {"schemas": {}, "in_doc": {}}
for name in ("lmhead_stats", "lmhead_stats_backward_inplace", "advantages", "loss_terms"):
    s = str(getattr(torch.ops.exgrpo, name).default._schema)
    out["schemas"][name] = s
    out["in_doc"][name] = s.removeprefix("exgrpo::") in doc
with FakeTensorMode():                                  # fake CUDA tensors: the register_fake side, no GPU
    res = {}
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        x = torch.empty(5, 1031, device="cuda", dtype=dt, requires_grad=True)
        t = torch.zeros(5, dtype=torch.long, device="cuda")
        lse, zt, ent = torch.ops.exgrpo.lmhead_stats(x, t, 1.0, 30.0, True)
        _, _, none = torch.ops.exgrpo.lmhead_stats(x.detach(), t, 1.0, None, False)
        # register_autograd's node (running backward would need a CUDA context)
        res[str(dt)] = [list(lse.shape), str(lse.dtype), list(ent.shape), list(none.shape), lse.grad_fn.name()]
    o = torch.empty(8, device="cuda")
    c, s, tot, fired = torch.ops.exgrpo.advantages(o, torch.ones(8, dtype=torch.bool, device="cuda"), 0.5, 1.0,
                                                   1e-6, False)
    res["advantages"] = [list(c.shape), str(fired.dtype)]
    lp = torch.empty(3, 7, device="cuda", requires_grad=True)
    e = lambda *shape: torch.empty(*shape, device="cuda")
    coef, loss, metrics = torch.ops.exgrpo.loss_terms(lp, e(3), e(3, 7), e(3, 7),
                                                      torch.ones(3, 7, dtype=torch.bool, device="cuda"),
                                                      None, None, None, 0.2, 0.2, 0.04)
    res["loss_terms"] = [list(coef.shape), list(loss.shape), list(metrics.shape), loss.grad_fn.name(),
                         coef.requires_grad or metrics.requires_grad]
out["fake"] = res
print(json.dumps(out))
'''


def _toolkit_home() -> str:
    """The CUDA toolkit folder of the nvcc on PATH, as nvcc itself reports it (TOP): PATH may hold a
    wrapper script, e.g. /usr/local/bin/nvcc, whose grandparent is not the toolkit."""
    r = subprocess.run([NVCC, "--dryrun", "-c", "-x", "cu", os.devnull], capture_output=True, text=True, timeout=60)
    m = re.search(r"^#\$ TOP=(.+)$", r.stdout + r.stderr, re.M)
    assert m, f"nvcc --dryrun did not report TOP: {(r.stdout + r.stderr)[-2000:]}"
    return str(Path(m.group(1).strip()).resolve())


@pytest.mark.slow
def test_extension_builds_against_this_cuda_torch(tmp_path):
    """Where torch is a CUDA build and nvcc exists (not CI: its torch is the CPU wheel), build exgrpo._C
    with setup.py exactly as a user would, import it (no GPU needed), and check that the op schemas it
    registers are the ones cuda_backend documents, that the fake (meta) registrations give the documented
    shapes for every input dtype, and that the autograd registrations are attached (fake CUDA tensors:
    running a backward would need a CUDA context). This checks the binding against a given torch's
    headers and ABI (e.g. the GPU machine's torch 2.11 installed on the CPU machine) before a GPU is lent."""
    if torch.version.cuda is None:
        pytest.skip("CPU torch: CUDAExtension cannot build against it (run with a CUDA torch installed)")
    if NVCC is None:
        pytest.skip("nvcc not found")
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info", "build")
    for d in ("csrc", "exgrpo", "kernels"):
        shutil.copytree(ROOT / d, src / d, ignore=ignore)
    for f in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / f, src / f)
    env = dict(os.environ, EXGRPO_BUILD_CUDA="1", MAX_JOBS=str(os.cpu_count() or 2))
    if not env.get("CUDA_HOME"):
        env["CUDA_HOME"] = _toolkit_home()
    r = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=src, env=env, capture_output=True,
                       text=True, timeout=1200)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert list((src / "exgrpo").glob("_C*.so")), "build_ext reported success but wrote no exgrpo/_C*.so"
    r = subprocess.run([sys.executable, "-c", BUILT_SCRIPT, str(src)], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    rec = json.loads(r.stdout.strip().splitlines()[-1])
    assert all(rec["in_doc"].values()), f"schemas not in cuda_backend's docstring: {rec['schemas']}"
    for dt in ("torch.bfloat16", "torch.float16", "torch.float32"):
        assert rec["fake"][dt] == [[5], "torch.float32", [5], [0],
                                   "GeneratedBackwardFor_exgrpo_lmhead_stats_defaultBackward"], (dt, rec["fake"][dt])
    assert rec["fake"]["advantages"] == [[8], "torch.bool"]
    assert rec["fake"]["loss_terms"] == [[3, 7], [], [5], "GeneratedBackwardFor_exgrpo_loss_terms_defaultBackward",
                                         False]
