"""The optimizer (AdamW, fused where the device has it, or torchao's 8-bit AdamW) with linear
warm-up and a cosine or constant schedule.

Memory per trainable parameter, for bf16 weights: "adamw" keeps two bf16 moments (4 B; two fp32
moments for fp32 weights, 8 B); "adamw8bit" keeps two block-quantised int8 moments (2 B + a scale per
256 values) and, on bf16 weights, rounds the update stochastically so small steps are not lost.
"""
from __future__ import annotations

import math

import torch

OPTIMIZERS = ("adamw", "adamw8bit")
BETAS = (0.9, 0.95)


def make_optimizer(model, *, lr: float, weight_decay: float, warmup_steps: int, total_steps: int,
                   schedule: str = "cosine", optimizer: str = "adamw", fused: bool | None = None):
    """(optimizer, scheduler) over the trainable parameters. AdamW is torch's fused kernel when every
    parameter is on CUDA (`fused` forces the choice: exgrpo.plan plans a GPU's on CPU tensors)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"schedule must be 'cosine' or 'constant', got {schedule!r}")
    if optimizer == "adamw":
        if fused is None:
            fused = all(p.is_cuda for p in params)
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=BETAS, fused=fused or None)
    elif optimizer == "adamw8bit":
        try:
            from torchao.optim import AdamW8bit
        except ImportError as e:
            raise RuntimeError("optimizer='adamw8bit' needs torchao (pip install 'exgrpo[lean]')") from e
        bf16 = all(p.dtype == torch.bfloat16 for p in params)
        opt = AdamW8bit(params, lr=lr, weight_decay=weight_decay, betas=BETAS, bf16_stochastic_round=bf16)
    else:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if schedule == "constant":
            return 1.0
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))   # cosine to 10 % of the peak

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)
