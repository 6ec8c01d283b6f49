"""policy_loss and fused_exgrpo_loss against the float64 spec: loss, metrics and gradients, every
backend (the `backend` fixture), each bounded by the spec's own error in eager PyTorch at that precision."""

import zlib

import exgrpo.kernels as K
import pytest
import torch
from _helpers import assert_all_like_eager, assert_like_eager, propagated_error
from exgrpo.kernels import reference as R


def make_batch(B, L, H, V, *, seed, off_policy=True, with_ref=True, weights=None, sft=True, temperature=1.0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, L, H, generator=g, dtype=torch.float64)
    W = torch.randn(V, H, generator=g, dtype=torch.float64) * 2 / H**0.5
    t = torch.randint(0, V, (B, L), generator=g)
    pad = torch.rand(B, L, generator=g) < 0.15  # heavy padding, scattered
    t[pad] = -100
    mask = (torch.rand(B, L, generator=g) < 0.6) & ~pad
    mask[0] = False  # one fully masked sequence
    sft_mask = ((torch.rand(B, L, generator=g) < 0.4) & ~pad & ~mask) if sft else None
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    adv[1], adv[-1] = adv[1].abs() + 0.1, -adv[-1].abs() - 0.1  # both signs on unmasked sequences
    with torch.no_grad():
        lp = R.token_logprobs_ref(h, W, t, temperature=temperature)
    # off-policy drift large enough that both clip sides and both advantage signs occur
    old = (lp + 0.4 * torch.randn(B, L, generator=g, dtype=torch.float64)) if off_policy else None
    ref = (lp + 0.3 * torch.randn(B, L, generator=g, dtype=torch.float64)) if with_ref else None
    if weights == "seq":
        weights = torch.rand(B, generator=g, dtype=torch.float64) + 0.5
    elif weights == "token":
        weights = torch.rand(B, L, generator=g, dtype=torch.float64) + 0.5
    return dict(h=h, W=W, t=t, mask=mask, sft_mask=sft_mask, adv=adv, old=old, ref=ref, weights=weights)


def as_dtype(x, dtype):
    return None if x is None else (x.to(dtype) if x.dtype.is_floating_point else x)


def fused(fn, b, dtype, grad_scale=1.0, **kw):
    h = b["h"].to(dtype, copy=True).requires_grad_()
    W = b["W"].to(dtype, copy=True).requires_grad_()
    f32 = torch.float64 if dtype == torch.float64 else torch.float32
    loss, metrics = fn(
        h,
        W,
        b["t"],
        b["mask"],
        as_dtype(b["adv"], f32),
        old_logp=as_dtype(b["old"], f32),
        ref_logp=as_dtype(b["ref"], f32),
        weights=as_dtype(b["weights"], f32),
        sft_mask=b["sft_mask"],
        **kw,
    )
    (loss * grad_scale).backward()
    return loss.detach(), metrics, h.grad, W.grad


def assert_metrics_like_eager(out, ref, eager, label):
    for k in ref:
        assert_like_eager(out[k], ref[k], eager[k], f"{label} metric {k}")


def loss_error_from_logprobs(b, dtype, temperature=1.0, softcap=None, **kw):
    """The loss error that eager's log-probs at `dtype` propagate to (helpers.propagated_error)."""
    lp64 = R.token_logprobs_ref(b["h"], b["W"], b["t"], temperature=temperature, softcap=softcap)
    lp_e = R.token_logprobs_ref(b["h"].to(dtype), b["W"].to(dtype), b["t"], temperature=temperature, softcap=softcap)
    leaf = lp64.clone().requires_grad_()
    loss, _ = R.policy_loss_ref(leaf, b["old"], b["ref"], b["adv"], b["mask"], weights=b["weights"],
                                sft_mask=b["sft_mask"], **kw)
    loss.backward()
    return propagated_error(leaf.grad, lp_e, lp64)


