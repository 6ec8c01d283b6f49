"""exgrpo: Explanatory Inversion + ExGRPO on fused LM-head kernels.

Importing the package has no side effects: the kernels, the CUDA extension and the optional GPU
libraries are imported by the modules that use them.
"""

__version__ = "0.1.0"
