"""The CUDA backend's epilogue, row by row, through csrc/host_emulation.cu (the kernels' own per-thread
code compiled for the host; see tests/_emulation.py). Every row length and alignment, thread counts that
leave threads idle. The public API with backend="cuda" runs in the kernel tests' own bodies (the
`backend` fixture's "cuda" parameter), not in copies here.
"""
import pytest
import torch
from _emulation import DTYPE_CODE, NVCC
from _helpers import assert_like_eager

pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found")


# ----------------------------------------------------------------------------- the epilogue, row by row

def spec_rows(x, targets, inv_temp, softcap, g_lse, g_zt, g_ent, dtype):
    """The epilogue's maths on the logits x, in eager PyTorch at `dtype` (float64: the truth; float32: the
    eager peer whose error bounds the kernel's): logp, entropy, and by autograd dx of
    Σ (g_lse·lse + g_zt·z_t + g_ent·entropy) over the valid rows."""
    valid = targets != -100
    xx = x.to(dtype).requires_grad_()
    z = (softcap * torch.tanh(xx / softcap) if softcap else xx) * inv_temp
    lse = torch.logsumexp(z, -1)
    lp = torch.log_softmax(z, -1)
    ent = -(lp.exp() * lp).sum(-1)
    zt = z.gather(1, targets.clamp(min=0)[:, None])[:, 0]
    w = valid.to(dtype)
    ((lse * g_lse.to(dtype) + zt * g_zt.to(dtype) + ent * g_ent.to(dtype)) * w).nan_to_num().sum().backward()
    dx = torch.where(valid[:, None], xx.grad, torch.zeros_like(xx.grad))
    return (zt - lse).detach()[valid], ent.detach()[valid], dx


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("V,threads", [(1031, 256), (1031, 32), (4099, 160), (3, 32), (256000, 256)])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_stats_and_backward_rows(emulation_lib, dtype, V, threads, softcap):
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
    lib = emulation_lib
    assert lib.emu_lmhead_stats(DTYPE_CODE[dtype], x.data_ptr(), n, V, t.data_ptr(), lse.data_ptr(), zt.data_ptr(),
                                ent.data_ptr(), inv_temp, softcap or 0.0, threads) == 0
    # backward: x := [g_zt·1[j=t] + g_lse·p + g_ent·p·(Ez − z)]·cap'(x)/T, checked by autograd
    g_lse, g_zt, g_ent = (torch.randn(n, generator=g) for _ in range(3))
    logp_r, ent_r, ref = spec_rows(x, t, inv_temp, softcap, g_lse, g_zt, g_ent, torch.float64)
    logp_e, ent_e, dx_e = spec_rows(x, t, inv_temp, softcap, g_lse, g_zt, g_ent, torch.float32)
    valid = t != -100
    assert (lse[~valid] == 0).all() and (zt[~valid] == 0).all() and (ent[~valid] == 0).all()
    assert_like_eager((zt - lse)[valid], logp_r, logp_e, "logp")
    assert_like_eager(ent[valid], ent_r, ent_e, "entropy")
    dx = x.clone()
    assert lib.emu_lmhead_stats_backward(DTYPE_CODE[dtype], dx.data_ptr(), n, V, t.data_ptr(), lse.data_ptr(),
                                         ent.data_ptr(), g_lse.data_ptr(), g_zt.data_ptr(), g_ent.data_ptr(),
                                         inv_temp, softcap or 0.0, threads) == 0
    assert (dx[1] == 0).all(), "ignored rows must be exact zeros, NaN or not"
    if dtype == torch.float32:
        assert_like_eager(dx, ref, dx_e, "dx")
    else:                                                        # one rounding to the storage type, no more
        ulp = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
        err = (dx.double() - ref).abs()
        bound = ulp * ref.abs() + 1e-6 * ref.abs().max()
        assert (err <= bound).all(), f"max excess {(err - bound).max().item():.3e}"
