"""`exgrpo demo`: the quick run goes end to end (every arm and split in the table, figure, report,
numbers from fresh-process evaluations of the arms' exports), --resume skips finished stages, and a
failing stage is named while the earlier ones stay finished."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from exgrpo.demo import ARMS, DemoConfig, collect, render_table

ROOT = Path(__file__).resolve().parent.parent


def demo(*args, timeout=300):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    return subprocess.run([sys.executable, "-m", "exgrpo", "demo", "--no-progress", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=timeout)


def stages(run: Path) -> dict:
    return json.loads((run / "status.json").read_text())["stages"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("demo") / "quick"
    p = demo("--quick", "--out", run)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return run, p


def test_quick_demo_runs_end_to_end(quick_run):
    run, p = quick_run
    res = json.loads((run / "results.json").read_text())
    assert res["arms"] == list(ARMS)
    assert set(res["splits"]) >= {"test", "ood"}
    for arm in ARMS:
        for split in ("test", "ood"):
            cell = res["table"][arm][split]
            assert cell["n"] == 1 and 0.0 <= cell["mean"] <= 1.0
        # The number is the one the fresh-process evaluation of this arm's own export wrote.
        ev = json.loads((run / "arms" / "seed0" / arm / "eval.json").read_text())
        assert Path(ev["model"]) == run / "arms" / "seed0" / arm / "export"
        assert ev["accuracy"]["ood"] == res["table"][arm]["ood"]["mean"]
    table = (run / "results.md").read_text()
    assert "held-in test" in table and "OOD" in table and table in p.stdout
    assert (run / "results.png").stat().st_size > 10_000
    report = (run / "report.md").read_text()
    assert "## The paper's claims, tested" in report and "## Before RL: can the bonus act?" in report
    pairs = {(c["a"], c["b"], c["split"]) for c in res["claims"]}
    assert ("exgrpo", "rl_aux", "ood") in pairs and ("sft_ei", "sft_vanilla_pairs", "test") in pairs
    assert all(c["verdict"] in ("shown", "not shown", "reversed") and c["n"] == 20 + (c["split"] == "ood")
               for c in res["claims"])
    assert all(s["state"] == "finished" for s in stages(run).values())
    # The instruct stage ran in rounds until its target or its last round, every SFT arm starts from its export,
    # and the precondition was measured on val at the EI-SFT export before RL.
    ins = res["instruct"]["0"]
    assert 1 <= len(ins["rounds"]) <= 2 and (ins["met"] or len(ins["rounds"]) == 2)
    for arm in ("sft_vanilla", "sft_vanilla_pairs", "sft_ei"):
        assert json.loads((run / "arms" / "seed0" / arm / "config.json").read_text())["model"] == ins["export"]
    pre = res["precondition"]["0"]
    assert pre["questions"] == res["data"]["val"] and 0 <= pre["bonus_changed"] <= pre["adv_nonzero"] <= 6
    names = list(stages(run))
    assert names.index("precondition:seed0") < names.index("rl_outcome:seed0")
    # RL arms start from the EI-SFT export and log reward + DSU firing per step.
    for arm in ("rl_outcome", "rl_aux", "exgrpo"):
        cfg = json.loads((run / "arms" / "seed0" / arm / "config.json").read_text())
        assert cfg["model"] == str(run / "arms" / "seed0" / "sft_ei" / "export")
        recs = (run / "arms" / "seed0" / arm / "metrics.jsonl").read_text().splitlines()
        assert "dsu_fire_rate" in json.loads(recs[-1])
    assert json.loads((run / "arms" / "seed0" / "rl_outcome" / "config.json").read_text())["bonus"] is False
    assert json.loads((run / "arms" / "seed0" / "rl_outcome" / "config.json").read_text())["aux_coef"] == 0.0
    assert json.loads((run / "arms" / "seed0" / "exgrpo" / "config.json").read_text())["bonus"] is True


def test_resume_skips_finished_stages(quick_run):
    run, _ = quick_run
    before = {a: (run / "arms" / "seed0" / a / "metrics.jsonl").stat().st_mtime_ns for a in ARMS}
    n_log = len((run / "demo.log").read_text().splitlines())
    p = demo("--quick", "--out", run, "--resume", timeout=60)
    assert p.returncode == 0, p.stderr[-3000:]
    new = (run / "demo.log").read_text().splitlines()[n_log:]
    names = list(stages(run))
    assert sum("finished earlier, skipped" in ln for ln in new) == len(names)
    assert not any(": running" in ln for ln in new)
    assert before == {a: (run / "arms" / "seed0" / a / "metrics.jsonl").stat().st_mtime_ns for a in ARMS}


def test_a_failing_stage_is_named_and_earlier_stages_are_kept(tmp_path):
    run = tmp_path / "d"
    p = demo("--quick", "--out", run, "--stop-after", "data", timeout=60)
    assert p.returncode == 0, p.stderr[-3000:]
    assert list(stages(run)) == ["data"]
    # Resume without --resume is refused rather than overwriting the run.
    assert demo("--quick", "--out", run, timeout=60).returncode == 2
    # So is --resume with other settings.
    p = demo("--quick", "--out", run, "--resume", "--n-train", "7", timeout=60)
    assert p.returncode == 2 and "n_train" in p.stderr
    # A broken input for the next stage.
    (run / "data" / "train.jsonl").write_text("{not json\n")
    p = demo("--quick", "--out", run, "--resume", timeout=60)
    assert p.returncode == 1
    assert "stage 'probes:filter1' failed" in p.stderr
    st = stages(run)
    assert st["data"]["state"] == "finished" and st["probes:filter1"]["state"] == "failed"
    assert "train.jsonl" in st["probes:filter1"]["error"]
    assert (run / "data" / "test.jsonl").stat().st_size > 0 and (run / "data" / "ood.jsonl").stat().st_size > 0
    assert "data: finished earlier, skipped" in (run / "demo.log").read_text()


def test_table_aggregates_seeds(tmp_path):
    """Mean ± sample std over seeds, read from each arm's eval.json."""
    cfg = DemoConfig(out=str(tmp_path), seeds=2, arms=("sft_vanilla", "sft_ei", "exgrpo"))
    accs = {"sft_vanilla": (0.2, 0.4), "sft_ei": (0.5, 0.5), "exgrpo": (0.6, 0.8)}
    for arm, (a0, a1) in accs.items():
        for s, a in ((0, a0), (1, a1)):
            d = tmp_path / "arms" / f"seed{s}" / arm
            d.mkdir(parents=True)
            rows = [{"split": "test", "accuracy": 0.9}, {"split": "ood", "accuracy": a}]
            (d / "eval.json").write_text(json.dumps({"results": rows}))
    (tmp_path / "status.json").write_text(json.dumps({"config": None, "stages": {}}))
    res = collect(cfg, tmp_path)
    assert res["table"]["sft_vanilla"]["ood"]["mean"] == pytest.approx(0.3)
    assert res["table"]["sft_vanilla"]["ood"]["std"] == pytest.approx(0.1414, abs=1e-3)
    assert res["target"]["met"] is True and res["target"]["exgrpo_ood"] == pytest.approx(0.7)
    assert "70.0 ± 14.1" in render_table(res)


