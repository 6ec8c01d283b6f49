"""Shared test helpers: errors against the float64 spec, bounded by eager PyTorch's own error.

Truth is the spec (exgrpo.kernels.reference) in float64. A kernel at a given precision (fp32, bf16,
fp16) may be off the truth by at most twice what the same spec computed in eager PyTorch at that
precision is off. Eager's error comes from the same BLAS on the same machine, so the bound moves
with the CPU's fp32 rounding (Intel MKL and AMD BLIS/OpenBLAS differ) without being loose anywhere.
"""
from __future__ import annotations


def assert_like_eager(out, ref, eager, name, factor=2.0, propagated=0.0):
    """`out` may be off the float64 truth `ref` by at most `factor` × what `eager` (the same computation
    in eager PyTorch at out's precision) is off, plus a hair (1e-6 of the largest |ref|, about 8 fp32
    ulps) for the cases where eager happens to be exact.

    For a reduction to one number (a loss), eager's error is a single draw, and a lucky one (errors that
    cancel) says nothing about the next: `propagated` (see `propagated_error`) stands in for it when larger."""
    ref = ref.double()
    err = (out.double() - ref).abs().max().item()
    err_eager = max((eager.double() - ref).abs().max().item(), propagated)
    floor = 1e-6 * ref.abs().max().item()
    assert err <= factor * err_eager + floor, (
        f"{name}: max abs err {err:.3e} > {factor} x eager's {err_eager:.3e} "
        f"(mean abs err {(out.double() - ref).abs().mean().item():.3e} vs "
        f"{(eager.double() - ref).abs().mean().item():.3e})")


def propagated_error(grad, inputs, inputs_ref) -> float:
    """Σ |∂out/∂x_i| · |x_i − x_i_ref|: to first order, the largest error a reduction can have when it is
    computed from inputs `inputs` (eager's, at the low precision) instead of the truth `inputs_ref`, with
    `grad` its float64 gradient. The kernel's inputs to the reduction (its log-probs) are no more accurate
    than eager's, checked elementwise by the same rule."""
    return (grad.double().abs() * (inputs.double() - inputs_ref.double()).abs()).sum().item()


def assert_all_like_eager(names, outs, refs, eagers, label, factor=2.0):
    for name, o, r, e in zip(names, outs, refs, eagers, strict=True):
        assert_like_eager(o, r, e, f"{label} {name}", factor)


def exported_weights(folder) -> dict:
    """Every tensor of the safetensors files in a model folder (an export, a checkpoint's model/)."""
    from pathlib import Path

    from safetensors.torch import load_file
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out
