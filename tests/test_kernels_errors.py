"""Bad input: a clear error that names the argument, never a wrong number or a crash in a kernel."""
import exgrpo.kernels as K
import pytest
import torch


def lm(N=6, H=8, V=20, dtype=torch.float32):
    return torch.randn(N, H, dtype=dtype), torch.randn(V, H, dtype=dtype), torch.randint(0, V, (N,))


def test_token_logprobs_bad_inputs(backend):
    h, W, t = lm()
    f = lambda *a, **k: K.token_logprobs(*a, backend=backend, **k)
    with pytest.raises(ValueError, match="hidden size mismatch"):
        f(h, W[:, :5], t)
    with pytest.raises(ValueError, match="targets shape"):
        f(h, W, t[:4])
    with pytest.raises(TypeError, match="weight dtype"):
        f(h, W.double(), t)
    with pytest.raises(TypeError, match="hidden must be bf16, fp16 or fp32"):
        f(h.double(), W.double(), t)
    with pytest.raises(TypeError, match="targets must be int64"):
        f(h, W, t.int())
    with pytest.raises(ValueError, match="targets has values outside"):
        f(h, W, torch.tensor([0, 1, 2, 20, 3, 4]))
    with pytest.raises(ValueError, match="targets has values outside"):
        f(h, W, torch.tensor([0, 1, -1, 2, 3, 4]))
    with pytest.raises(ValueError, match="temperature"):
        f(h, W, t, temperature=0.0)
    with pytest.raises(ValueError, match="softcap"):
        f(h, W, t, softcap=-1.0)
    h_nan = h.clone()
    h_nan[2, 3] = float("nan")
    with pytest.raises(ValueError, match="hidden contains NaN"):
        f(h_nan, W, t)
    W_inf = W.clone()
    W_inf[7, 1] = float("inf")
    with pytest.raises(ValueError, match="weight contains NaN or Inf"):
        f(h, W_inf, t)
    # NaN in an ignored row (padding) reaches neither the result nor d_hidden. (d_weight = dxᵀ·h
    # still meets it in the GEMM as 0·NaN, exactly as in eager PyTorch.)
    t_ign = t.clone()
    t_ign[2] = -100
    h_leaf, W_leaf = h_nan.clone().requires_grad_(), W.clone().requires_grad_()
    lp, ent = f(h_leaf, W_leaf, t_ign, return_entropy=True)
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all()
    (lp.sum() + ent.sum()).backward()
    assert torch.isfinite(h_leaf.grad).all()
    assert (h_leaf.grad[2] == 0).all()


def test_unknown_and_unavailable_backends():
    h, W, t = lm()
    with pytest.raises(ValueError, match="unknown backend 'tpu'.*'torch', 'triton', 'cuda'"):
        K.token_logprobs(h, W, t, backend="tpu")
    with pytest.raises(RuntimeError, match="backend 'cuda' is unavailable: .*Available here"):
        K.token_logprobs(h, W, t, backend="cuda")


def test_env_override(monkeypatch):
    h, W, t = lm()
    monkeypatch.setenv("EXGRPO_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="'cuda' is unavailable"):
        K.token_logprobs(h, W, t)
    monkeypatch.setenv("EXGRPO_BACKEND", "triton")
    torch.testing.assert_close(K.token_logprobs(h, W, t), K.token_logprobs(h, W, t, backend="torch"))


@pytest.mark.skipif(not hasattr(torch, "device"), reason="")
def test_device_mismatch_is_named():
    h, W, t = lm()
    meta_W = torch.empty(W.shape, device="meta")
    with pytest.raises((ValueError, TypeError), match="weight"):
        K.token_logprobs(h, meta_W, t)


def loss_args(B=3, L=5):
    logp = -torch.rand(B, L)
    return logp, None, None, torch.randn(B), torch.rand(B, L) < 0.5


def test_policy_loss_bad_inputs(backend):
    logp, old, ref, adv, mask = loss_args()
    f = lambda *a, **k: K.policy_loss(*a, backend=backend, **k)
    with pytest.raises(ValueError, match="advantages shape"):
        f(logp, old, ref, torch.randn(4), mask)
    with pytest.raises(TypeError, match="mask must be a bool"):
        f(logp, old, ref, adv, mask.float())
    with pytest.raises(ValueError, match="old_logp shape"):
        f(logp, torch.zeros(3, 4), ref, adv, mask)
    with pytest.raises(ValueError, match="weights shape"):
        f(logp, old, ref, adv, mask, weights=torch.ones(5))
    with pytest.raises(ValueError, match="reduction must be one of"):
        f(logp, old, ref, adv, mask, reduction="sum")
    with pytest.raises(ValueError, match="eps_low"):
        f(logp, old, ref, adv, mask, eps_low=1.5)
    bad = adv.clone()
    bad[1] = float("inf")
    with pytest.raises(ValueError, match="advantages contains NaN"):
        f(logp, old, ref, bad, mask)
    bad_old = logp.clone()
    bad_old[mask] = float("nan")
    with pytest.raises(ValueError, match="old_logp contains NaN"):
        f(logp, bad_old, ref, adv, mask)
    bad_lp = logp.clone()
    bad_lp[mask] = float("-inf")
    with pytest.raises(ValueError, match="logp contains NaN"):
        f(bad_lp, old, ref, adv, mask)
    with pytest.raises(ValueError, match="sft_mask shape"):
        f(logp, old, ref, adv, mask, sft_mask=torch.zeros(2, 5, dtype=torch.bool))


def test_fused_loss_mask_on_ignored_target():
    h, W = torch.randn(2, 4, 8), torch.randn(20, 8)
    t = torch.randint(0, 20, (2, 4))
    t[0, 1] = -100
    mask = torch.ones(2, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="target is -100"):
        K.fused_exgrpo_loss(h, W, t, mask, torch.randn(2))
    with pytest.raises(ValueError, match=r"hidden must be \[B, L, H\]"):
        K.fused_exgrpo_loss(h.reshape(8, 8), W, t.reshape(8), mask.reshape(8), torch.randn(8))


def test_advantages_bad_inputs():
    o = torch.ones(2, 4)
    f = torch.ones(2, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="is_full shape"):
        K.exgrpo_advantages(o, f[:, :3])
    with pytest.raises(TypeError, match="is_full must be bool"):
        K.exgrpo_advantages(o, f.float())
    with pytest.raises(ValueError, match=r"outcome must be \[Q, G\]"):
        K.exgrpo_advantages(o.reshape(-1), f.reshape(-1))
    with pytest.raises(ValueError, match="scale must be"):
        K.exgrpo_advantages(o, f, scale="global")
    with pytest.raises(ValueError, match="group_by must be"):
        K.exgrpo_advantages(o, f, group_by="dialogue")
    with pytest.raises(ValueError, match="outcome contains NaN"):
        K.exgrpo_advantages(torch.full((2, 4), float("nan")), f)
