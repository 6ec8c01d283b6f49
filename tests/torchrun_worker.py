"""Entry point for the torchrun tests (tests/test_distributed.py): runs exgrpo's SFT or ExGRPO loop
with a deterministic scripted rollout engine, so runs on different numbers of processes see the same
global batch. Optionally kills one rank mid-step.

    torchrun --standalone --nproc-per-node 2 tests/torchrun_worker.py train '<TrainConfig json>' [kill_rank kill_step]
"""
import json
import os
import signal
import sys

import torch.distributed as dist

from exgrpo import distributed
from exgrpo.dialogues import question_message


class ScriptedEngine:
    """Right after all of Scenario A's probes, wrong otherwise; the wrong answer depends on the
    conversation so that groups are not all equal."""

    def __init__(self, gold):
        self.gold = gold

    def generate(self, convs):
        out = []
        for c in convs:
            last = c[-1]["content"]
            n_probes = (len(c) - 1) // 2
            if last in self.gold:
                ans = self.gold[last] if n_probes >= 2 else str(int(self.gold[last]) + n_probes + 1)
                out.append(f"Let me think. The answer is {ans}.")
            else:
                out.append(f"Probe answer {len(last) % 7}. The answer is {len(last) % 5}.")
        return out


def memory(cfg):
    """Per-rank bytes of parameters + AdamW state after one step: what sharding saves."""
    import torch

    from exgrpo.batching import equalize
    from exgrpo.models import load_model, load_tokenizer
    from exgrpo.optim import make_optimizer
    from exgrpo.policy import Policy
    d, dev = distributed.init("cpu")
    tok = load_tokenizer(cfg["model"])
    policy = Policy(load_model(cfg["model"]))
    if d.on:
        distributed.shard(policy, policy.decoder_layers(), mixed_precision=False)
    opt, _ = make_optimizer(policy, lr=1e-3, weight_decay=0.0, warmup_steps=0, total_steps=1)
    mb = equalize([], 1, tok.pad_token_id, dev)[0]
    mb.sft_mask[:] = False
    mb.targets[0, 0] = 1
    mb.sft_mask[0, 0] = True
    loss, _ = policy(mb.input_ids, mb.attention, mb.targets, mask=mb.mask, advantages=torch.zeros(1),
                     sft_mask=mb.sft_mask, aux_coef=1.0)
    loss.backward()
    opt.step()
    state = 0
    for st in opt.state.values():
        for v in st.values():
            if torch.is_tensor(v) and v.dim() > 0:
                local = v.to_local() if hasattr(v, "to_local") else v
                state += local.numel() * local.element_size()
    rec = {"rank": d.rank, "world": d.world, "param_bytes": distributed.local_bytes(policy), "optim_bytes": state}
    with open(os.path.join(cfg["out"], f"mem-{d.world}-{d.rank}.json"), "w") as f:
        json.dump(rec, f)
    distributed.close()


def main():
    kind, cfg_json = sys.argv[1], json.loads(sys.argv[2])
    kill = (int(sys.argv[3]), int(sys.argv[4])) if len(sys.argv) > 4 else None
    if kind == "memory":
        return memory(cfg_json)
    if kind == "sft":
        from exgrpo.sft import SFTConfig, sft
        sft(SFTConfig(**cfg_json))
    else:
        from exgrpo import rollout
        from exgrpo.dialogues import load_probe_set
        from exgrpo.train import TrainConfig, train
        items = load_probe_set(cfg_json["probes"])
        eng = ScriptedEngine({question_message(it.example)["content"]: it.example.answer for it in items})
        if kill is not None:
            real, calls = rollout.run_dialogues, {"n": 0}

            def run_dialogues(engine, turns):
                calls["n"] += 1
                if int(os.environ.get("RANK", 0)) == kill[0] and calls["n"] == kill[1]:
                    os.kill(os.getpid(), signal.SIGKILL)          # a rank dies mid-step
                return real(engine, turns)

            rollout.run_dialogues = run_dialogues
        train(TrainConfig(**cfg_json), engine=eng)
    if dist.is_initialized():
        distributed.close()


if __name__ == "__main__":
    main()
