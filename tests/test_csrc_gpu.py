"""The CUDA C++ backend on a GPU: parity with the float64 spec through the public API (backend="cuda"),
torch.library.opcheck on each op, input checks that name the argument, out-of-range targets.

Needs a CUDA device and the built extension (`EXGRPO_BUILD_CUDA=1 pip install --no-build-isolation -e .`);
skipped otherwise, saying which is missing. Tolerances are those of the kernel tests (issue 2): fp32
within 1e-5 relative of float64, bf16/fp16 within 2× the error of the same computation in eager
PyTorch at that precision.
"""
import zlib

import exgrpo.kernels as K
import pytest
import torch
from _helpers import assert_all_like_eager, assert_like_eager, propagated_error
from exgrpo.kernels import reference as R

pytestmark = pytest.mark.gpu
DEV = "cuda"


@pytest.fixture(scope="module", autouse=True)
def _need_extension():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    why = K.available(DEV)["cuda"]
    if why is not None:
        pytest.skip(f"cuda backend unavailable: {why}")


def ops():
    return torch.ops.exgrpo


def make(N, H, V, *, seed, ignore_frac=0.2):
    from test_kernels_logprobs import make as make_cpu
    return make_cpu(N, H, V, seed=seed, ignore_frac=ignore_frac)


def run(fn, h, W, t, g_lp, g_ent, dtype, device, **kw):
    h = h.detach().to(device=device, dtype=dtype, copy=True).requires_grad_()
    W = W.detach().to(device=device, dtype=dtype, copy=True).requires_grad_()
    lp, ent = fn(h, W, t.to(device), return_entropy=True, **kw)
    ((lp.double() * g_lp.to(device)).sum() + (ent.double() * g_ent.to(device)).sum()).backward()
    return tuple(v.detach().cpu() for v in (lp, ent, h.grad, W.grad))


# ----------------------------------------------------------------------------- parity, public API

CASES = [
    (37, 48, 1031, 1.0, None),        # odd sizes: every row but the first starts off a 16-byte boundary
    (5, 16, 4099, 0.7, None),
    (29, 40, 777, 1.3, 3.0),          # softcap
    (1, 8, 3, 1.0, None),
    (6, 32, 256000, 1.0, None),       # Gemma's vocabulary
]


@pytest.mark.parametrize("N,H,V,temperature,softcap", CASES)
def test_token_logprobs_fp32(N, H, V, temperature, softcap):
    h, W, t, g_lp, g_ent = make(N, H, V, seed=N * 1000 + V, ignore_frac=0.0 if V == 256000 else 0.2)
    if V == 256000:
        t[2] = V - 1
    kw = dict(temperature=temperature, softcap=softcap)
    ref = run(R.token_logprobs_ref, h, W, t, g_lp, g_ent, torch.float64, "cpu", **kw)
    eager = run(R.token_logprobs_ref, h, W, t, g_lp, g_ent, torch.float32, DEV, **kw)
    out = run(K.token_logprobs, h, W, t, g_lp, g_ent, torch.float32, DEV, backend="cuda", **kw)
    assert_all_like_eager(("logp", "entropy", "d_hidden", "d_weight"), out, ref, eager, "cuda fp32")
    ignored = t == -100
    assert (out[0][ignored] == 0).all() and (out[1][ignored] == 0).all() and (out[2][ignored] == 0).all()


def test_chunking_does_not_change_the_result():
    h, W, t, g_lp, g_ent = make(53, 24, 1500, seed=7)
    ref = run(R.token_logprobs_ref, h, W, t, g_lp, g_ent, torch.float64, "cpu")
    eager = run(R.token_logprobs_ref, h, W, t, g_lp, g_ent, torch.float32, DEV)
    out = run(K.token_logprobs, h, W, t, g_lp, g_ent, torch.float32, DEV, backend="cuda", chunk_mb=0.1)
    assert_all_like_eager(("logp", "entropy", "d_hidden", "d_weight"), out, ref, eager, "cuda chunked")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,H,V,softcap", [(45, 64, 2053, None), (45, 64, 2053, 4.0), (8, 64, 256000, None)])