def test_claims_are_paired_on_the_same_questions(tmp_path):
    """The claims table pairs each question of A with the same question of B (whatever order eval.json lists
    them in): 100 questions, A right on 0..59, B on 30..69: A only 30, B only 10, a gap of 20 points."""
    cfg = DemoConfig(out=str(tmp_path), arms=("sft_vanilla", "sft_ei"))
    right = {"sft_ei": range(0, 60), "sft_vanilla": range(30, 70)}
    for arm, r in right.items():
        d = tmp_path / "arms" / "seed0" / arm
        d.mkdir(parents=True)
        ids = list(range(100)) if arm == "sft_ei" else list(reversed(range(100)))
        ex = [{"split": sp, "id": f"q{i}", "correct": i in r} for sp in ("test", "ood") for i in ids]
        rows = [{"split": sp, "accuracy": len(r) / 100} for sp in ("test", "ood")]
        (d / "eval.json").write_text(json.dumps({"results": rows, "examples": ex}))
    (tmp_path / "status.json").write_text(json.dumps({"config": None, "stages": {}}))
    res = collect(cfg, tmp_path)
    c = next(c for c in res["claims"] if c["split"] == "test" and c["b"] == "sft_vanilla")
    assert (c["n"], c["a_only"], c["b_only"]) == (100, 30, 10) and c["diff"] == pytest.approx(0.2)
    assert c["verdict"] == "shown" and c["p_value"] < 0.01
    assert res["table"]["sft_ei"]["test"]["pooled"]["k"] == 60
    assert "[50.2, 69.1]" in render_table(res)           # Wilson 95 % of 60/100


def test_dialogue_outcomes_reads_each_scenario_and_the_bonus_from_one_step(tiny_student, probe_dir, monkeypatch):
    """The precondition stage's numbers come from the right columns: with replies right for Scenario A's
    first two samples and B's first (of G = 4), P_full = 0.5 and P_partial = 0.25 for every question; the
    bonus fires everywhere and, with three distinct rewards in each group, changes an advantage everywhere."""
    from exgrpo import rollout as R
    from exgrpo.demo import dialogue_outcomes
    from exgrpo.dialogues import load_probe_set
    from exgrpo.tasks import get_task
    from exgrpo.train import TrainConfig
    task = get_task("synthetic")
    gold = {task.prompt(it.example): it.example.answer for it in load_probe_set(probe_dir)}
    seen = []

    def fake(engine, user_turns):
        seen.extend(len(t) for t in user_turns)
        out = []
        for j, turns in enumerate(user_turns):
            right = j % 8 in (0, 1, 4)
            final = f"The answer is {gold[turns[-1]['content']] if right else 'none'}."
            out.append(R.DialogueRollout([1], [True], [0.0], ["x"] * (len(turns) - 1) + [final]))
        return out

    monkeypatch.setattr(R, "run_dialogues", fake)
    m = dialogue_outcomes(tiny_student, probe_dir, TrainConfig(), group_size=4, k_probes=2, seed=0)
    q = len(gold)
    assert m["questions"] == q and seen == ([3] * 4 + [2] * 4) * q     # per question: A's 2 probes + Q, B's 1 + Q
    assert (m["p_full"], m["p_partial"], m["p_full_minus_partial"]) == pytest.approx((0.5, 0.25, 0.25))
    assert m["reward"] == pytest.approx(3 / 8)
    assert m["bonus_fired"] == m["adv_nonzero"] == m["bonus_changed"] == q
