"""The SFT and ExGRPO loops on the tiny student: they learn, resume exactly, survive kills, guard
against non-finite steps, and wire rewards, the DSU bonus and the LoRA reference correctly."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from _helpers import exported_weights

from exgrpo import checkpoint
from exgrpo.models import ModelError, load_model
from exgrpo.sft import SFTConfig, sft
from exgrpo.train import TrainConfig, train


def small_train(model, probes, out, **kw):
    base = dict(model=str(model), probes=str(probes), out=str(out), steps=3, questions_per_step=2, group_size=2,
                k_probes=2, max_new_tokens=12, lr=1e-3, save_every=1, progress=False)
    return TrainConfig(**{**base, **kw})


def test_sft_learns_and_exports(tiny_student, probe_dir, tmp_path):
    out = sft(SFTConfig(model=str(tiny_student), probes=str(probe_dir), out=str(tmp_path / "sft"), epochs=1,
                        batch_size=16, lr=3e-3, warmup_steps=2, progress=False))
    recs = [json.loads(x) for x in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["nll"])) for r in recs)
    assert recs[-1]["nll"] < recs[0]["nll"] - 0.3, "SFT must reduce the NLL"
    before, after = exported_weights(tiny_student), exported_weights(out)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    m = load_model(out)                                          # the export loads with from_pretrained
    assert m.config.vocab_size == load_model(tiny_student).config.vocab_size
    assert (tmp_path / "sft" / "curves.png").exists()


def test_exgrpo_steps_are_finite_and_move_the_parameters(tiny_student, probe_dir, tmp_path):
    out = train(small_train(tiny_student, probe_dir, tmp_path / "rl"))
    recs = [json.loads(x) for x in (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert all(not r["skipped"] and r["loss"] == r["loss"] for r in recs)
    assert all(r["n_tokens"] > 0 and r["n_sft_tokens"] > 0 for r in recs)
    before, after = exported_weights(tiny_student), exported_weights(out)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    cfg = json.loads((tmp_path / "rl" / "config.json").read_text())
    assert cfg["group_size"] == 2 and cfg["delta"] == 0.5
    assert (tmp_path / "rl" / "curves.png").exists()


def test_resume_is_bit_identical(tiny_student, probe_dir, tmp_path):
    kw = dict(steps=4, updates_per_batch=2, beta=0.04)
    full = train(small_train(tiny_student, probe_dir, tmp_path / "a", **kw))
    # the same run, stopped after 2 steps, then resumed to 4
    train(small_train(tiny_student, probe_dir, tmp_path / "b", **{**kw, "steps": 2}))
    (tmp_path / "b" / "export").rename(tmp_path / "b-export-at-2")
    resumed = train(small_train(tiny_student, probe_dir, tmp_path / "b", **kw, resume=True))
    wa, wb = exported_weights(full), exported_weights(resumed)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{k} differs after resume"
    la = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    lb = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    strip = lambda lines: [{k: v for k, v in json.loads(x).items() if k != "seconds"} for x in lines]
    assert strip(la) == strip(lb)


def test_a_crash_inside_save_leaves_the_previous_checkpoint(tiny_student, probe_dir, tmp_path, monkeypatch):
    run = tmp_path / "rl"
    train(small_train(tiny_student, probe_dir, run, steps=1))
    good = checkpoint.latest(run)
    assert good is not None and good.name == "ckpt-000001"

    real_replace = os.replace

    def crash(src, dst):
        if "ckpt-000002" in str(dst):
            raise KeyboardInterrupt("killed mid-save")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        train(small_train(tiny_student, probe_dir, run, steps=2, resume=True))
    monkeypatch.setattr(os, "replace", real_replace)
    assert checkpoint.latest(run) == good
    train(small_train(tiny_student, probe_dir, run, steps=2, resume=True))   # and the run goes on from there
    assert checkpoint.latest(run).name == "ckpt-000002"


SAVE_LOOP = textwrap.dedent(r'''
    import sys, torch
    from exgrpo import checkpoint
    from exgrpo.models import load_model
    from exgrpo.optim import make_optimizer
    model = load_model(sys.argv[1])
    opt, sched = make_optimizer(model, lr=1e-3, weight_decay=0, warmup_steps=0, total_steps=10)
    for step in range(1, 10000):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)                      # every checkpoint's weights differ: w0 + step
        checkpoint.save(sys.argv[2], step, model, opt, sched, {"bad_streak": 0}, keep=2)
        print(step, flush=True)
''')


def test_sigkill_during_checkpoint_writes_leaves_a_loadable_checkpoint(tiny_student, tmp_path):
    run = tmp_path / "kill"
    for delay in (1.5, 2.3):
        p = subprocess.Popen([sys.executable, "-c", SAVE_LOOP, str(tiny_student), str(run)], stdout=subprocess.PIPE,
                             text=True)
        deadline = time.time() + 60
        while time.time() < deadline and not (run / "latest").exists():
            time.sleep(0.05)
        time.sleep(delay)                                       # somewhere inside a later save
        p.send_signal(signal.SIGKILL)
        p.wait()
        last = checkpoint.latest(run)
        assert last is not None
        step = json.loads((last / "state.json").read_text())["step"]
        from exgrpo.optim import make_optimizer
        model = load_model(tiny_student)
        w0 = {k: v.clone() for k, v in model.state_dict().items()}
        opt, sched = make_optimizer(model, lr=1e-3, weight_decay=0, warmup_steps=0, total_steps=10)
        checkpoint.load(last, model, opt, sched)
        k = next(iter(w0))
        assert torch.allclose(model.state_dict()[k], w0[k] + step), "the checkpoint holds exactly its step's weights"


def test_non_finite_steps_are_skipped_then_the_run_stops(tiny_student, probe_dir, tmp_path, monkeypatch):
    import exgrpo.batching as B
    run = tmp_path / "nan"
    train(small_train(tiny_student, probe_dir, run, steps=1))
    good = checkpoint.latest(run)
    w_good = exported_weights(good / "model")
    real = B.loss_and_backward

    def poisoned(*a, **k):
        m = real(*a, **k)
        return {**m, "loss": float("nan")}

    monkeypatch.setattr(B, "loss_and_backward", poisoned)
    with pytest.raises(FloatingPointError, match="3 non-finite steps in a row"):
        train(small_train(tiny_student, probe_dir, run, steps=10, resume=True, max_bad_steps=3))
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in recs] == [False, True, True, True]
    assert checkpoint.latest(run) == good
    w_now = exported_weights(checkpoint.latest(run) / "model")
    assert all(torch.equal(w_good[k], w_now[k]) for k in w_good)


class ScriptedEngine:
    """Answers Q correctly only after all three Scenario A probes; Scenario B has k' <= 2 of them."""

    def generate(self, convs):
        out = []
        for c in convs:
            last = c[-1]["content"]
            if last in self.gold:                                   # the original question
                n_probes = (len(c) - 1) // 2
                gold = self.gold[last]
                out.append(f"The answer is {gold if n_probes >= 3 else int(gold) + 1}.")
            else:
                out.append("The answer is 0.")
        return out


