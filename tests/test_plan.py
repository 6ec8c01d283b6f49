"""`exgrpo plan`: the step on fake tensors against the same step on real tensors, and planning Gemma-7B
without allocating it."""
import json
import resource
import subprocess
import sys

import pytest
import torch

from exgrpo.cli import main as cli_main
from exgrpo.plan import PlanConfig, PlanError, PlanMode, load_shape, parse_bytes, run_step

# Small steps that still have several micro-batches, packed rows, a KL reference or LoRA, the aux loss.
STEP = dict(questions_per_step=2, group_size=2, k_probes=3, max_new_tokens=6, probe_len=5, question_len=7,
            response_len=5, micro_batch_tokens=160, rollout_batch_size=4, gpu=False, dtype="fp32", seed=3)


@pytest.mark.parametrize("model, settings, wider", [
    ("tiny", dict(lora=False, beta=0.04), {}),                              # full fine-tuning + a reference copy
    # LoRA with recomputed activations, an MLP wide enough that checkpointing matters
    ("small", dict(lora=True, lora_r=4, gradient_checkpointing=True), {"intermediate_size": 2048}),
])
def test_the_plan_matches_the_same_step_on_real_tensors(model, settings, wider):
    cfg = PlanConfig(model_config=model, **STEP, **settings)
    shape = {**load_shape(model), **wider}
    planned, measured = run_step(cfg, shape, fake=True), run_step(cfg, shape, fake=False)
    assert planned["sequence_lens"] == measured["sequence_lens"] and planned["micro_batches"] > 1
    for phase in ("logprobs", "loss", "optimizer"):
        p, m = planned["phases"][phase], measured["phases"][phase]
        assert m["peak_bytes"] > 0 and abs(p["peak_bytes"] - m["peak_bytes"]) <= 0.05 * m["peak_bytes"], phase
        assert p["flops"] == m["flops"], phase                              # FLOPs come from shapes alone
    assert planned["phases"]["loss"]["flops"] > 0
    # The rollout is a formula (generation cannot run on fake tensors): what it adds to the persistent state
    # against what the real HF generate added, at this scale.
    persistent = sum(measured["phases"]["logprobs"]["by_kind"][k] for k in ("parameters", "buffers", "optimizer_state"))
    real_extra = measured["phases"]["rollout"]["peak_bytes"] - persistent
    formula = planned["phases"]["rollout"]["formula"]["peak_bytes"]
    assert real_extra > 0 and abs(formula - real_extra) <= 0.10 * real_extra, (formula, real_extra)


def test_checkpointing_shows_in_the_plan():
    """Recomputed layers hold no activations between forward and backward; with torch's FlopCounterMode around
    the step (module hooks) they did, and the plan said checkpointing saves nearly nothing."""
    shape = {**load_shape("small"), "intermediate_size": 2048}
    act = {ck: run_step(PlanConfig(model_config="small", **{**STEP, "beta": 0.0}, gradient_checkpointing=ck), shape)
           ["phases"]["loss"]["by_kind"]["activations"] for ck in (False, True)}
    assert act[True] < 0.5 * act[False], act


def test_fake_parameters_real_data():
    mode = PlanMode()
    mask = torch.tensor([True, False, True])
    with mode:
        w = torch.empty(1000, 1000)
        picked = w[mask]
        n = int(mask.sum())
        loss = float(w.sum())
    assert type(w).__name__ == "FakeTensor" and picked.shape == (2, 1000)
    assert n == 2 and not isinstance(mask.sum(), type(w))                  # data stays real
    assert loss == 0.0 and mode.scalars == 1                              # a value of a fake tensor: a stand-in


def test_sizes_and_errors(tmp_path, capsys):
    assert parse_bytes("141GB") == 141 * 10**9 and parse_bytes("80GiB") == 80 * 2**30 and parse_bytes("512") == 512
    with pytest.raises(PlanError, match="give a size such as 141GB"):
        parse_bytes("lots")
    if not torch.cuda.is_available():
        assert cli_main(["plan", "--model-config", "tiny"]) == 2
        assert "no GPU is visible here: give --gpu-memory" in capsys.readouterr().err
    assert cli_main(["plan", "--model-config", str(tmp_path / "nope"), "--gpu-memory", "1GB"]) == 2
    assert "not a built-in shape (gemma-7b, tiny, small), a config.json or a model folder" in capsys.readouterr().err
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert cli_main(["plan", "--model-config", str(tmp_path), "--gpu-memory", "1GB"]) == 2
    assert "model_type 'bert' is an encoder" in capsys.readouterr().err
    assert cli_main(["plan", "--model-config", "tiny", "--gpu-memory", "1GB", "--measure"]) == 2
    assert "pass --no-gpu" in capsys.readouterr().err


