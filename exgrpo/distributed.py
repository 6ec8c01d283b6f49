"""PyTorch's own distributed engine, thinly: process group from torchrun's environment, FSDP2
sharding per decoder layer, and the few collectives the loops need. No home-made communication.

    torchrun --nproc-per-node 4 -m exgrpo train --config train.toml
    torchrun --nnodes 2 --node-rank $R --master-addr $HOST --nproc-per-node 8 -m exgrpo train ...

Without torchrun (no WORLD_SIZE in the environment) everything here is a no-op on one process.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    group: bool = False                          # joined the process group torchrun set up (even a world of 1)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def on(self) -> bool:
        # Ours, not torch.distributed.is_initialized(): a colocated vLLM engine sets up a process group of its own.
        return self.world > 1 or self.group


SINGLE = Dist()                                  # one process, no process group


def init(device: str = "auto", timeout_s: float = 600.0) -> tuple[Dist, torch.device]:
    """Join the job torchrun started (gloo on CPU, nccl on CUDA). A collective that waits longer than
    `timeout_s` (a dead peer) raises instead of hanging forever; torchrun then stops every rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    dev = torch.device(f"cuda:{local}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(dev)
    group = "WORLD_SIZE" in os.environ
    if group and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=dev if cuda else None)
    return Dist(rank, world, local, group), dev


def close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_sum(values: list[float], d: Dist, device) -> list[float]:
    """Sum a few scalars over ranks (token counts, metric sums)."""
    if not d.on:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def from_main(value, d: Dist):
    """Rank 0's `value` (any picklable object) on every rank: a decision one rank makes for all."""
    if not d.on:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(d: Dist) -> None:
    if d.on:
        dist.barrier()


def shard(module: torch.nn.Module, layers, *, mixed_precision: bool) -> torch.nn.Module:
    """FSDP2: each decoder layer is its own unit, the root (embeddings, final norm, tied LM head,
    LoRA-free rest) another. Mixed precision: bf16 parameters, fp32 gradient reduction."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision else None
    kw = {"mp_policy": mp} if mp is not None else {}
    for layer in layers:
        fully_shard(layer, **kw)
    fully_shard(module, **kw)
    return module


def init_root(policy: torch.nn.Module, pad_id: int, device) -> None:
    """One tiny forward through the Policy, so FSDP2's lazy initialisation sees the Policy as the root.
    Generation later calls the inner model directly; without this, its first layer would claim to be
    a root and FSDP refuses ("already been lazily initialized")."""
    from torch.distributed.fsdp import FSDPModule
    if not isinstance(policy, FSDPModule):
        return
    ids = torch.full((1, 2), pad_id, device=device)
    with torch.no_grad():
        policy(ids, torch.ones_like(ids), torch.full_like(ids, -100), logprobs_only=True)
    policy.reshard()            # the root stays unsharded after a forward; the optimizer must see the shards


def local_bytes(module: torch.nn.Module) -> int:
    """Bytes of parameters this rank holds (its shards under FSDP2)."""
    total = 0
    for p in module.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        total += local.numel() * local.element_size()
    return total


@contextlib.contextmanager
def gathered(policy: torch.nn.Module, d: Dist):
    """Full parameters on every rank for the duration (generation). Ranks generate different
    lengths, so the per-layer all-gathers FSDP does in each forward would not line up: unshard every
    unit once, up front, keep it unsharded across forwards, reshard after."""
    if not d.on:
        yield
        return
    from torch.distributed.fsdp import FSDPModule
    units = [m for m in policy.modules() if isinstance(m, FSDPModule)]
    for m in units:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m in units:
            m.reshard()
            m.set_reshard_after_forward(True, recurse=False)


def clip_grad_norm(params, max_norm: float) -> float:
    """The global gradient norm (over all shards) after clipping to max_norm, as a float."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def all_max(values: list[float], d: Dist, device) -> list[float]:
    if not d.on:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()