def test_token_logprobs_low_precision(dtype, N, H, V, softcap):
    h, W, t, g_lp, g_ent = make(N, H, V, seed=3 + V)
    kw = dict(temperature=0.9, softcap=softcap)
    ref = run(R.token_logprobs_ref, h, W, t, g_lp, g_ent, torch.float64, "cpu", **kw)
    eager = run(R.token_logprobs_ref, h, W, t, g_lp, g_ent, dtype, DEV, **kw)
    out = run(K.token_logprobs, h, W, t, g_lp, g_ent, dtype, DEV, backend="cuda", **kw)
    assert out[2].dtype == dtype and out[3].dtype == dtype
    for name, o, e, r in zip(("logp", "entropy", "d_hidden", "d_weight"), out, eager, ref):
        assert_like_eager(o, r, e, f"cuda {dtype} {name}")


def _fused(fn, b, dtype, device, **kw):
    f32 = torch.float64 if dtype == torch.float64 else torch.float32
    mv = lambda x, dt=None: None if x is None else x.to(device=device, dtype=dt or x.dtype)
    h = b["h"].to(device=device, dtype=dtype).requires_grad_()
    W = b["W"].to(device=device, dtype=dtype).requires_grad_()
    loss, metrics = fn(h, W, mv(b["t"]), mv(b["mask"]), mv(b["adv"], f32), old_logp=mv(b["old"], f32),
                       ref_logp=mv(b["ref"], f32), weights=mv(b["weights"], f32), sft_mask=mv(b["sft_mask"]), **kw)
    loss.backward()
    return loss.detach().cpu(), {k: v.cpu() for k, v in metrics.items()}, h.grad.cpu(), W.grad.cpu()


@pytest.mark.parametrize("variant", range(5))
def test_fused_loss_fp32(variant):
    from test_kernels_loss import VARIANTS, make_batch
    reduction, off_policy, with_ref, weights, sft, aux_coef, beta = VARIANTS[variant]
    b = make_batch(5, 23, 40, 1031, seed=zlib.crc32(repr((reduction, off_policy, weights)).encode()) % 1000,
                   off_policy=off_policy, with_ref=with_ref, weights=weights, sft=sft, temperature=0.8)
    kw = dict(reduction=reduction, aux_coef=aux_coef, beta=beta, eps_low=0.2, eps_high=0.28, temperature=0.8)
    from test_kernels_loss import loss_error_from_logprobs
    lr, mr, dhr, dWr = _fused(R.fused_exgrpo_loss_ref, b, torch.float64, "cpu", **kw)
    le, me, dhe, dWe = _fused(R.fused_exgrpo_loss_ref, b, torch.float32, DEV, **kw)
    lo, mo, dho, dWo = _fused(K.fused_exgrpo_loss, b, torch.float32, DEV, backend="cuda", **kw)
    assert_like_eager(lo, lr, le, "loss", propagated=loss_error_from_logprobs(b, torch.float32, **kw))
    assert_all_like_eager(("d_hidden", "d_weight"), (dho, dWo), (dhr, dWr), (dhe, dWe), "cuda fp32")
    for k in mr:
        assert_like_eager(mo[k], mr[k], me[k], f"metric {k}")


def test_fused_loss_bf16_within_twice_eager_error():
    from test_kernels_loss import make_batch
    b = make_batch(4, 31, 64, 2053, seed=17, weights="seq")
    kw = dict(reduction="token_mean", aux_coef=0.1, beta=0.04)
    from test_kernels_loss import loss_error_from_logprobs
    ref = _fused(R.fused_exgrpo_loss_ref, b, torch.float64, "cpu", **kw)
    eager = _fused(R.fused_exgrpo_loss_ref, b, torch.bfloat16, DEV, **kw)
    out = _fused(K.fused_exgrpo_loss, b, torch.bfloat16, DEV, backend="cuda", **kw)
    assert_like_eager(out[0], ref[0], eager[0], "cuda bf16 loss",
                      propagated=loss_error_from_logprobs(b, torch.bfloat16, **kw))
    for i, name in ((2, "d_hidden"), (3, "d_weight")):
        assert_like_eager(out[i], ref[i], eager[i], f"cuda bf16 {name}")


