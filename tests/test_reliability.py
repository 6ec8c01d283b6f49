"""Run folders that defend themselves: a resume that never guesses (a damaged `latest`, a deleted or truncated
newest checkpoint: the next older one, bit-identical in the end), nothing loadable is an error, SIGTERM saves
like Ctrl-C, one run per folder (a lock naming its holder), and a finished run is not overwritten by accident."""
import json
import signal
import subprocess
import sys
import textwrap
import time
from types import SimpleNamespace

import pytest
import torch
from _helpers import exported_weights

from exgrpo import checkpoint, loop
from exgrpo.cli import main as cli_main
from exgrpo.distributed import SINGLE
from exgrpo.train import train
from tests.test_trainer import small_train

KW = dict(steps=3, schedule="constant", keep_checkpoints=3)


def _strip(run):
    return [{k: v for k, v in json.loads(x).items() if k != "seconds"}
            for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(tiny_student, probe_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("rel") / "a"
    return run, exported_weights(train(small_train(tiny_student, probe_dir, run, **KW)))


def _truncate_a_shard(ckpt):
    shard = max((ckpt / "dcp").glob("*.distcp"), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])


DAMAGE = {
    "newest deleted, latest garbage": lambda run: ((run / "latest").write_text("garbage\n"),
                                                   __import__("shutil").rmtree(run / "ckpt-000003")),
    "newest shard truncated": lambda run: _truncate_a_shard(run / "ckpt-000003"),
    "newest manifest missing": lambda run: (run / "ckpt-000003" / "manifest.json").unlink(),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_newest_checkpoint_falls_back_and_ends_bit_identical(case, uninterrupted, tiny_student, probe_dir,
                                                                       tmp_path, capsys):
    a, wa = uninterrupted
    run = tmp_path / "b"
    train(small_train(tiny_student, probe_dir, run, **KW))
    (run / "export").rename(tmp_path / "first-export")
    DAMAGE[case](run)
    capsys.readouterr()
    wb = exported_weights(train(small_train(tiny_student, probe_dir, run, **KW, resume=True)))
    out = capsys.readouterr().out
    assert "resume: from ckpt-000002" in out and ("damaged" in out or "deleted" in case)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert _strip(run) == _strip(a)                          # step 3 logged once, as in the uninterrupted run
    assert checkpoint.verify(run / "ckpt-000003") is None     # re-saved whole
    assert (run / "latest").read_text() == "ckpt-000003"


def test_nothing_loadable_is_an_error_and_changes_nothing(tiny_student, probe_dir, tmp_path, capsys):
    run = tmp_path / "b"
    train(small_train(tiny_student, probe_dir, run, steps=2))
    before = (run / "metrics.jsonl").read_text()
    for c in checkpoint.checkpoints(run):
        _truncate_a_shard(c)
    rc = cli_main(["train", "--model", str(tiny_student), "--probes", str(probe_dir), "--out", str(run),
                   "--steps", "3", "--k-probes", "2", "--max-new-tokens", "12", "--resume", "--no-progress"])
    out = capsys.readouterr().err
    assert rc == 2 and "--resume: no loadable checkpoint in" in out and "ckpt-000002: dcp/" in out
    assert (run / "metrics.jsonl").read_text() == before


def test_logged_steps_without_a_checkpoint_are_not_silently_restarted(tiny_student, probe_dir, tmp_path):
    run = tmp_path / "b"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    with pytest.raises(ValueError, match="holds 2 logged step.s. but no checkpoint to continue from"):
        train(small_train(tiny_student, probe_dir, run, resume=True))


def test_a_finished_run_is_not_overwritten_by_accident(tiny_student, probe_dir, tmp_path, capsys):
    run = tmp_path / "b"
    train(small_train(tiny_student, probe_dir, run, steps=1))
    before = (run / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match=r"already holds a run \(1 checkpoint\(s\), 1 logged step\(s\), an export\); "
                                         r"continue it with --resume, or pass --overwrite"):
        train(small_train(tiny_student, probe_dir, run, steps=1))
    assert (run / "metrics.jsonl").read_text() == before
    train(small_train(tiny_student, probe_dir, run, steps=2, overwrite=True))
    assert "--overwrite: deleted the earlier run" in capsys.readouterr().out
    assert [r["step"] for r in _strip(run)] == [1, 2]
    with pytest.raises(ValueError, match="--resume and --overwrite contradict"):
        train(small_train(tiny_student, probe_dir, run, resume=True, overwrite=True))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file; the run needs a folder"):
        train(small_train(tiny_student, probe_dir, tmp_path / "file"))


HOLD = textwrap.dedent('''
    import sys, time
    from pathlib import Path
    from exgrpo import runlock
    runlock.lock(Path(sys.argv[1]))
    print("locked", flush=True)
    time.sleep(120)
''')


def test_one_run_per_folder_and_a_dead_holder_leaves_no_lock(tmp_path):
    run = tmp_path / "b"
    run.mkdir()
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "locked"
        cfg = SimpleNamespace(out=str(run), resume=False, overwrite=False)
        with pytest.raises(ValueError, match=rf"is in use by another run \(pid {p.pid} on .*, since "):
            loop.claim(cfg, SINGLE)
    finally:
        p.kill()
        p.wait()
    loop.claim(cfg, SINGLE)                                   # the OS released the dead holder's lock
    loop.release(run)


def test_prune_keeps_this_runs_newest_and_drops_a_left_timeline(tmp_path):
    for s in (1, 2, 3, 4):
        (tmp_path / f"ckpt-{s:06d}").mkdir()
    checkpoint.prune(tmp_path, 2, keep=2)                     # resumed from 2: 3 and 4 are another timeline
    assert [c.name for c in checkpoint.checkpoints(tmp_path)] == ["ckpt-000002", "ckpt-000001"]


def test_sigterm_saves_the_finished_steps_and_the_resume_is_bit_identical(uninterrupted, tiny_student, probe_dir,
                                                                        tmp_path):
    a, wa = uninterrupted
    run = tmp_path / "b"
    args = ["--model", str(tiny_student), "--probes", str(probe_dir), "--out", str(run), "--steps", "3",
            "--questions-per-step", "2", "--group-size", "2", "--k-probes", "2", "--max-new-tokens", "12",
            "--lr", "1e-3", "--schedule", "constant", "--keep-checkpoints", "3", "--no-progress"]
    p = subprocess.Popen([sys.executable, "-m", "exgrpo", "train", *args, "--save-every", "100"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text()):
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)                             # inside step 2 (or 3): it finishes, then stops
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 143, out
    assert "interrupted (SIGTERM)" in out and "checkpoint saved at step" in out
    done = len((run / "metrics.jsonl").read_text().splitlines())
    assert "SIGTERM: stopping at the end of this step" in out
    assert checkpoint.latest(run).name == f"ckpt-{done:06d}"            # the step in progress finished, then saved
    if done < 3:
        wb = exported_weights(train(small_train(tiny_student, probe_dir, run, **KW, resume=True)))
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
        assert _strip(run) == _strip(a)


def test_two_probe_runs_cannot_share_a_folder(tmp_path, capsys):
    out = tmp_path / "p"
    out.mkdir()
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "locked"
        assert cli_main(["probe", "--synthetic-n", "2", "--out", str(out), "--no-progress"]) == 2
        assert f"is in use by another run (pid {p.pid}" in capsys.readouterr().err
        assert not (out / "probe_set.jsonl").exists()
    finally:
        p.kill()
        p.wait()
    assert cli_main(["probe", "--synthetic-n", "2", "--out", str(out), "--no-progress"]) == 0


def test_an_interrupt_inside_an_optimizer_update_does_not_save_weights_between_steps(tiny_student, probe_dir,
                                                                                    tmp_path, monkeypatch, capsys):
    import exgrpo.optim as O
    real = O.make_optimizer
    calls = {"n": 0}

    def stop_inside_the_second_update(*a, **k):
        opt, sched = real(*a, **k)

        def hook(*_):
            calls["n"] += 1
            if calls["n"] == 2:                               # the weights are updated, the step not finished
                raise KeyboardInterrupt

        opt.register_step_post_hook(hook)
        return opt, sched

    monkeypatch.setattr(O, "make_optimizer", stop_inside_the_second_update)
    run = tmp_path / "b"
    with pytest.raises(KeyboardInterrupt):
        train(small_train(tiny_student, probe_dir, run, steps=3, save_every=100))
    assert "interrupted inside an optimizer update: not saved" in capsys.readouterr().err
    assert checkpoint.latest(run) is None                     # step 1 was never saved: nothing half-way was


def test_two_evals_cannot_write_one_report(tmp_path, capsys):
    from exgrpo.tasks import Example
    from tests.test_eval import CASES, _write_jsonl
    data = _write_jsonl(tmp_path / "cases.jsonl", [
        Example(id=i, task="synthetic", question=f"q {i}?", answer=g).to_dict() for i, g, *_ in CASES])
    outs = _write_jsonl(tmp_path / "outs.jsonl", [{"id": i, "output": o} for i, _, o, *_ in CASES])
    report = tmp_path / "r.json"
    report.write_text('{"earlier": true}\n')
    args = ["eval", "--data", f"mine={data}", "--outputs", str(outs), "--out", str(report)]
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(report)], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "locked"
        assert cli_main(args) == 2
        assert f"{report} is in use by another run (pid {p.pid}" in capsys.readouterr().err
        assert json.loads(report.read_text()) == {"earlier": True}          # the first run's report untouched
    finally:
        p.kill()
        p.wait()
    assert cli_main(args) == 0
    assert json.loads(report.read_text())["accuracy"] == {"mine": 0.375}
    assert not report.with_name("r.json.tmp").exists()                    # written whole, then renamed
