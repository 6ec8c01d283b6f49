"""AdamW (fused where the device has it) with linear warm-up and a cosine or constant schedule."""
from __future__ import annotations

import math

import torch


def make_optimizer(model, *, lr: float, weight_decay: float, warmup_steps: int, total_steps: int,
                   schedule: str = "cosine"):
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    fused = all(p.is_cuda for p in params)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95), fused=fused or None)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if schedule == "constant":
            return 1.0
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))   # cosine to 10 % of the peak

    if schedule not in ("cosine", "constant"):
        raise ValueError(f"schedule must be 'cosine' or 'constant', got {schedule!r}")
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)