def versus_spec(backend, b, dtype, label, chunk_mb=None, grad_scale=1.0, **kw):
    """The fused loss at `dtype` against the float64 spec: loss, d_hidden, d_weight and every metric within
    2x the spec's own error at `dtype` (for the loss, a scalar: within 2x the error eager's log-probs carry
    into it, when that is larger)."""
    ref = fused(R.fused_exgrpo_loss_ref, b, torch.float64, grad_scale=grad_scale, **kw)
    eager = fused(R.fused_exgrpo_loss_ref, b, dtype, grad_scale=grad_scale, **kw)
    out = fused(K.fused_exgrpo_loss, b, dtype, grad_scale=grad_scale, backend=backend, chunk_mb=chunk_mb, **kw)
    assert_like_eager(out[0], ref[0], eager[0], f"{backend} {label} loss",
                      propagated=loss_error_from_logprobs(b, dtype, **kw))
    pick = lambda r: (r[2], r[3])
    assert_all_like_eager(("d_hidden", "d_weight"), pick(out), pick(ref), pick(eager), f"{backend} {label}")
    if dtype == torch.float32:
        assert_metrics_like_eager(out[1], ref[1], eager[1], f"{backend} {label}")
    return out, ref


VARIANTS = [
    # reduction, off_policy, with_ref, weights, sft, aux_coef, beta
    ("token_mean", True, True, None, True, 0.1, 0.04),
    ("token_mean", False, True, "token", False, 0.0, 0.04),  # on-policy
    ("seq_mean", True, True, "seq", True, 0.3, 0.1),
    ("constant", True, False, None, True, 0.1, 0.04),  # no reference model
    ("constant", False, True, "token", True, 0.2, 0.0),  # beta = 0
]


@pytest.mark.parametrize("reduction,off_policy,with_ref,weights,sft,aux_coef,beta", VARIANTS)
def test_fused_loss_fp32(backend, reduction, off_policy, with_ref, weights, sft, aux_coef, beta):
    b = make_batch(
        5,
        23,
        40,
        1031,
        seed=zlib.crc32(repr((reduction, off_policy, weights)).encode()) % 1000,
        off_policy=off_policy,
        with_ref=with_ref,
        weights=weights,
        sft=sft,
        temperature=0.8,
    )
    kw = dict(reduction=reduction, aux_coef=aux_coef, beta=beta, eps_low=0.2, eps_high=0.28, temperature=0.8)
    _, ref = versus_spec(backend, b, torch.float32, reduction, **kw)
    if off_policy:
        assert ref[1]["clip_frac_low"] > 0 and ref[1]["clip_frac_high"] > 0, "the case must exercise both clip sides"


def test_fused_equals_policy_loss_of_token_logprobs(backend):
    """The public contract: fused == policy_loss(token_logprobs(...)) in value and gradients (both within
    2x eager's fp32 error of the float64 spec)."""
    b = make_batch(4, 17, 32, 517, seed=5, weights="token")
    kw = dict(reduction="seq_mean", aux_coef=0.1, beta=0.04)
    _, ref = versus_spec(backend, b, torch.float32, "fused", chunk_mb=0.05, **kw)
    eager = fused(R.fused_exgrpo_loss_ref, b, torch.float32, **kw)
    h = b["h"].float().requires_grad_()
    W = b["W"].float().requires_grad_()
    lp = K.token_logprobs(h, W, b["t"], backend=backend)
    ls, ms = K.policy_loss(
        lp,
        b["old"].float(),
        b["ref"].float(),
        b["adv"].float(),
        b["mask"],
        weights=b["weights"].float(),
        sft_mask=b["sft_mask"],
        backend=backend,
        **kw,
    )
    ls.backward()
    assert_like_eager(ls.detach(), ref[0], eager[0], f"{backend} composed loss",
                      propagated=loss_error_from_logprobs(b, torch.float32, **kw))
    assert_all_like_eager(("d_hidden", "d_weight"), (h.grad, W.grad), (ref[2], ref[3]), (eager[2], eager[3]),
                          f"{backend} composed")
    assert_metrics_like_eager(ms, ref[1], eager[1], f"{backend} composed")


