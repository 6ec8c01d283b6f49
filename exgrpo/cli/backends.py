"""`exgrpo backends`: which kernel backends can run here, and why any cannot."""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available, else cpu)")


def run(args) -> int:
    import torch

    from exgrpo.kernels import available
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(f"kernel backends for {device} tensors:")
    for name, why in available(device).items():
        print(f"  {name:7s} {'available' if why is None else 'unavailable: ' + why}")
    return 0
