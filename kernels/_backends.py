"""Backend registry and selection.

A backend is an LM-head epilogue plus implementations of the two small steps (advantages, per-token
loss terms). `auto` picks cuda, then triton, for CUDA tensors and torch for CPU tensors;
EXGRPO_BACKEND overrides `auto`. Asking for a backend that cannot run raises and says why.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from . import _lmhead, _loss

NAMES = ("torch", "triton", "cuda")


@dataclass(frozen=True)
class Backend:
    name: str
    epilogue: Any
    loss_terms: Callable
    advantages: Callable


def _torch_backend() -> Backend:
    return Backend("torch", _lmhead.TorchEpilogue(), _loss.loss_terms_torch, _loss.advantages_torch)


def _triton_backend() -> Backend:
    from . import triton_lmhead, triton_loss
    return Backend("triton", triton_lmhead.TritonEpilogue(), triton_loss.loss_terms, triton_loss.advantages)


def _cuda_backend() -> Backend:
    from . import cuda_backend
    return Backend("cuda", cuda_backend.CudaEpilogue(), cuda_backend.loss_terms, cuda_backend.advantages)


def unavailable_reason(name: str, device: torch.device) -> str | None:
    """None if `name` can run on tensors of `device`, else a sentence saying why not."""
    if name == "torch":
        return None
    if name == "triton":
        try:
            import triton  # noqa: F401
        except ImportError as e:
            return f"triton is not importable ({e})"
        interp = os.environ.get("TRITON_INTERPRET", "0") == "1"
        if device.type == "cuda":
            return None if not interp else ("TRITON_INTERPRET=1 is set, which runs Triton on the CPU; unset it "
                                            "to run on CUDA tensors")
        if device.type == "cpu":
            return None if interp else ("Triton runs on CPU tensors only in its interpreter: set "
                                        "TRITON_INTERPRET=1 before exgrpo.kernels is imported")
        return f"Triton does not run on {device.type} tensors"
    if name == "cuda":
        from . import cuda_backend
        return cuda_backend.unavailable_reason(device)
    return f"unknown backend {name!r}"


_CACHE: dict[str, Backend] = {}


def get(name: str | Backend, device: torch.device) -> Backend:
    if isinstance(name, Backend):               # a caller's own (exgrpo.plan's shape-only epilogue)
        return name
    if name == "auto":
        name = os.environ.get("EXGRPO_BACKEND", "auto") or "auto"
    if name == "auto":
        order = ("cuda", "triton", "torch") if device.type == "cuda" else ("torch",)
        name = next(n for n in order if unavailable_reason(n, device) is None)
    if name not in NAMES:
        raise ValueError(f"unknown backend {name!r}; choose one of 'auto', {', '.join(map(repr, NAMES))}")
    why = unavailable_reason(name, device)
    if why is not None:
        usable = [n for n in NAMES if unavailable_reason(n, device) is None]
        raise RuntimeError(f"backend {name!r} is unavailable: {why}. Available here: {usable}")
    if name not in _CACHE:
        _CACHE[name] = {"torch": _torch_backend, "triton": _triton_backend, "cuda": _cuda_backend}[name]()
    return _CACHE[name]


def available(device: str | torch.device = "cpu") -> dict[str, str | None]:
    """{backend: None if usable, else why not} for tensors on `device`."""
    device = torch.device(device)
    return {n: unavailable_reason(n, device) for n in NAMES}
