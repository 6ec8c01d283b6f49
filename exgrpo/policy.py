"""The student as the training loops see it: one module whose forward goes from token ids to the
fused ExGRPO loss (or to token log-probs), through the decoder's final hidden states and the LM-head
weight, never through [B, L, V] logits.

Keeping the loss inside one forward matters under FSDP2: the tied embedding/LM head belongs to the
root unit, which is unsharded exactly for the duration of the root's forward and backward, so the
kernel sees the whole weight and its gradient is reduce-scattered like any other.
"""
from __future__ import annotations

import torch

from exgrpo.kernels import fused_exgrpo_loss, token_logprobs
from exgrpo.models import hidden_states, lm_head


class Policy(torch.nn.Module):
    """`backend` and `chunk_mb` (the kernel settings, exgrpo.settings.KernelSettings) are fixed here, once,
    for every forward; `pad_id` fills the padded layout's empty positions."""

    def __init__(self, model: torch.nn.Module, *, pad_id: int = 0, backend: str = "auto",
                 chunk_mb: float | None = None):
        super().__init__()
        self.model = model
        self.pad_id, self.backend, self.chunk_mb = pad_id, backend, chunk_mb

    def forward(self, input_ids, attention_mask, targets, *, position_ids=None, logprobs_only: bool = False,
                temperature: float = 1.0, **loss_kwargs):
        """attention_mask [b, T] (padded rows) or None with position_ids [b, T] (packed rows)."""
        h = hidden_states(self.model, input_ids, attention_mask, position_ids)     # [b, T, H]
        W, softcap = lm_head(self.model)                                 # [V, H], tied to the embedding
        kernel = dict(temperature=temperature, softcap=softcap, backend=self.backend, chunk_mb=self.chunk_mb)
        if logprobs_only:
            return token_logprobs(h, W, targets, **kernel)
        return fused_exgrpo_loss(h, W, targets, **kernel, **loss_kwargs)

    @property
    def one_row_packing(self) -> bool:
        """Packed micro-batches as one row: flash_attention_2 and flex_attention take sequence boundaries from
        the position ids and skip the attention between sequences (exgrpo.batching)."""
        from exgrpo.models import VARLEN_ATTENTION
        return getattr(self.model.config, "_attn_implementation", None) in VARLEN_ATTENTION

    def decoder_layers(self):
        causal = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        return list(causal.model.layers)


class EagerPolicy(torch.nn.Module):
    """The plain-PyTorch peer of `Policy`'s loss: the model's own forward to [b, T, V] logits, fp32
    log-softmax, gather, and the reference policy loss (kernels/reference.py) — what a trainer
    without fused kernels does. Called by exgrpo.batching.loss_and_backward like `Policy`: bench/step.py's
    loss_eager phase times it and `exgrpo plan --eager-loss` plans it."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, targets, *, position_ids=None, mask, advantages, old_logp=None,
                ref_logp=None, weights=None, sft_mask=None, aux_coef=0.0, eps_low=0.2, eps_high=0.2, beta=0.04,
                reduction="token_mean", temperature=1.0):
        from exgrpo.kernels import IGNORE_INDEX
        from exgrpo.kernels.reference import policy_loss_ref
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            use_cache=False).logits
        logp = (logits.float() / temperature).log_softmax(-1).gather(-1, targets.clamp(min=0).unsqueeze(-1))[..., 0]
        logp = torch.where(targets != IGNORE_INDEX, logp, torch.zeros_like(logp))
        return policy_loss_ref(logp, old_logp, ref_logp, advantages, mask, eps_low=eps_low, eps_high=eps_high,
                               beta=beta, weights=weights, sft_mask=sft_mask, aux_coef=aux_coef, reduction=reduction)
