"""The settings the training commands share, each defined once, composed into SFTConfig (exgrpo.sft),
TrainConfig (exgrpo.train) and, through those two, DemoConfig (exgrpo.demo).

Composition is by dataclass inheritance, so every field stays a flat `--flag` and a flat config-file
key, as before. Field order follows the reverse MRO: `class SFTConfig(RunSettings, OptimSettings,
KernelSettings, ModelSettings, Paths)` lists paths first and run settings last. A command whose
default differs (SFT's learning rate, say) re-states only the default; the help text stays the one
written here (configs._field_comments walks the MRO).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Attention = Literal["auto", "sdpa", "eager", "flash_attention_2", "flex_attention"]


@dataclass
class Paths:
    model: str = "runs/student0"            # the model folder to start from (a transformers checkpoint)
    probes: str = "runs/probes"             # probe_set.jsonl or its folder (exgrpo probe)
    out: str = "runs/out"                   # the run folder: config, metrics, checkpoints, export


@dataclass
class ModelSettings:
    lora: bool = False                      # train LoRA adapters instead of every weight
    lora_r: int = 16
    lora_alpha: int = 32
    dtype: Literal["auto", "bf16", "fp32"] = "auto"   # auto: bf16 on CUDA, fp32 on CPU
    device: str = "auto"                    # auto: cuda if available, else cpu
    gradient_checkpointing: bool = False    # recompute each layer's activations in backward
    attention: Attention = "auto"           # auto: flash_attention_2 on CUDA when installed, else sdpa


@dataclass
class KernelSettings:
    backend: str = "auto"                   # LM-head kernel backend: auto, torch, triton, cuda
    chunk_mb: float | None = None           # LM-head logits chunk, MB (none: EXGRPO_CHUNK_MB, else 2048 CUDA, 256 CPU)
    micro_batch_tokens: int = 16384         # tokens per forward/backward pass
    packed: bool = True                     # micro-batches as packed rows (position ids restart per sequence)


@dataclass
class FitSettings:
    auto_fit: bool = False                  # micro-batch, checkpointing, LM-head chunk, rollout batch by `exgrpo plan`
    gpu_memory: str | None = None           # --auto-fit's device memory (141GB, 80GiB); default: the visible GPU's


@dataclass
class OptimSettings:
    lr: float = 1e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: Literal["cosine", "constant"] = "constant"
    grad_clip: float = 1.0
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"   # adamw8bit: torchao's 8-bit moments (full FT memory)


@dataclass
class RunSettings:
    seed: int = 0
    save_every: int = 25                    # checkpoint every N optimizer steps (and at the end)
    keep_checkpoints: int = 2
    max_bad_steps: int = 3                  # stop after this many non-finite steps in a row
    resume: bool = False                    # continue from the run folder's newest loadable checkpoint
    overwrite: bool = False                 # start over in a folder that holds a run (deletes its checkpoints)
    progress: bool = True


def require_positive(cfg, names: tuple[str, ...]) -> None:
    """Counts that must be at least 1, named before anything loads."""
    for name in names:
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
