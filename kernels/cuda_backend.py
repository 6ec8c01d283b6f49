"""The "cuda" backend: the shared chunk driver (_lmhead._sweep: cuBLAS GEMMs through torch.mm) around
the CUDA C++ epilogue of csrc/, plus csrc/'s advantages and loss-terms kernels.

Per chunk of n rows:  x = h @ Wᵀ (cuBLAS)  ->  torch.ops.exgrpo.lmhead_stats(x)  ->  coef (loss_terms)
->  torch.ops.exgrpo.lmhead_stats_backward_inplace(x)  ->  dh = x @ W, dW += xᵀ @ h (cuBLAS).

The ops live in the optional extension exgrpo._C (built by setup.py where CUDA torch and nvcc exist).
Nothing is imported at exgrpo import time: `unavailable_reason` tries the import once, on demand, and
says why the backend cannot run (CPU torch, extension not built, tensors not on a GPU).

Op schemas (csrc/bindings.cpp), all CUDA-only:
    lmhead_stats(Tensor x, Tensor targets, float inv_temp, float? softcap, bool want_entropy)
        -> (Tensor lse, Tensor zt, Tensor ent)                       x [n, V]; outputs [n] fp32 ([0] ent if not wanted)
    lmhead_stats_backward_inplace(Tensor(a!) x, Tensor targets, Tensor lse, Tensor? ent, Tensor g_lse,
        Tensor g_zt, Tensor? g_ent, float inv_temp, float? softcap) -> ()    x := VJP of lmhead_stats
    advantages(Tensor outcome, Tensor is_full, float delta, float nu, float eps, bool by_scenario)
        -> (Tensor centred, Tensor scaled, Tensor total, Tensor fired)
    loss_terms(Tensor logp, Tensor adv, Tensor scale, Tensor aux, Tensor mask, Tensor? old, Tensor? ref,
        Tensor? sft, float eps_low, float eps_high, float beta) -> (Tensor coef, Tensor loss, Tensor metrics)

Autograd: lmhead_stats is differentiable in x (its backward is lmhead_stats_backward_inplace on a copy of
x); loss_terms is differentiable in logp through `loss` (∂loss/∂logp = coef; coef and the metric sums
are marked non-differentiable, like the detached metrics of policy_loss); advantages has no gradient
(rewards are data). Rows whose target is -100 get lse = zt = ent = 0 (constants, so zero gradient).
"""
from __future__ import annotations

import torch

from ._loss import LossSpec, TokenTerms

_STATE: dict = {"loaded": False, "error": None}


def _load() -> str | None:
    """Import exgrpo._C once and register the Python side of its ops. None on success, else why not."""
    if _STATE["loaded"]:
        return None
    if _STATE["error"] is not None:
        return _STATE["error"]
    try:
        from exgrpo import _C  # noqa: F401  (runs the extension's TORCH_LIBRARY registration)
    except (ImportError, OSError) as e:                         # not built, or built against another torch
        _STATE["error"] = f"{type(e).__name__}: {e}"
        return _STATE["error"]
    _register_fake_and_autograd()
    _STATE["loaded"] = True
    return None


def unavailable_reason(device: torch.device) -> str | None:
    """None if the cuda backend can run on tensors of `device`, else a sentence saying why not."""
    if torch.version.cuda is None:
        return (f"this torch ({torch.__version__}) is a CPU build, and the CUDA C++ extension exgrpo._C needs "
                "CUDA torch")
    why = _load()
    if why is not None:
        return ("the CUDA C++ extension exgrpo._C is not importable (" + why + "); build it with "
                "`EXGRPO_BUILD_CUDA=1 pip install --no-build-isolation -e .`")
    if device.type != "cuda":
        return f"its kernels run on CUDA tensors only, not {device.type}"
    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    return None


def _ops():
    return torch.ops.exgrpo


# ----------------------------------------------------------------------------- fake and autograd registration