@pytest.mark.parametrize("chunk_mb,grad_scale", [(None, 1.0), (0.5, 1.0), (None, 0.37), (0.5, 3.1)])
def test_fused_loss_bf16_within_twice_eager_error(backend, chunk_mb, grad_scale):
    """One chunk (dW one bf16 GEMM) and several (fp32 accumulation), with the upstream gradient ≠ 1
    (the trainer's grad_scale): backward scales the forward-made gradients in place, in fp32."""
    b = make_batch(4, 31, 64, 2053, seed=17, weights="seq")
    kw = dict(reduction="token_mean", aux_coef=0.1, beta=0.04, grad_scale=grad_scale)
    out, _ = versus_spec(backend, b, torch.bfloat16, f"scale {grad_scale}", chunk_mb=chunk_mb, **kw)
    assert out[2].dtype == torch.bfloat16 and out[3].dtype == torch.bfloat16


def test_fused_loss_scaled_and_accumulated_gradients(backend):
    """(c·loss).backward() gives c × the gradient (fp32, against float64), and two losses backpropagated
    into the same leaves accumulate: the gradients handed out by backward are not aliased."""
    b1 = make_batch(3, 13, 24, 389, seed=31, weights="token")
    b2 = dict(make_batch(3, 13, 24, 389, seed=32, weights="seq"), W=b1["W"])   # two micro-batches, one head
    kw = dict(reduction="token_mean", aux_coef=0.2, beta=0.04)
    versus_spec(backend, b1, torch.float32, "scaled by -2.5", chunk_mb=0.01, grad_scale=-2.5, **kw)

    W = b1["W"].float().requires_grad_()
    grads = []
    for b in (b1, b2):
        h = b["h"].float().requires_grad_()
        loss, _ = K.fused_exgrpo_loss(h, W, b["t"], b["mask"], b["adv"].float(), old_logp=b["old"].float(),
                                      ref_logp=b["ref"].float(), weights=b["weights"].float(),
                                      sft_mask=b["sft_mask"], backend=backend, **kw)
        loss.backward()
        grads.append(W.grad.clone())
    r1, r2 = (fused(R.fused_exgrpo_loss_ref, b, torch.float64, **kw)[3] for b in (b1, b2))
    e1, e2 = (fused(R.fused_exgrpo_loss_ref, b, torch.float32, **kw)[3] for b in (b1, b2))
    assert_like_eager(grads[0], r1, e1, "first loss's d_weight")
    assert_like_eager(grads[1], r1 + r2, e1 + e2, "accumulated d_weight")


def test_fused_loss_second_backward_is_a_clear_error():
    b = make_batch(2, 7, 16, 101, seed=3)
    h = b["h"].float().requires_grad_()
    loss, _ = K.fused_exgrpo_loss(h, b["W"].float(), b["t"], b["mask"], b["adv"].float(), backend="torch")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