def test_planning_gemma_7b_allocates_nothing(tmp_path):
    out = tmp_path / "plan.json"
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    p = subprocess.run([sys.executable, "-m", "exgrpo", "plan", "--model-config", "gemma-7b", "--optimizer",
                        "adamw8bit", "--gpu-memory", "141GB", "--json", str(out)],
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    rss_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    assert rss_kib > before or before < 3 * 2**20                          # this child's peak is what is read
    assert rss_kib < 3 * 2**20, f"peak RSS {rss_kib / 2**20:.2f} GiB"      # ru_maxrss is in KiB on Linux
    plan = json.loads(out.read_text())
    assert set(plan) >= {"peak_bytes", "fits", "gpu_memory_bytes", "phases"} and plan["gpu_memory_bytes"] == 141 * 10**9
    assert set(plan["phases"]) == {"rollout", "logprobs", "loss", "optimizer"}
    assert all(isinstance(ph["peak_bytes"], int) for ph in plan["phases"].values())
    assert plan["phases"]["loss"]["flops"] > 10**13
    # Gemma-7B's 8.5 B parameters in bf16 are in every phase's peak; the plan's peak is at least that.
    params = plan["step"]["params"]
    assert 8.0e9 < params < 9.0e9 and plan["peak_bytes"] > 2 * params
    assert ("fits" if plan["fits"] else "does NOT fit") in p.stdout


def test_auto_fit_relieves_the_highest_phase_until_the_step_fits():
    from exgrpo.plan import auto_fit, plan
    base = PlanConfig(model_config="tiny", **{**STEP, "micro_batch_tokens": 4096}, gpu_memory="1GB", margin=0.0)
    first = plan(base)
    worst = max(first["phases"], key=lambda k: first["phases"][k]["peak_bytes"])
    assert worst == "loss"
    tight = PlanConfig(**{**base.__dict__, "gpu_memory": str(int(0.9 * first["peak_bytes"]))})
    said = []
    chosen, p, tries = auto_fit(tight, say=said.append)
    assert not tries[0]["fits"] and tries[0]["peak_bytes"] == first["peak_bytes"]   # the given setting, first
    assert p["fits"] and p["peak_bytes"] <= p["usable_bytes"]
    assert {k: getattr(chosen, k) for k in ("micro_batch_tokens", "gradient_checkpointing", "chunk_mb")} in [
        {k: t[k] for k in ("micro_batch_tokens", "gradient_checkpointing", "chunk_mb")} for t in tries if t["fits"]]
    assert chosen.gradient_checkpointing or chosen.micro_batch_tokens < 4096 or chosen.chunk_mb < 2048
    assert len(said) == len(tries) and all(s.startswith("auto-fit: {") for s in said)
    with pytest.raises(PlanError, match="nothing fits"):
        auto_fit(PlanConfig(**{**base.__dict__, "gpu_memory": "1000"}), say=lambda s: None)


def test_train_auto_fit_plans_the_run_and_records_the_choice(tiny_student, probe_dir, tmp_path):
    from exgrpo.plan import plan
    from exgrpo.train import train
    from tests.test_trainer import small_train
    cfg = small_train(tiny_student, probe_dir, tmp_path / "run", steps=1, micro_batch_tokens=4096)
    shared = {k: getattr(cfg, k) for k in PlanConfig.__dataclass_fields__ if k in cfg.__dataclass_fields__}
    first = plan(PlanConfig(**{**shared, "model_config": str(tiny_student), "gpu": False, "gpu_memory": "1GB"}))
    budget = int(0.9 * first["peak_bytes"] / (1 - 0.05))          # the given setting cannot fit: something changes
    out = train(small_train(tiny_student, probe_dir, tmp_path / "run", steps=1, micro_batch_tokens=4096,
                            auto_fit=True, gpu_memory=str(budget), device="cpu"))
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (saved["micro_batch_tokens"], saved["gradient_checkpointing"], saved["chunk_mb"]) != (4096, False, None)
    assert saved["auto_fit"] is True and out.is_dir()


def test_the_sft_plan_matches_the_same_step_on_real_tensors(tmp_path):
    """exgrpo sft's step (no rollout, no log-probs pass) on its longest batch, several micro-batches."""
    cfg = PlanConfig(model_config="tiny", stage="sft", batch_size=7, **{**STEP, "micro_batch_tokens": 48})
    shape = load_shape("tiny")
    planned, measured = run_step(cfg, shape, fake=True), run_step(cfg, shape, fake=False)
    assert set(planned["phases"]) == {"loss", "optimizer"} and planned["sequences"] == 7
    assert planned["micro_batches"] > 1 and planned["sequence_lens"] == measured["sequence_lens"]
    for phase in ("loss", "optimizer"):
        p, m = planned["phases"][phase], measured["phases"][phase]
        assert m["peak_bytes"] > 0 and abs(p["peak_bytes"] - m["peak_bytes"]) <= 0.05 * m["peak_bytes"], phase
        assert p["flops"] == m["flops"], phase
    # The batch planned is the longest one: the 7 longest of the SFT sequences (Q -> R_T and each probe's).
    from exgrpo.plan import _data
    from exgrpo.sft import sft_sequences
    tok, items = _data(cfg, shape, tmp_path)
    lens = sorted((len(s.ids) for s in sft_sequences(items, tok, cfg)), reverse=True)
    assert len(lens) > 7 and planned["tokens"] == sum(lens[:7])


def test_the_materialised_logits_peer_is_planned_and_measured_alike():
    """--eager-loss: the loss phase through [tokens, V] fp32 logits (bench/step.py's loss_eager peer). At a
    vocabulary where the fused kernel's chunk is far smaller than the logits, the peer's loss phase holds at least
    one fp32 [tokens, V] tensor more than exgrpo's."""
    shape = {**load_shape("tiny"), "vocab_size": 20000}
    base = dict(model_config="tiny", **{**STEP, "beta": 0.0}, chunk_mb=1.0)
    eager = PlanConfig(**base, eager_loss=True)
    planned, measured = run_step(eager, shape, fake=True), run_step(eager, shape, fake=False)
    p, m = planned["phases"]["loss"], measured["phases"]["loss"]
    assert abs(p["peak_bytes"] - m["peak_bytes"]) <= 0.05 * m["peak_bytes"] and p["flops"] == m["flops"]
    fused = run_step(PlanConfig(**base), shape, fake=True)["phases"]["loss"]["peak_bytes"]
    mb_tokens = min(STEP["micro_batch_tokens"], planned["tokens"])
    assert p["peak_bytes"] - fused >= 4 * shape["vocab_size"] * mb_tokens // 2, (p["peak_bytes"], fused)


def test_sft_auto_fit_plans_the_run_and_records_the_choice(tiny_student, probe_dir, tmp_path):
    from exgrpo.plan import plan
    from exgrpo.sft import SFTConfig, sft
    run = dict(model=str(tiny_student), probes=str(probe_dir), out=str(tmp_path / "sft"), epochs=0.1, batch_size=16,
               micro_batch_tokens=4096, progress=False, device="cpu")
    first = plan(PlanConfig.of(SFTConfig(**run), model_config=str(tiny_student), stage="sft", gpu=False,
                               gpu_memory="1GB"))
    assert set(first["phases"]) == {"loss", "optimizer"}
    budget = int(0.9 * first["peak_bytes"] / (1 - 0.05))          # the given setting cannot fit: something changes
    sft(SFTConfig(**run, auto_fit=True, gpu_memory=str(budget)))
    saved = json.loads((tmp_path / "sft" / "config.json").read_text())
    assert (saved["micro_batch_tokens"], saved["gradient_checkpointing"], saved["chunk_mb"]) != (4096, False, None)
    assert saved["auto_fit"] is True and "rollout_batch_size" not in saved
