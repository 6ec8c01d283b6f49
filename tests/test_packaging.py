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
