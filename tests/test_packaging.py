"""A wheel ships exactly the packages pyproject lists: every exgrpo subpackage must be there."""
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent


def test_every_subpackage_is_listed_and_kernels_is_not_top_level():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    found = {"exgrpo"} | {"exgrpo." + p.parent.relative_to(ROOT / "exgrpo").as_posix().replace("/", ".")
                          for p in (ROOT / "exgrpo").rglob("__init__.py") if p.parent != ROOT / "exgrpo"}
    found.add("exgrpo.kernels")
    assert found <= listed, f"missing from [tool.setuptools] packages: {sorted(found - listed)}"
    assert cfg["package-dir"]["exgrpo.kernels"] == "kernels"
    assert "kernels" not in listed


def test_transformers_loads_a_model_when_run_from_the_repository_root():
    """transformers >= 5.25 imports Hugging Face's `kernels` by that top-level name; from the repository root the
    name would find our kernels/ folder (exgrpo._claim_kernels_name keeps it theirs). `python -c` puts the
    working directory first on sys.path, as `python -m exgrpo` and `python -m pytest` do."""
    import subprocess
    import sys
    code = ("import exgrpo, importlib.util, sys\n"
            "import transformers.integrations.hub_kernels\n"
            "from transformers import AutoModelForCausalLM\n"
            "import exgrpo.kernels\n"
            "k = sys.modules.get('kernels')\n"
            "assert k is None or 'site-packages' in (k.__file__ or ''), k\n"
            "assert exgrpo.kernels.__file__.startswith(sys.argv[1]), exgrpo.kernels.__file__\n")
    r = subprocess.run([sys.executable, "-c", code, str(ROOT / "kernels")], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
