"""Input validation shared by every backend.

A kernel that reads a target out of range faults or, worse, returns a number. So every public entry
point checks here first and raises a ValueError/TypeError that names the argument. The checks that
need values (target range, finiteness of the small per-token tensors) cost one host sync each; the
big operands (hidden, weight) are checked for finiteness through the outputs instead, which is free
(see `check_finite_outputs`).
"""
from __future__ import annotations

import torch

from .reference import IGNORE_INDEX

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
REDUCTIONS = ("token_mean", "seq_mean", "constant")


def _need(cond: bool, msg: str, exc=ValueError):
    if not cond:
        raise exc(msg)


def check_lm_head(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                  temperature: float, softcap: float | None, hidden_rank: int | None = None) -> None:
    _need(isinstance(hidden, torch.Tensor), f"hidden must be a tensor, got {type(hidden).__name__}", TypeError)
    _need(isinstance(weight, torch.Tensor), f"weight must be a tensor, got {type(weight).__name__}", TypeError)
    _need(isinstance(targets, torch.Tensor), f"targets must be a tensor, got {type(targets).__name__}",
          TypeError)
    _need(hidden.dtype in FLOAT_DTYPES, f"hidden must be bf16, fp16 or fp32, got {hidden.dtype}", TypeError)
    _need(weight.dtype == hidden.dtype,
          f"weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}", TypeError)
    _need(targets.dtype == torch.int64, f"targets must be int64, got {targets.dtype}", TypeError)
    _need(hidden.dim() >= 1, "hidden must have at least one dimension [..., H]")
    if hidden_rank is not None:
        _need(hidden.dim() == hidden_rank, f"hidden must be [B, L, H], got shape {tuple(hidden.shape)}")
    _need(weight.dim() == 2, f"weight must be [V, H], got shape {tuple(weight.shape)}")
    _need(weight.shape[1] == hidden.shape[-1],
          f"hidden size mismatch: hidden is [..., {hidden.shape[-1]}] but weight is {list(weight.shape)}")
    _need(targets.shape == hidden.shape[:-1],
          f"targets shape {tuple(targets.shape)} must equal hidden.shape[:-1] = {tuple(hidden.shape[:-1])}")
    _need(hidden.device == weight.device, f"hidden is on {hidden.device} but weight is on {weight.device}")
    _need(targets.device == hidden.device, f"targets is on {targets.device} but hidden is on {hidden.device}")
    _need(isinstance(temperature, (int, float)) and temperature > 0 and temperature == temperature
          and temperature != float("inf"), f"temperature must be a finite number > 0, got {temperature!r}")
    _need(softcap is None or (isinstance(softcap, (int, float)) and 0 < softcap < float("inf")),
          f"softcap must be None or a finite number > 0, got {softcap!r}")
    if targets.numel():
        V = weight.shape[0]
        bad = (targets != IGNORE_INDEX) & ((targets < 0) | (targets >= V))
        if bool(bad.any()):
            first = targets[bad].flatten()[0].item()
            raise ValueError(f"targets has values outside [0, {V}) other than {IGNORE_INDEX} (e.g. {first})")


def check_finite_outputs(lse: torch.Tensor, valid: torch.Tensor, hidden: torch.Tensor,
                         weight: torch.Tensor) -> None:
    """Non-finite hidden or weight makes the log-sum-exp of the rows that see it non-finite.

    Checking the [N] log-sum-exp costs nothing next to the GEMMs; only on failure do we scan the big
    operands to name the culprit.
    """
    if bool(torch.isfinite(lse[valid]).all()):
        return
    if not bool(torch.isfinite(hidden).all()):
        raise ValueError("hidden contains NaN or Inf")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError("weight contains NaN or Inf")
    raise ValueError("logits overflowed to a non-finite log-sum-exp (check temperature and the scale of "
                     "hidden/weight)")


def check_loss_inputs(logp_shape, device, mask, advantages, old_logp, ref_logp, weights, sft_mask, *,
                      eps_low, eps_high, beta, aux_coef, reduction) -> None:
    """The per-token operands of policy_loss / fused_exgrpo_loss. logp_shape is [B, L]."""
    _need(len(logp_shape) == 2, f"logp must be [B, L], got shape {tuple(logp_shape)}")
    B, L = logp_shape
    _need(reduction in REDUCTIONS, f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    for name, v in (("eps_low", eps_low), ("eps_high", eps_high), ("beta", beta), ("aux_coef", aux_coef)):
        _need(isinstance(v, (int, float)) and 0 <= v < float("inf"), f"{name} must be a finite number >= 0, "
              f"got {v!r}")
    _need(eps_low < 1, f"eps_low must be < 1 (the ratio's lower clip is 1 - eps_low), got {eps_low}")
    _need(isinstance(mask, torch.Tensor) and mask.dtype == torch.bool, "mask must be a bool tensor", TypeError)
    _need(tuple(mask.shape) == (B, L), f"mask shape {tuple(mask.shape)} must be {(B, L)}")
    _need(isinstance(advantages, torch.Tensor) and advantages.dtype.is_floating_point,
          "advantages must be a floating tensor", TypeError)
    _need(tuple(advantages.shape) in ((B,), (B, L)),
          f"advantages shape {tuple(advantages.shape)} must be ({B},) or {(B, L)}")
    tensors = {"mask": mask, "advantages": advantages}
    for name, t in (("old_logp", old_logp), ("ref_logp", ref_logp)):
        if t is None:
            continue
        _need(isinstance(t, torch.Tensor) and t.dtype.is_floating_point, f"{name} must be a floating tensor",
              TypeError)
        _need(tuple(t.shape) == (B, L), f"{name} shape {tuple(t.shape)} must be {(B, L)}")
        tensors[name] = t
    if weights is not None:
        _need(isinstance(weights, torch.Tensor) and weights.dtype.is_floating_point,
              "weights must be a floating tensor", TypeError)
        _need(tuple(weights.shape) in ((B,), (B, L)),
              f"weights shape {tuple(weights.shape)} must be ({B},) or {(B, L)}")
        tensors["weights"] = weights
    if sft_mask is not None:
        _need(isinstance(sft_mask, torch.Tensor) and sft_mask.dtype == torch.bool, "sft_mask must be a bool "
              "tensor", TypeError)
        _need(tuple(sft_mask.shape) == (B, L), f"sft_mask shape {tuple(sft_mask.shape)} must be {(B, L)}")
        tensors["sft_mask"] = sft_mask
    for name, t in tensors.items():
        _need(t.device == device, f"{name} is on {t.device} but logp/hidden is on {device}")
    # Finiteness only where the value is used: masked-out positions may hold anything.
    for name in ("old_logp", "ref_logp"):
        t = tensors.get(name)
        if t is not None and not bool(torch.isfinite(t[mask]).all()):
            raise ValueError(f"{name} contains NaN or Inf at unmasked positions")
    if not bool(torch.isfinite(advantages).all()):
        raise ValueError("advantages contains NaN or Inf")
    if weights is not None and not bool(torch.isfinite(weights).all()):
        raise ValueError("weights contains NaN or Inf")
