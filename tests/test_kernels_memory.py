"""The torch backend's fused loss never holds [N, V]: peak RSS growth at N=8192, V=256000.

fp32 logits alone would be 8192 × 256000 × 4 B = 8.4 GB. Measured in a fresh subprocess (ru_maxrss
is a process-wide high-water mark), after the inputs exist, so only the loss's own memory counts.
"""
import json
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(r'''
    import json, resource, torch
    import exgrpo.kernels as K
    torch.manual_seed(0)
    B, L, H, V = 8, 1024, 64, 256000
    h = torch.randn(B, L, H, requires_grad=True)
    W = (torch.randn(V, H) * 0.05).requires_grad_()
    t = torch.randint(0, V, (B, L))
    mask = torch.rand(B, L) < 0.8
    adv = torch.randn(B)
    old = -torch.rand(B, L) * 10
    ref = -torch.rand(B, L) * 10
    W.grad = torch.zeros_like(W); h.grad = torch.zeros_like(h)     # the .grad buffers are the caller's
    kib = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    before = kib()
    loss, m = K.fused_exgrpo_loss(h, W, t, mask, adv, old_logp=old, ref_logp=ref, backend="torch")
    loss.backward()
    after = kib()
    print(json.dumps({"growth_mb": (after - before) / 1024, "loss": loss.item(), "n": m["n_tokens"].item()}))
''')


@pytest.mark.slow
def test_fused_loss_peak_rss_growth_is_bounded():
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    rec = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"peak RSS growth {rec['growth_mb']:.0f} MB for N=8192, V=256000 (fp32 logits: 8389 MB)")
    assert rec["growth_mb"] < 1000, rec
    assert rec["n"] > 0 and rec["loss"] == rec["loss"]
