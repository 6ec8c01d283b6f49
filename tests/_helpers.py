"""Shared test helpers: error measures relative to the float64 spec and to bf16 eager PyTorch."""
from __future__ import annotations

import torch


def max_rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out − ref| / max |ref| (max-norm relative error; 0-safe)."""
    ref = ref.double()
    return ((out.double() - ref).abs().max() / ref.abs().max().clamp(min=1e-30)).item()


def assert_rel(out, ref, tol, name):
    err = max_rel(out, ref)
    mean = (out.double() - ref.double()).abs().mean().item()
    assert err <= tol, f"{name}: max rel err {err:.3e} > {tol:.1e} (mean abs err {mean:.3e})"


def assert_like_eager(out, ref, eager, name, factor=2.0):
    """A low-precision result may be off the float64 truth by at most `factor` × what the same
    computation in eager PyTorch at that precision is off (plus a hair for ties at zero error)."""
    ref = ref.double()
    err = (out.double() - ref).abs().max().item()
    err_eager = (eager.double() - ref).abs().max().item()
    floor = 1e-6 * ref.abs().max().item()
    assert err <= factor * err_eager + floor, (
        f"{name}: max abs err {err:.3e} > {factor} x eager's {err_eager:.3e} "
        f"(mean abs err {(out.double() - ref).abs().mean().item():.3e} vs "
        f"{(eager.double() - ref).abs().mean().item():.3e})")


def backends():
    from exgrpo.kernels import available
    return [name for name, why in available("cpu").items() if why is None]
