"""Optional CUDA extension exgrpo._C (csrc/). A no-op until csrc/ holds kernels.

Everything else is declared in pyproject.toml.
"""
from setuptools import setup

setup()