@pytest.mark.parametrize("reduction", ["token_mean", "seq_mean", "constant"])
@pytest.mark.parametrize("off_policy", [True, False])
def test_policy_loss_matches_spec(backend, reduction, off_policy):
    g = torch.Generator().manual_seed(31)
    B, L = 6, 29
    logp64 = -torch.rand(B, L, generator=g, dtype=torch.float64) * 5
    mask = torch.rand(B, L, generator=g) < 0.7
    mask[2] = False
    sft = (torch.rand(B, L, generator=g) < 0.3) & ~mask
    old = logp64 + 0.5 * torch.randn(B, L, generator=g, dtype=torch.float64) if off_policy else None
    ref = logp64 + 0.5 * torch.randn(B, L, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    w = torch.rand(B, L, generator=g, dtype=torch.float64) + 0.5
    kw = dict(reduction=reduction, aux_coef=0.25, beta=0.05, sft_mask=sft, eps_low=0.1, eps_high=0.3)
    lr_in = logp64.clone().requires_grad_()
    lr, mr = R.policy_loss_ref(lr_in, old, ref, adv, mask, weights=w, **kw)
    lr.backward()
    le_in = logp64.float().requires_grad_()
    le, me = R.policy_loss_ref(le_in, as_dtype(old, torch.float32), ref.float(), adv.float(), mask, weights=w.float(),
                               **kw)
    le.backward()
    lo_in = logp64.float().requires_grad_()
    lo, mo = K.policy_loss(
        lo_in, as_dtype(old, torch.float32), ref.float(), adv.float(), mask, weights=w.float(), backend=backend, **kw
    )
    lo.backward()
    assert_like_eager(lo.detach(), lr.detach(), le.detach(), f"{backend} loss",
                      propagated=propagated_error(lr_in.grad, logp64.float(), logp64))
    assert_like_eager(lo_in.grad, lr_in.grad, le_in.grad, f"{backend} d_logp")
    assert_metrics_like_eager(mo, mr, me, backend)
    # no gradient leaks into positions outside both masks
    assert (lo_in.grad[~(mask | sft)] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_everything_masked_gives_zero_loss_and_gradient(backend, dtype):
    """No trained row (e.g. an FSDP padding micro-batch): zero loss and gradients, in bf16 too."""
    b = make_batch(3, 7, 16, 64, seed=1, sft=False)
    b["mask"][:] = False
    lo, mo, dh, dW = fused(K.fused_exgrpo_loss, b, dtype, backend=backend, grad_scale=2.0)
    assert lo.item() == 0 and (dh == 0).all() and (dW == 0).all()
    assert mo["n_tokens"].item() == 0


def test_no_grad_evaluation_matches():
    b = make_batch(3, 11, 16, 200, seed=4)
    lr, mr, _, _ = fused(R.fused_exgrpo_loss_ref, b, torch.float64, aux_coef=0.1)
    le, me, _, _ = fused(R.fused_exgrpo_loss_ref, b, torch.float32, aux_coef=0.1)
    with torch.no_grad():
        lo, mo = K.fused_exgrpo_loss(
            b["h"].float(),
            b["W"].float(),
            b["t"],
            b["mask"],
            b["adv"].float(),
            old_logp=b["old"].float(),
            ref_logp=b["ref"].float(),
            sft_mask=b["sft_mask"],
            aux_coef=0.1,
        )
    assert_like_eager(lo, lr, le, "loss under no_grad",
                      propagated=loss_error_from_logprobs(b, torch.float32, aux_coef=0.1))
    assert_metrics_like_eager(mo, mr, me, "no_grad")


def test_per_token_advantages_equal_per_sequence(backend):
    """advantages [B, L] (packed rows: several sequences, each with its own advantage, in one row) give what
    the same values as [B] give, in loss, metrics and both gradients; and the spec agrees."""
    b = make_batch(4, 19, 24, 389, seed=41, weights="token")
    kw = dict(reduction="token_mean", aux_coef=0.1, beta=0.04, backend=backend)
    per_seq = fused(K.fused_exgrpo_loss, b, torch.float32, **kw)
    per_tok = fused(K.fused_exgrpo_loss, dict(b, adv=b["adv"][:, None].expand(4, 19).contiguous()), torch.float32,
                    **kw)
    for name, x, y in zip(("loss", "d_hidden", "d_weight"), (per_seq[0], *per_seq[2:]), (per_tok[0], *per_tok[2:])):
        assert torch.equal(x, y), name
    for k in per_seq[1]:
        assert torch.equal(per_seq[1][k], per_tok[1][k]), k
    # a different advantage per token reaches the spec's loss as such
    adv_tok = torch.randn(4, 19, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    b2 = dict(b, adv=adv_tok)
    versus_spec(backend, b2, torch.float32, "per-token advantages", reduction="token_mean", aux_coef=0.1, beta=0.04)