@pytest.mark.parametrize("group_by", ["question", "scenario"])
@pytest.mark.parametrize("Q,G", [(7, 16), (5, 11), (3, 1), (4, 2), (3, 1500)])
def test_advantages(group_by, Q, G):
    from test_kernels_advantages import random_case
    outcome, is_full = random_case(Q, G, seed=Q * 100 + G)
    for scale in ("group", "batch", "none"):
        kw = dict(delta=0.5, nu=1.0, eps=1e-6, scale=scale, group_by=group_by)
        a_r, t_r, f_r = R.exgrpo_advantages_ref(outcome, is_full, **kw)
        a_e, _, _ = R.exgrpo_advantages_ref(outcome, is_full, dtype=torch.float32, **kw)
        a, t, f = K.exgrpo_advantages(outcome.to(DEV), is_full.to(DEV), backend="cuda", **kw)
        assert torch.equal(f.cpu(), f_r)
        assert torch.equal(t.cpu().double(), t_r)
        assert_like_eager(a.cpu(), a_r, a_e, f"advantages {scale}")


@pytest.mark.parametrize("reduction", ["token_mean", "seq_mean", "constant"])
def test_policy_loss(reduction):
    g = torch.Generator().manual_seed(31)
    B, L = 6, 2900                                               # several loss blocks of 1024 tokens
    logp64 = -torch.rand(B, L, generator=g, dtype=torch.float64) * 5
    mask = torch.rand(B, L, generator=g) < 0.7
    mask[2] = False
    sft = (torch.rand(B, L, generator=g) < 0.3) & ~mask
    old = logp64 + 0.5 * torch.randn(B, L, generator=g, dtype=torch.float64)
    ref = logp64 + 0.5 * torch.randn(B, L, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    w = torch.rand(B, L, generator=g, dtype=torch.float64) + 0.5
    kw = dict(reduction=reduction, aux_coef=0.25, beta=0.05, sft_mask=sft, eps_low=0.1, eps_high=0.3)
    lr_in = logp64.clone().requires_grad_()
    lr, mr = R.policy_loss_ref(lr_in, old, ref, adv, mask, weights=w, **kw)
    lr.backward()
    c = lambda x: x.float().to(DEV)
    lo_in = c(logp64).requires_grad_()
    kw["sft_mask"] = sft.to(DEV)
    lo, mo = K.policy_loss(lo_in, c(old), c(ref), c(adv), mask.to(DEV), weights=c(w), backend="cuda", **kw)
    lo.backward()
    le_in = c(logp64).requires_grad_()
    le, me = R.policy_loss_ref(le_in, c(old), c(ref), c(adv), mask.to(DEV), weights=c(w), **kw)
    le.backward()
    assert_like_eager(lo.detach().cpu(), lr.detach(), le.detach().cpu(), "loss",
                      propagated=propagated_error(lr_in.grad, logp64.float(), logp64))
    assert_like_eager(lo_in.grad.cpu(), lr_in.grad, le_in.grad.cpu(), "d_logp")
    for k in mr:
        assert_like_eager(mo[k].cpu(), mr[k], me[k].cpu(), f"metric {k}")


def test_loss_terms_are_deterministic():
    n = 100_000
    g = torch.Generator(device=DEV).manual_seed(0)
    args = [-torch.rand(n, generator=g, device=DEV) * 4 for _ in range(4)] + [torch.rand(n, device=DEV) < 0.8]
    run_once = lambda: ops().loss_terms(args[0], args[1], args[2], args[3], args[4], args[0] * 0.9, args[0] * 1.1,
                                        None, 0.2, 0.2, 0.04)
    a, b = run_once(), run_once()
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.slow
def test_gemma7b_shape_bf16():
    """Gemma-7B LM head at training size, H=3072, V=256000, N=16384, bf16; truth on a row sample."""
    g = torch.Generator(device=DEV).manual_seed(0)
    N, H, V = 16384, 3072, 256000
    h = torch.randn(N, H, generator=g, device=DEV, dtype=torch.bfloat16)
    W = torch.randn(V, H, generator=g, device=DEV, dtype=torch.bfloat16) * 0.02
    t = torch.randint(0, V, (N,), generator=g, device=DEV)
    g_lp = torch.randn(N, generator=g, device=DEV)
    hh = h.clone().requires_grad_()
    lp = K.token_logprobs(hh, W, t, backend="cuda")
    (lp * g_lp).sum().backward()
    rows = torch.arange(0, N, 97, device=DEV)
    hs = h[rows].double().requires_grad_()
    lr = R.token_logprobs_ref(hs, W.double(), t[rows])
    (lr * g_lp[rows].double()).sum().backward()
    he = h[rows].clone().requires_grad_()
    le = R.token_logprobs_ref(he, W, t[rows])
    (le.double() * g_lp[rows].double()).sum().backward()
    assert_like_eager(lp[rows].detach(), lr.detach(), le.detach(), "logp")
    assert_like_eager(hh.grad[rows], hs.grad, he.grad, "d_hidden")


# ----------------------------------------------------------------------------- the ops themselves

def _chunk(n=7, V=1031, dtype=torch.float32, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    x = (torch.randn(n, V, generator=g, device=DEV) * 3).to(dtype)
    t = torch.randint(0, V, (n,), generator=g, device=DEV)
    t[1] = -100
    return x, t


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_opcheck_lmhead_ops(dtype, softcap):
    x, t = _chunk(dtype=dtype)
    for want in (True, False):
        torch.library.opcheck(ops().lmhead_stats.default, (x.clone().requires_grad_(), t, 1.25, softcap, want))
    lse, zt, ent = ops().lmhead_stats(x, t, 1.25, softcap, True)
    g = [torch.randn_like(lse) for _ in range(3)]
    torch.library.opcheck(ops().lmhead_stats_backward_inplace.default,
                          (x.clone(), t, lse, ent, g[0], g[1], g[2], 1.25, softcap))
    torch.library.opcheck(ops().lmhead_stats_backward_inplace.default,
                          (x.clone(), t, lse, None, g[0], g[1], None, 1.25, softcap))


def test_lmhead_stats_autograd_is_its_vjp():
    """The registered autograd of lmhead_stats against float64 autograd on the same logits."""
    x, t = _chunk(n=9, V=777)
    softcap, inv_temp = 3.0, 1 / 0.8
    xg = x.clone().requires_grad_()
    lse, zt, ent = ops().lmhead_stats(xg, t, inv_temp, softcap, True)
    gs = [torch.randn_like(lse) for _ in range(3)]
    (lse * gs[0] + zt * gs[1] + ent * gs[2]).sum().backward()
    x64 = x.double().requires_grad_()
    z = softcap * torch.tanh(x64 / softcap) * inv_temp
    lp = torch.log_softmax(z, -1)
    valid = (t != -100).double()
    ref = torch.logsumexp(z, -1) * gs[0] + z.gather(1, t.clamp(min=0)[:, None])[:, 0] * gs[1] \
        - (lp.exp() * lp).sum(-1) * gs[2]
    (ref * valid).sum().backward()
    x32 = x.float().requires_grad_()
    z = softcap * torch.tanh(x32 / softcap) * inv_temp
    lp = torch.log_softmax(z, -1)
    eager = torch.logsumexp(z, -1) * gs[0] + z.gather(1, t.clamp(min=0)[:, None])[:, 0] * gs[1] \
        - (lp.exp() * lp).sum(-1) * gs[2]
    (eager * valid.float()).sum().backward()
    assert_like_eager(xg.grad, x64.grad, x32.grad, "d lmhead_stats / dx")


def test_opcheck_small_ops():
    g = torch.Generator(device=DEV).manual_seed(1)
    outcome = (torch.rand(5, 12, generator=g, device=DEV) < 0.5).float()
    is_full = torch.rand(5, 12, generator=g, device=DEV) < 0.5
    for by in (False, True):
        torch.library.opcheck(ops().advantages.default, (outcome.clone().requires_grad_(), is_full, 0.5, 1.0, 1e-6, by))
    n = 3000
    lp = -torch.rand(n, generator=g, device=DEV) * 3
    f = lambda: torch.rand(n, generator=g, device=DEV)
    mask, sft = f() < 0.7, f() < 0.2
    for old, ref, s in ((lp + 0.1 * f(), lp - 0.1 * f(), sft), (None, None, None)):
        torch.library.opcheck(ops().loss_terms.default,
                              (lp.clone().requires_grad_(), f() - 0.5, f(), f() * 0.01, mask, old, ref, s, 0.2, 0.28,
                               0.04))


def test_bad_inputs_name_the_argument():
    x, t = _chunk()
    st = ops().lmhead_stats
    with pytest.raises(ValueError, match="x must be a CUDA tensor"):
        st(x.cpu(), t, 1.0, None, False)
    with pytest.raises(TypeError, match="x must be float32, bfloat16 or float16"):
        st(x.double(), t, 1.0, None, False)
    with pytest.raises(ValueError, match="x must be contiguous"):
        st(x.t().contiguous().t(), t, 1.0, None, False)
    with pytest.raises(ValueError, match=r"x must be a \[n, V\] logits chunk"):
        st(x[None], t, 1.0, None, False)
    with pytest.raises(ValueError, match=r"targets must have shape \[7\]"):
        st(x, t[:5], 1.0, None, False)
    with pytest.raises(TypeError, match="targets must be Long"):
        st(x, t.int(), 1.0, None, False)
    with pytest.raises(ValueError, match="targets must be a CUDA tensor"):
        st(x, t.cpu(), 1.0, None, False)
    with pytest.raises(ValueError, match="inv_temp must be a finite number > 0"):
        st(x, t, 0.0, None, False)
    with pytest.raises(ValueError, match="softcap must be a finite number > 0"):
        st(x, t, 1.0, -2.0, False)
    lse, zt, ent = st(x, t, 1.0, None, True)
    bw = ops().lmhead_stats_backward_inplace
    with pytest.raises(ValueError, match="g_ent needs ent"):
        bw(x, t, lse, None, lse, lse, lse, 1.0, None)
    with pytest.raises(TypeError, match="g_zt must be Float"):
        bw(x, t, lse, None, lse, lse.double(), None, 1.0, None)
    with pytest.raises(ValueError, match=r"lse must have shape \[7\]"):
        bw(x, t, lse[:3], None, lse, lse, None, 1.0, None)
    o = torch.rand(3, 4, device=DEV)
    with pytest.raises(ValueError, match="is_full shape"):
        ops().advantages(o, torch.ones(3, 5, dtype=torch.bool, device=DEV), 0.5, 1.0, 1e-6, False)
    with pytest.raises(TypeError, match="is_full must be Bool"):
        ops().advantages(o, o, 0.5, 1.0, 1e-6, False)
    lp = -torch.rand(10, device=DEV)
    with pytest.raises(TypeError, match="mask must be Bool"):
        ops().loss_terms(lp, lp, lp, lp, lp, None, None, None, 0.2, 0.2, 0.04)
    with pytest.raises(ValueError, match=r"old must have shape \[10\]"):
        ops().loss_terms(lp, lp, lp, lp, lp > -0.5, lp[:4], None, None, 0.2, 0.2, 0.04)
    with pytest.raises(ValueError, match="eps_low"):
        ops().loss_terms(lp, lp, lp, lp, lp > -0.5, None, None, None, 1.5, 0.2, 0.04)


def test_out_of_range_target_gives_nan_not_a_fault():
    """The public API rejects such targets first; the raw op must still never read out of bounds."""
    x, t = _chunk()
    t[3] = x.shape[1] + 5
    t[4] = -7
    lse, zt, _ = ops().lmhead_stats(x, t, 1.0, None, False)
    torch.cuda.synchronize()
    assert lse[3].isnan() and lse[4].isnan() and zt[3].isnan()
    assert torch.isfinite(lse[[0, 2, 5, 6]]).all()
