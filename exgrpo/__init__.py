"""exgrpo: Explanatory Inversion + ExGRPO on fused LM-head kernels.

Importing the package imports nothing heavy: the kernels, the CUDA extension and the optional GPU libraries are
imported by the modules that use them. Its one side effect is `_claim_kernels_name` below.
"""
import sys
from pathlib import Path

__version__ = "0.1.0"


def _claim_kernels_name() -> None:
    """transformers >= 5.25 depends on Hugging Face's `kernels` package and imports it by that top-level name.
    Run from this repository's root (`python -m`, `python -m pytest`: the working directory comes first on
    sys.path), the name finds our own kernels/ folder, installed as `exgrpo.kernels`, and transformers fails to
    load a model. Hugging Face's package, where installed, is imported here with the repository root left off
    the path, so the name is theirs; our kernels are only ever imported as `exgrpo.kernels`."""
    if "kernels" in sys.modules:
        return
    root = Path(__file__).resolve().parents[1]
    if not (root / "kernels" / "__init__.py").is_file():
        return                                         # an installed copy: no folder of ours to shadow theirs
    here = [p for p in sys.path if Path(p or ".").resolve() == root]
    if not here:
        return
    saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if p not in here]
    try:
        import kernels  # noqa: F401  (Hugging Face's, when installed)
    except ImportError:
        pass
    finally:
        sys.path[:] = saved


_claim_kernels_name()
