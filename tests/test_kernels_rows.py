"""Work the LM head skips: rows whose log-prob nobody uses (prompt tokens, padding, untrained turns)
never reach the GEMMs, and a frozen LM-head weight (LoRA) gets no dW GEMM. Values and gradients
still match the float64 spec, which computes every row."""
import exgrpo.kernels as K
import pytest
import torch
from _helpers import assert_all_like_eager, assert_like_eager, propagated_error
from exgrpo.kernels import _lmhead
from exgrpo.kernels import reference as R


@pytest.fixture
def sweeps(monkeypatch):
    """Records the row count and the gradient flags of every pass over the LM head."""
    calls = []
    real = _lmhead._sweep

    def spy(hidden, weight, targets, epi, **kw):
        calls.append({"rows": hidden.shape[0], "need_dh": kw.get("need_dh", True),
                      "need_dW": kw.get("need_dW", True), "grad": kw.get("coef_fn") or kw.get("grad_from")})
        return real(hidden, weight, targets, epi, **kw)

    monkeypatch.setattr(_lmhead, "_sweep", spy)
    return calls


def prompt_heavy_batch(B, L, H, V, seed, completion=7):
    """Sequences shaped like rollouts: a long prompt (targets defined, nothing trained), a short
    trained completion at a different place per row, then padding."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, L, H, generator=g, dtype=torch.float64)
    W = torch.randn(V, H, generator=g, dtype=torch.float64) * 2 / H**0.5
    t = torch.randint(0, V, (B, L), generator=g)
    mask = torch.zeros(B, L, dtype=torch.bool)
    for b in range(B):
        end = L - int(torch.randint(0, 5, (1,), generator=g))
        t[b, end:] = -100
        mask[b, end - completion:end] = True
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    with torch.no_grad():
        lp = R.token_logprobs_ref(h, W, t)
    old = lp + 0.3 * torch.randn(B, L, generator=g, dtype=torch.float64)
    ref = lp + 0.3 * torch.randn(B, L, generator=g, dtype=torch.float64)
    return h, W, t, mask, adv, old, ref


@pytest.mark.parametrize("freeze_weight", [False, True])
def test_fused_loss_runs_only_trained_rows(backend, freeze_weight, sweeps):
    B, L, H, V = 5, 41, 24, 1031
    h, W, t, mask, adv, old, ref = prompt_heavy_batch(B, L, H, V, seed=11)

    def run(fn, dtype, **kw):
        hh = h.to(dtype, copy=True).requires_grad_()
        WW = W.to(dtype, copy=True).requires_grad_(not freeze_weight)
        f = torch.float64 if dtype == torch.float64 else torch.float32
        loss, m = fn(hh, WW, t, mask, adv.to(f), old_logp=old.to(f), ref_logp=ref.to(f), beta=0.1, **kw)
        loss.backward()
        return loss.detach(), m, hh.grad, WW.grad

    want, eager = run(R.fused_exgrpo_loss_ref, torch.float64), run(R.fused_exgrpo_loss_ref, torch.float32)
    got = run(K.fused_exgrpo_loss, torch.float32, backend=backend)
    lp64 = R.token_logprobs_ref(h, W, t).requires_grad_()
    R.policy_loss_ref(lp64, old, ref, adv, mask, beta=0.1)[0].backward()
    from_logp = propagated_error(lp64.grad, R.token_logprobs_ref(h.float(), W.float(), t), lp64.detach())
    assert_like_eager(got[0], want[0], eager[0], "loss", propagated=from_logp)
    for k in ("kl", "ratio", "clip_frac_low", "clip_frac_high"):
        assert_like_eager(got[1][k], want[1][k], eager[1][k], k)
    assert_like_eager(got[2], want[2], eager[2], "d_hidden")
    assert got[2][~mask].abs().max() == 0                       # untrained rows get exactly no gradient
    if freeze_weight:
        assert got[3] is None
    else:
        assert_like_eager(got[3], want[3], eager[3], "d_weight")
    (call,) = [c for c in sweeps if c["grad"] is not None]
    assert call["rows"] == int(mask.sum()) < B * L
    assert call["need_dW"] is (not freeze_weight) and call["need_dh"] is True


def test_token_logprobs_skips_ignored_rows(backend, sweeps):
    B, L, H, V = 4, 23, 16, 517
    h, W, t, mask, *_ = prompt_heavy_batch(B, L, H, V, seed=5)
    t = torch.where(mask, t, torch.full_like(t, -100))           # old/ref log-probs: trained tokens only
    g = torch.Generator().manual_seed(3)
    g_lp, g_ent = torch.randn(B, L, generator=g, dtype=torch.float64), torch.randn(B, L, generator=g,
                                                                                   dtype=torch.float64)

    def run(fn, dtype, **kw):
        hh, WW = h.to(dtype, copy=True).requires_grad_(), W.to(dtype, copy=True).requires_grad_()
        lp, ent = fn(hh, WW, t, return_entropy=True, **kw)
        ((lp.double() * g_lp).sum() + (ent.double() * g_ent).sum()).backward()
        return lp.detach(), ent.detach(), hh.grad, WW.grad

    want, eager = run(R.token_logprobs_ref, torch.float64), run(R.token_logprobs_ref, torch.float32)
    got = run(K.token_logprobs, torch.float32, backend=backend)
    assert_all_like_eager(("logp", "entropy", "d_hidden", "d_weight"), got, want, eager, backend)
    assert got[0].shape == (B, L) and got[0][~mask].abs().max() == 0 and got[1][~mask].abs().max() == 0
    assert {c["rows"] for c in sweeps} == {int(mask.sum())}    # forward and the recomputing backward


def test_frozen_weight_token_logprobs_has_no_dW(sweeps):
    h = torch.randn(9, 8, dtype=torch.float64, requires_grad=True)
    W = torch.randn(50, 8, dtype=torch.float64)
    t = torch.randint(0, 50, (9,))
    K.token_logprobs(h.float(), W.float(), t, backend="torch").sum().backward()
    h2 = h.detach().clone().requires_grad_()
    R.token_logprobs_ref(h2, W, t).sum().backward()
    h3 = h.detach().float().requires_grad_()
    R.token_logprobs_ref(h3, W.float(), t).sum().backward()
    assert_like_eager(h.grad, h2.grad, h3.grad, "d_hidden")
    backward = [c for c in sweeps if c["grad"] is not None]
    assert len(backward) == 1 and backward[0]["need_dW"] is False