def test_reward_and_bonus_wiring(tiny_student, probe_dir, tmp_path):
    from exgrpo.dialogues import load_probe_set, question_message
    eng = ScriptedEngine()
    eng.gold = {question_message(it.example)["content"]: it.example.answer for it in load_probe_set(probe_dir)}
    train(small_train(tiny_student, probe_dir, tmp_path / "w", steps=2, k_probes=3, group_size=3), engine=eng)
    recs = [json.loads(x) for x in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    for r in recs:
        assert r["acc_full"] == 1.0 and r["acc_partial"] == 0.0
        assert r["dsu_fire_rate"] == 1.0
        assert r["reward"] == pytest.approx((3 * 1.5 + 3 * 0.0) / 6)   # R_base + δ on every correct A
        # a signal in every group, but z-scores of two values are the same whatever δ adds: the bonus moved none
        assert r["adv_nonzero_frac"] == 1.0 and r["bonus_changed_frac"] == 0.0
    # without the bonus the same outcomes earn R_base only, and the firing is still reported
    train(small_train(tiny_student, probe_dir, tmp_path / "nb", steps=1, k_probes=3, group_size=3, bonus=False),
          engine=eng)
    r = json.loads((tmp_path / "nb" / "metrics.jsonl").read_text().splitlines()[0])
    assert r["reward"] == pytest.approx(0.5) and r["dsu_fire_rate"] == 1.0


def test_bad_inputs_fail_before_compute(tiny_student, probe_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "probe_set.jsonl").write_text("")
    with pytest.raises(ValueError, match="no kept question"):
        train(small_train(tiny_student, tmp_path / "empty", tmp_path / "o1"))
    nowt = tmp_path / "noweights"
    nowt.mkdir()
    (nowt / "config.json").write_text((tiny_student / "config.json").read_text())
    with pytest.raises(ModelError, match="no weights"):
        train(small_train(nowt, probe_dir, tmp_path / "o2"))
    with pytest.raises(ValueError, match="context is 1024"):
        train(small_train(tiny_student, probe_dir, tmp_path / "o3", max_new_tokens=400, k_probes=5))
    notpl = tmp_path / "notemplate"
    import shutil
    shutil.copytree(tiny_student, notpl)
    cfg = json.loads((notpl / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (notpl / "tokenizer_config.json").write_text(json.dumps(cfg))
    for f in notpl.glob("chat_template.*"):
        f.unlink()
    with pytest.raises(ModelError, match="no chat template"):
        train(small_train(notpl, probe_dir, tmp_path / "o4"))


def test_lora_reference_is_the_base_model(tiny_student, probe_dir):
    from exgrpo.batching import Sequence, micro_batches, sequence_logprobs
    from exgrpo.dialogues import SFT, dialogue, load_probe_set, render
    from exgrpo.models import init_student, reference_mode
    model, tok, dev = init_student(tiny_student, lora=True, lora_r=4)
    with torch.no_grad():                                       # a trained-looking adapter
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    it = load_probe_set(probe_dir)[0]
    t = render(tok, dialogue(list(it.probes[:2]), None, None, None, answer_train=SFT))
    seqs = [Sequence(t.ids, t.policy, t.sft)]
    mbs = micro_batches(seqs, 4096, tok.pad_token_id, dev)
    from exgrpo.policy import Policy
    base = Policy(load_model(tiny_student))
    lp_base = sequence_logprobs(base, mbs, seqs)[0]
    with reference_mode(model):
        lp_ref = sequence_logprobs(Policy(model), mbs, seqs)[0]
    lp_policy = sequence_logprobs(Policy(model), mbs, seqs)[0]
    torch.testing.assert_close(lp_ref, lp_base, rtol=1e-5, atol=1e-5)
    assert (lp_policy - lp_base).abs().max() > 1e-2, "the adapter must change the policy"


def test_ctrl_c_saves_the_finished_steps(tiny_student, probe_dir, tmp_path, monkeypatch):
    import exgrpo.rollout as R
    run = tmp_path / "int"
    calls = {"n": 0}
    real = R.run_dialogues

    def interrupt_on_third_step(engine, turns):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(engine, turns)

    monkeypatch.setattr(R, "run_dialogues", interrupt_on_third_step)
    with pytest.raises(KeyboardInterrupt):
        train(small_train(tiny_student, probe_dir, run, steps=5, save_every=100))
    assert checkpoint.latest(run).name == "ckpt-000002"


def test_rollouts_hold_no_gradients(tiny_student, probe_dir, tmp_path, monkeypatch):
    """The optimizer step frees the gradients: the next rollout (KV cache, vLLM wake-up) must not share the GPU
    with a model-sized set of them."""
    import exgrpo.rollout as R
    seen, real = [], R.run_dialogues

    def record(engine, turns):
        seen.append(any(p.grad is not None for p in engine.model.parameters()))
        return real(engine, turns)

    monkeypatch.setattr(R, "run_dialogues", record)
    train(small_train(tiny_student, probe_dir, tmp_path / "g", steps=2))
    assert len(seen) >= 2 and not any(seen), seen


def test_cli_sft_then_train(tiny_student, probe_dir, tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    r = subprocess.run([sys.executable, "-m", "exgrpo", "sft", "--model", str(tiny_student), "--probes",
                        str(probe_dir), "--out", str(tmp_path / "sft"), "--epochs", "0.2", "--no-progress"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "exported:" in r.stdout
    cfg = tmp_path / "train.toml"
    cfg.write_text(f'[train]\nmodel = "{tmp_path}/sft/export"\nprobes = "{probe_dir}"\nsteps = 1\n'
                   f'questions_per_step = 1\ngroup_size = 2\nmax_new_tokens = 8\n')
    r = subprocess.run([sys.executable, "-m", "exgrpo", "train", "--config", str(cfg), "--out", str(tmp_path / "rl"),
                        "--no-progress", "--beta", "0"], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    saved = json.loads((tmp_path / "rl" / "config.json").read_text())
    assert saved["steps"] == 1 and saved["beta"] == 0.0 and saved["out"] == str(tmp_path / "rl")
    r = subprocess.run([sys.executable, "-m", "exgrpo", "train", "--config", str(cfg), "--stepz", "3"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode != 0 and "stepz" in r.stderr


def test_micro_batches_give_targets_only_where_trained():
    from exgrpo.kernels import IGNORE_INDEX

    from exgrpo.batching import Sequence, micro_batches
    g = torch.Generator().manual_seed(0)
    seqs = []
    for n in (9, 14, 5):
        ids = torch.randint(3, 50, (n,), generator=g).tolist()
        pol = (torch.rand(n, generator=g) < 0.4).tolist()
        sft = [(not p) and bool(r < 0.3) for p, r in zip(pol, torch.rand(n, generator=g).tolist())]
        seqs.append(Sequence(ids, pol, sft))
    mbs = micro_batches(seqs, 28, 0, "cpu", packed=False)
    assert sorted(i for mb in mbs for i in mb.index) == [0, 1, 2] and len(mbs) > 1
    for mb in mbs:
        for r, i in enumerate(mb.index):
            s, n = seqs[i], len(seqs[i].ids)
            trained = torch.tensor(s.policy[1:]) | torch.tensor(s.sft[1:])
            want = torch.where(trained, torch.tensor(s.ids[1:]), IGNORE_INDEX)
            assert torch.equal(mb.targets[r, : n - 1], want)
            assert (mb.targets[r, n - 1:] == IGNORE_INDEX).all() and not mb.mask[r, n - 1:].any()
            assert torch.equal(mb.mask[r, : n - 1], torch.tensor(s.policy[1:]))
            assert torch.equal(mb.sft_mask[r, : n - 1], torch.tensor(s.sft[1:]))
            assert (mb.attention[r, :n] == 1).all() and (mb.attention[r, n:] == 0).all()


def test_adamw8bit_trains_checkpoints_and_resumes(tiny_student, probe_dir, tmp_path):
    """The memory-lean optimizer (torchao's 8-bit AdamW): its quantised moments survive a
    checkpoint, so a resumed run ends where the uninterrupted one does."""
    pytest.importorskip("torchao.optim")
    from exgrpo.checkpoint import latest
    kw = dict(steps=2, optimizer="adamw8bit", lora=True, lora_r=4, save_every=1)
    full = train(small_train(tiny_student, probe_dir, tmp_path / "a", **kw))
    train(small_train(tiny_student, probe_dir, tmp_path / "b", **{**kw, "steps": 1}))
    resumed = train(small_train(tiny_student, probe_dir, tmp_path / "b", **kw, resume=True))
    assert latest(tmp_path / "b").name.endswith("2")
    wa, wb, w0 = exported_weights(full), exported_weights(resumed), exported_weights(tiny_student)
    assert wa.keys() == wb.keys()
    assert any(not torch.equal(wa[k], w0[k]) for k in wa), "the 8-bit optimizer must move the weights"
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{k} differs after resume"


def test_exgrpo_trains_on_packed_micro_batches_by_default(tiny_student, probe_dir, tmp_path):
    """Packed rows are the default (on CPU, sdpa: rows as wide as the longest sequence, filled first-fit, so
    less padding than --no-packed's one row per sequence), and the step's loss is the same
    (tests/test_packing.py checks every layout against the float64 truth)."""
    assert TrainConfig().packed
    train(small_train(tiny_student, probe_dir, tmp_path / "packed", steps=1))
    train(small_train(tiny_student, probe_dir, tmp_path / "padded", steps=1, packed=False))
    rp, rq = (json.loads((tmp_path / d / "metrics.jsonl").read_text().splitlines()[0]) for d in ("packed", "padded"))
    assert rp["padding_frac"] <= rq["padding_frac"]
    assert rp["n_tokens"] == rq["n_tokens"] and rp["n_sft_tokens"] == rq["n_sft_tokens"]
    assert rp["loss"] == pytest.approx(rq["loss"], rel=1e-3)


def test_advantage_stats_count_the_groups_with_a_signal_and_those_the_bonus_moved():
    from exgrpo import step as S
    G = 3
    # A's G then B's G per question: fires and moves (three distinct totals); fires, moves nothing (two values);
    # no signal at all
    outcome = torch.tensor([[1., 1, 0, 1, 0, 0], [1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
    rew = S.Rewards(outcome, torch.tensor([[True] * G + [False] * G] * 3))
    cfg = TrainConfig(model="m", probes="p")
    adv = S.advantages(rew, cfg)
    assert adv.fired.tolist() == [True, True, False]
    assert S.advantage_stats(rew, adv, cfg) == (2, 1)
    off = TrainConfig(model="m", probes="p", bonus=False)
    assert S.advantage_stats(rew, S.advantages(rew, off), off) == (2, 0)