def _register_fake_and_autograd() -> None:
    f32 = torch.float32

    @torch.library.register_fake("exgrpo::lmhead_stats")
    def _stats_fake(x, targets, inv_temp, softcap, want_entropy):
        n = x.shape[0]
        return x.new_empty(n, dtype=f32), x.new_empty(n, dtype=f32), x.new_empty(n if want_entropy else 0, dtype=f32)

    @torch.library.register_fake("exgrpo::lmhead_stats_backward_inplace")
    def _backward_fake(x, targets, lse, ent, g_lse, g_zt, g_ent, inv_temp, softcap):
        return None

    @torch.library.register_fake("exgrpo::advantages")
    def _adv_fake(outcome, is_full, delta, nu, eps, by_scenario):
        return (torch.empty_like(outcome), torch.empty_like(outcome), torch.empty_like(outcome),
                outcome.new_empty(outcome.shape[0], dtype=torch.bool))

    @torch.library.register_fake("exgrpo::loss_terms")
    def _loss_fake(logp, adv, scale, aux, mask, old, ref, sft, eps_low, eps_high, beta):
        return torch.empty_like(logp), logp.new_empty((), dtype=f32), logp.new_empty(5, dtype=f32)

    def stats_setup(ctx, inputs, output):
        x, targets, inv_temp, softcap, want_entropy = inputs
        _, _, ent = output
        ctx.save_for_backward(x, targets, output[0], ent if want_entropy else None)
        ctx.cfg = (inv_temp, softcap)

    def stats_backward(ctx, g_lse, g_zt, g_ent):
        x, targets, lse, ent = ctx.saved_tensors
        inv_temp, softcap = ctx.cfg
        zeros = lambda g: torch.zeros_like(lse) if g is None else g.float().contiguous()
        g_ent = None if (ent is None or g_ent is None) else g_ent.float().contiguous()
        dx = x.clone()
        _ops().lmhead_stats_backward_inplace(dx, targets, lse, ent if g_ent is not None else None, zeros(g_lse),
                                             zeros(g_zt), g_ent, inv_temp, softcap)
        return dx, None, None, None, None

    torch.library.register_autograd("exgrpo::lmhead_stats", stats_backward, setup_context=stats_setup)

    def loss_setup(ctx, inputs, output):
        coef, _, metrics = output
        ctx.mark_non_differentiable(coef, metrics)
        ctx.save_for_backward(coef)

    def loss_backward(ctx, g_coef, g_loss, g_metrics):
        (coef,) = ctx.saved_tensors
        return (None if g_loss is None else g_loss * coef,) + (None,) * 10

    torch.library.register_autograd("exgrpo::loss_terms", loss_backward, setup_context=loss_setup)

    def adv_setup(ctx, inputs, output):
        ctx.mark_non_differentiable(*output)

    def adv_backward(ctx, *grads):                              # unreachable: every output is non-differentiable
        return (None,) * 6

    torch.library.register_autograd("exgrpo::advantages", adv_backward, setup_context=adv_setup)


# ----------------------------------------------------------------------------- the backend's pieces

def _cap(softcap):
    return None if softcap is None else float(softcap)


class CudaEpilogue:
    """The chunk epilogue as two CUDA kernels: one read of the chunk for the statistics, one read and
    write for the gradient in place. No temporaries beyond [n]-sized vectors."""
    name = "cuda"
    extra_bytes_per_logit = 0

    def stats(self, x, targets, lse, zt, ent, inv_temp, softcap):
        if x.shape[0] == 0:
            return
        l, z, e = _ops().lmhead_stats(x, targets, float(inv_temp), _cap(softcap), ent is not None)
        lse.copy_(l)                                            # [n] fp32 each: noise next to the [n, V] pass
        zt.copy_(z)
        if ent is not None:
            ent.copy_(e)

    def grad_(self, x, targets, lse, ent, g_lp, g_ent, inv_temp, softcap):
        if x.shape[0] == 0:
            return
        # logp = z_t − lse, so ∂L/∂z_t = g_lp and ∂L/∂lse = −g_lp
        g_lp = g_lp.float().contiguous()
        g_ent = None if g_ent is None else g_ent.float().contiguous()
        _ops().lmhead_stats_backward_inplace(x, targets.contiguous(), lse.contiguous(),
                                             None if g_ent is None else ent.contiguous(), -g_lp, g_lp, g_ent,
                                             float(inv_temp), _cap(softcap))


def advantages(outcome, is_full, *, delta, nu, eps, by_scenario):
    """Same contract as _loss.advantages_torch: (centred, group-scaled, total, fired)."""
    return _ops().advantages(outcome.float().contiguous(), is_full.contiguous(), float(delta), float(nu), float(eps),
                             bool(by_scenario))


def loss_terms(logp: torch.Tensor, t: TokenTerms, spec: LossSpec):
    """Same contract as _loss.loss_terms_torch: (coef [n] fp32, sums [N_SUMS] fp32)."""
    opt = lambda v: None if v is None else v.contiguous()
    coef, loss, metrics = _ops().loss_terms(
        logp.float().contiguous(), t.adv.contiguous(), t.scale.contiguous(), t.aux.contiguous(), t.mask.contiguous(),
        opt(t.old), opt(t.ref), opt(t.sft), float(spec.eps_low), float(spec.eps_high), float(spec.beta))
    return coef, torch.cat([loss.reshape(1), metrics])
