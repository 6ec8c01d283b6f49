import subprocess
import sys


def test_exgrpo_backends_lists_every_backend():
    r = subprocess.run([sys.executable, "-m", "exgrpo", "backends", "--device", "cpu"], capture_output=True,
                       text=True, timeout=120, env={"PATH": "/usr/bin:/bin", "TRITON_INTERPRET": "0"})
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "torch   available" in out
    assert "triton  unavailable: Triton runs on CPU tensors only in its interpreter" in out
    assert "cuda    unavailable" in out
