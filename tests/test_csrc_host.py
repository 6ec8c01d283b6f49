"""The CUDA backend's arithmetic on a CPU: csrc/host_emulation.cu runs the kernels' own per-thread code.

csrc/host_emulation.cu is compiled with nvcc as a host-only shared library and stands in for the four
torch.ops.exgrpo ops. The real kernels/cuda_backend.py then runs through the real chunk driver and the
public API (backend="cuda"), against the float64 spec, on the cases of the kernel tests. What this
cannot see: the CUDA intrinsics (__expf, __fdividef: libm on the host), shuffles and barriers, the
launch and the torch binding; tests/test_csrc_gpu.py covers those on a GPU.
"""
import ctypes
import shutil
import subprocess
from pathlib import Path

import exgrpo.kernels as K
import pytest
import torch
from _helpers import assert_like_eager, assert_rel
from exgrpo.kernels import _backends, cuda_backend
from exgrpo.kernels import reference as R

CSRC = Path(__file__).resolve().parent.parent / "csrc"
NVCC = shutil.which("nvcc")
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found")

_DTYPE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_f = ctypes.c_float
_p = ctypes.c_void_p
_i64 = ctypes.c_int64


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    so = tmp_path_factory.mktemp("emu") / "libexgrpo_emu.so"
    r = subprocess.run([NVCC, "-shared", "-Xcompiler", "-fPIC", "-std=c++20", "-O2", "-I", str(CSRC), "-o", str(so),
                        str(CSRC / "host_emulation.cu")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    lib = ctypes.CDLL(str(so))
    lib.emu_lmhead_stats.argtypes = [ctypes.c_int, _p, _i64, _i64, _p, _p, _p, _p, _f, _f, ctypes.c_int]
    lib.emu_lmhead_stats_backward.argtypes = [ctypes.c_int, _p, _i64, _i64, _p, _p, _p, _p, _p, _p, _f, _f,
                                              ctypes.c_int]
    lib.emu_advantages.argtypes = [_p, _p, _i64, _i64, _f, _f, _f, ctypes.c_int, _p, _p, _p, _p]
    lib.emu_loss_terms.argtypes = [_p, _p, _p, _p, _p, _p, _p, _p, _i64, _f, _f, _f, _p, _p]
    lib.emu_loss_terms_blocks.argtypes = [_i64]
    lib.emu_loss_terms_blocks.restype = _i64
    return lib


def ptr(t):
    if t is None:
        return None
    assert t.is_contiguous() and t.device.type == "cpu"
    return t.data_ptr()


class EmulatedOps:
    """torch.ops.exgrpo's four ops with the C++ binding's contracts, on CPU tensors, via the emulation."""

    def __init__(self, lib, threads=256):
        self.lib, self.threads = lib, threads

    def lmhead_stats(self, x, targets, inv_temp, softcap, want_entropy):
        n, V = x.shape
        lse, zt = torch.empty(n), torch.empty(n)
        ent = torch.empty(n if want_entropy else 0)
        threads = min(self.threads, max(32, -(-V // (16 // x.element_size()) // 32) * 32))   # as threads_for()
        assert self.lib.emu_lmhead_stats(_DTYPE[x.dtype], ptr(x), n, V, ptr(targets), ptr(lse), ptr(zt),
                                         ptr(ent) if want_entropy else None, inv_temp, softcap or 0.0, threads) == 0
        return lse, zt, ent

    def lmhead_stats_backward_inplace(self, x, targets, lse, ent, g_lse, g_zt, g_ent, inv_temp, softcap):
        n, V = x.shape
        threads = min(self.threads, max(32, -(-V // (16 // x.element_size()) // 32) * 32))
        assert self.lib.emu_lmhead_stats_backward(
            _DTYPE[x.dtype], ptr(x), n, V, ptr(targets), ptr(lse), ptr(ent), ptr(g_lse), ptr(g_zt), ptr(g_ent),
            inv_temp, softcap or 0.0, threads) == 0

    def advantages(self, outcome, is_full, delta, nu, eps, by_scenario):
        Q, G = outcome.shape
        centred, scaled, total = (torch.empty(Q, G) for _ in range(3))
        fired = torch.empty(Q, dtype=torch.bool)
        assert self.lib.emu_advantages(ptr(outcome), ptr(is_full), Q, G, delta, nu, eps, int(by_scenario),
                                       ptr(centred), ptr(scaled), ptr(total), ptr(fired)) == 0
        return centred, scaled, total, fired

    def loss_terms(self, logp, adv, scale, aux, mask, old, ref, sft, eps_low, eps_high, beta):
        n = logp.numel()
        coef = torch.empty(n)
        partial = torch.zeros(max(1, self.lib.emu_loss_terms_blocks(n)), 6)
        assert self.lib.emu_loss_terms(ptr(logp), ptr(adv), ptr(scale), ptr(aux), ptr(mask), ptr(old), ptr(ref),
                                       ptr(sft), n, eps_low, eps_high, beta, ptr(coef), ptr(partial)) == 0
        return coef, partial[:, 0].sum(), partial[:, 1:].sum(0)


@pytest.fixture
def emulated(lib, monkeypatch):
    """backend="cuda" on CPU tensors, with the emulation standing in for exgrpo._C."""
    monkeypatch.setattr(cuda_backend, "_ops", lambda: EmulatedOps(lib))
    monkeypatch.setattr(cuda_backend, "unavailable_reason", lambda device: None)
    _backends._CACHE.pop("cuda", None)
    yield
    _backends._CACHE.pop("cuda", None)


# ----------------------------------------------------------------------------- the epilogue, row by row

def f64_stats(x, targets, inv_temp, softcap):
    z = x.double()
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    z = z * inv_temp
    lse = torch.logsumexp(z, -1)
    logp = z.gather(1, targets.clamp(min=0)[:, None])[:, 0] - lse
    p = (z - lse[:, None]).exp()
    ent = -(p * (z - lse[:, None])).sum(-1)
    return z, lse, logp, ent


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("V,threads", [(1031, 256), (1031, 32), (4099, 160), (3, 32), (256000, 256)])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_stats_and_backward_rows(lib, dtype, V, threads, softcap):
    """Every row length and alignment (V·sizeof(T) % 16 != 0 misaligns every row but the first),
    thread counts that leave threads idle, ignored rows holding NaN, the last vocabulary entry."""
    g = torch.Generator().manual_seed(V + threads)
    n = 3 if V == 256000 else 7
    x = (torch.randn(n, V, generator=g) * 3).to(dtype)
    t = torch.randint(0, V, (n,), generator=g)
    t[1] = -100
    x[1, 0] = float("nan")                                       # an ignored row is never read
    t[-1] = V - 1
    inv_temp = 1 / 0.7
    lse, zt, ent = torch.empty(n), torch.empty(n), torch.empty(n)
    assert lib.emu_lmhead_stats(_DTYPE[dtype], x.data_ptr(), n, V, t.data_ptr(), lse.data_ptr(), zt.data_ptr(),
                                ent.data_ptr(), inv_temp, softcap or 0.0, threads) == 0
    z, lse_r, logp_r, ent_r = f64_stats(x, t, inv_temp, softcap)
    valid = t != -100
    assert (lse[~valid] == 0).all() and (zt[~valid] == 0).all() and (ent[~valid] == 0).all()
    assert_rel((zt - lse)[valid], logp_r[valid], 1e-5, "logp")
    assert_rel(ent[valid], ent_r[valid], 1e-5, "entropy")

    # backward: x := [g_zt·1[j=t] + g_lse·p + g_ent·p·(Ez − z)]·cap'(x)/T, checked by float64 autograd
    g_lse, g_zt, g_ent = (torch.randn(n, generator=g) for _ in range(3))
    x64 = x.double().requires_grad_()
    zz = (softcap * torch.tanh(x64 / softcap) if softcap else x64) * inv_temp
    l64 = torch.logsumexp(zz, -1)
    lp = torch.log_softmax(zz, -1)
    e64 = -(lp.exp() * lp).sum(-1)
    zt64 = zz.gather(1, t.clamp(min=0)[:, None])[:, 0]
    w = valid.double()
    ((l64 * g_lse + zt64 * g_zt + e64 * g_ent) * w).nan_to_num().sum().backward()
    ref = torch.where(valid[:, None], x64.grad, torch.zeros_like(x64.grad))
    dx = x.clone()
    assert lib.emu_lmhead_stats_backward(_DTYPE[dtype], dx.data_ptr(), n, V, t.data_ptr(), lse.data_ptr(),
                                         ent.data_ptr(), g_lse.data_ptr(), g_zt.data_ptr(), g_ent.data_ptr(),
                                         inv_temp, softcap or 0.0, threads) == 0
    assert (dx[1] == 0).all(), "ignored rows must be exact zeros, NaN or not"
    if dtype == torch.float32:
        assert_rel(dx, ref, 1e-5, "dx")
    else:                                                        # one rounding to the storage type, no more
        ulp = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
        err = (dx.double() - ref).abs()
        bound = ulp * ref.abs() + 1e-6 * ref.abs().max()
        assert (err <= bound).all(), f"max excess {(err - bound).max().item():.3e}"


# ----------------------------------------------------------------------------- the public API, backend="cuda"

LOGPROB_CASES = [
    (37, 48, 1031, 1.0, None),
    (5, 16, 4099, 0.7, None),
    (29, 40, 777, 1.3, 3.0),
    (1, 8, 3, 1.0, None),
]


@pytest.mark.parametrize("N,H,V,temperature,softcap", LOGPROB_CASES)
def test_token_logprobs_fp32(emulated, N, H, V, temperature, softcap):
    from test_kernels_logprobs import make, run
    h, W, t, g_lp, g_ent = make(N, H, V, seed=N * 1000 + V)
    kw = dict(temperature=temperature, softcap=softcap)
    ref = run(R.token_logprobs_ref, h, W, t, g_lp, g_ent, torch.float64, **kw)
    out = run(K.token_logprobs, h, W, t, g_lp, g_ent, torch.float32, backend="cuda", **kw)
    for name, o, r in zip(("logp", "entropy", "d_hidden", "d_weight"), out, ref):
        assert_rel(o, r, 1e-5, f"cuda {name}")
    ignored = t == -100
    assert (out[0][ignored] == 0).all() and (out[1][ignored] == 0).all() and (out[2][ignored] == 0).all()


def test_token_logprobs_chunked_and_real_vocabulary(emulated):
    from test_kernels_logprobs import make, run
    h, W, t, g_lp, g_ent = make(53, 24, 1500, seed=7)
    ref = run(R.token_logprobs_ref, h, W, t, g_lp, g_ent, torch.float64)
    out = run(K.token_logprobs, h, W, t, g_lp, g_ent, torch.float32, backend="cuda", chunk_mb=0.1)
    for name, o, r in zip(("logp", "entropy", "d_hidden", "d_weight"), out, ref):
        assert_rel(o, r, 1e-5, f"cuda chunked {name}")
    h, W, t, g_lp, g_ent = make(6, 32, 256000, seed=11, ignore_frac=0.0)
    t[2] = 255999
    ref = run(R.token_logprobs_ref, h, W, t, g_lp, g_ent, torch.float64)
    out = run(K.token_logprobs, h, W, t, g_lp, g_ent, torch.float32, backend="cuda")
    for name, o, r in zip(("logp", "entropy", "d_hidden", "d_weight"), out, ref):
        assert_rel(o, r, 1e-5, f"cuda V=256000 {name}")


@pytest.mark.parametrize("dtype,softcap", [(torch.bfloat16, None), (torch.bfloat16, 4.0), (torch.float16, None)])
def test_token_logprobs_low_precision(emulated, dtype, softcap):
    from test_kernels_logprobs import make, run
    h, W, t, g_lp, g_ent = make(45, 64, 2053, seed=3)
    kw = dict(temperature=0.9, softcap=softcap)
    ref = run(R.token_logprobs_ref, h, W, t, g_lp, g_ent, torch.float64, **kw)
    eager = run(R.token_logprobs_ref, h, W, t, g_lp, g_ent, dtype, **kw)
    out = run(K.token_logprobs, h, W, t, g_lp, g_ent, dtype, backend="cuda", **kw)
    assert out[2].dtype == dtype and out[3].dtype == dtype
    for name, o, e, r in zip(("logp", "entropy", "d_hidden", "d_weight"), out, eager, ref):
        assert_like_eager(o, r, e, f"cuda {dtype} {name}")


def test_fused_loss_variants(emulated):
    import zlib

    from test_kernels_loss import VARIANTS, fused, make_batch
    for reduction, off_policy, with_ref, weights, sft, aux_coef, beta in VARIANTS:
        b = make_batch(5, 23, 40, 1031, seed=zlib.crc32(repr((reduction, off_policy, weights)).encode()) % 1000,
                       off_policy=off_policy, with_ref=with_ref, weights=weights, sft=sft, temperature=0.8)
        kw = dict(reduction=reduction, aux_coef=aux_coef, beta=beta, eps_low=0.2, eps_high=0.28, temperature=0.8)
        lr, mr, dhr, dWr = fused(R.fused_exgrpo_loss_ref, b, torch.float64, **kw)
        lo, mo, dho, dWo = fused(K.fused_exgrpo_loss, b, torch.float32, backend="cuda", **kw)
        assert_rel(lo, lr, 1e-5, f"loss {reduction}")
        assert_rel(dho, dhr, 1e-5, f"d_hidden {reduction}")
        assert_rel(dWo, dWr, 1e-5, f"d_weight {reduction}")
        for k in mr:
            assert abs(mo[k].item() - mr[k].item()) <= 1e-5 * max(1.0, abs(mr[k].item())), (k, mo[k], mr[k])


def test_policy_loss_and_advantages(emulated):
    from test_kernels_advantages import random_case
    g = torch.Generator().manual_seed(31)
    B, L = 6, 29
    logp64 = -torch.rand(B, L, generator=g, dtype=torch.float64) * 5
    mask = torch.rand(B, L, generator=g) < 0.7
    mask[2] = False
    sft = (torch.rand(B, L, generator=g) < 0.3) & ~mask
    old = logp64 + 0.5 * torch.randn(B, L, generator=g, dtype=torch.float64)
    ref = logp64 + 0.5 * torch.randn(B, L, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    kw = dict(reduction="seq_mean", aux_coef=0.25, beta=0.05, sft_mask=sft, eps_low=0.1, eps_high=0.3)
    lr_in = logp64.clone().requires_grad_()
    lr, mr = R.policy_loss_ref(lr_in, old, ref, adv, mask, **kw)
    lr.backward()
    lo_in = logp64.float().requires_grad_()
    lo, mo = K.policy_loss(lo_in, old.float(), ref.float(), adv.float(), mask, backend="cuda", **kw)
    lo.backward()
    assert_rel(lo.detach(), lr.detach(), 1e-5, "loss")
    assert_rel(lo_in.grad, lr_in.grad, 1e-5, "d_logp")
    for k in mr:
        assert abs(mo[k].item() - mr[k].item()) <= 1e-5 * max(1.0, abs(mr[k].item())), (k, mo[k], mr[k])

    for Q, G in [(7, 16), (5, 11), (3, 1), (4, 2), (2, 1500)]:
        outcome, is_full = random_case(Q, G, seed=Q * 100 + G)
        for group_by in ("question", "scenario"):
            for scale in ("group", "batch", "none"):
                kw = dict(delta=0.5, nu=1.0, eps=1e-6, scale=scale, group_by=group_by)
                a_r, t_r, f_r = R.exgrpo_advantages_ref(outcome, is_full, **kw)
                a, t, f = K.exgrpo_advantages(outcome, is_full, backend="cuda", **kw)
                assert torch.equal(f, f_r)
                torch.testing.assert_close(t.double(), t_r, rtol=0, atol=1e-6)
                torch.testing.assert_close(a.double(), a_r, rtol=1e-5, atol=1e-5)
    a1, _, _ = K.exgrpo_advantages(torch.tensor([[1.0]]), torch.tensor([[True]]), eps=0.0, backend="cuda")
    assert a1.item() == 0.0, "a group of one with eps = 0 is 0, not 0/0"
