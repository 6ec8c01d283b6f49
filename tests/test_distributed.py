"""FSDP2 under torchrun on the CPU (gloo): the same updates on 1 and 2 processes, checkpoints that
move between world sizes, a dead rank that ends the job, and per-rank memory that falls with ranks."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _helpers import exported_weights

from exgrpo import checkpoint

WORKER = str(Path(__file__).parent / "torchrun_worker.py")
pytestmark = pytest.mark.slow


def torchrun(nproc, kind, cfg, *extra, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "0"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", WORKER, kind,
           json.dumps(cfg), *map(str, extra)]
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    return r, time.time() - t0


def assert_same_weights(a, b, what, init):
    """Equal up to fp32 reduction order. AdamW divides by sqrt(v), so a last-bit difference in a
    near-zero gradient can move its weight visibly: the yardstick is the size of the update itself
    (a real divergence moves weights by the whole update, ~lr per step)."""
    wa, wb, w0 = exported_weights(a), exported_weights(b), exported_weights(init)
    assert wa.keys() == wb.keys()
    for k in wa:
        update = (wa[k] - w0[k]).abs().max().item()
        diff = (wa[k] - wb[k]).abs().max().item()
        assert diff <= 1e-3 * update + 1e-7, f"{what}: {k}: max diff {diff:.3e} vs update {update:.3e}"


def train_cfg(student, probes, out, **kw):
    return {"model": str(student), "probes": str(probes), "out": str(out), "steps": 3, "questions_per_step": 2,
            "group_size": 2, "k_probes": 3, "max_new_tokens": 8, "lr": 3e-3, "beta": 0.04, "aux_coef": 0.1,
            "updates_per_batch": 2, "save_every": 1, "progress": False, "device": "cpu", **kw}


@pytest.fixture(scope="module")
def one_proc_run(tiny_student, probe_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("dist") / "one"
    r, _ = torchrun(1, "train", train_cfg(tiny_student, probe_dir, out))
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_exgrpo_two_processes_equal_one(one_proc_run, tiny_student, probe_dir, tmp_path):
    r, _ = torchrun(2, "train", train_cfg(tiny_student, probe_dir, tmp_path / "two"))
    assert r.returncode == 0, r.stderr[-3000:]
    before = exported_weights(tiny_student)
    after = exported_weights(one_proc_run / "export")
    assert any(not torch.equal(before[k], after[k]) for k in before), "the run must train"
    assert_same_weights(one_proc_run / "export", tmp_path / "two" / "export", "2 vs 1 processes", tiny_student)
    m1 = [json.loads(x) for x in (one_proc_run / "metrics.jsonl").read_text().splitlines()]
    m2 = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(m1, m2, strict=True):
        for k in ("reward", "acc", "dsu_fire_rate", "n_tokens", "n_sft_tokens"):
            assert a[k] == pytest.approx(b[k]), k
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6)


def test_checkpoints_move_between_world_sizes(one_proc_run, tiny_student, probe_dir, tmp_path):
    # 2 processes -> 1 process
    run = tmp_path / "2to1"
    r, _ = torchrun(2, "train", train_cfg(tiny_student, probe_dir, run, steps=2))
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((checkpoint.latest(run) / "state.json").read_text())["world"] == 2
    r, _ = torchrun(1, "train", train_cfg(tiny_student, probe_dir, run, resume=True))
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_weights(one_proc_run / "export", run / "export", "resumed 2 -> 1", tiny_student)
    # 1 process -> 2 processes
    run = tmp_path / "1to2"
    r, _ = torchrun(1, "train", train_cfg(tiny_student, probe_dir, run, steps=1))
    assert r.returncode == 0, r.stderr[-3000:]
    r, _ = torchrun(2, "train", train_cfg(tiny_student, probe_dir, run, resume=True))
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_weights(one_proc_run / "export", run / "export", "resumed 1 -> 2", tiny_student)


def test_sft_two_processes_equal_one(tiny_student, probe_dir, tmp_path):
    cfg = lambda out: {"model": str(tiny_student), "probes": str(probe_dir), "out": str(out), "epochs": 0.5,
                       "batch_size": 16, "lr": 3e-3, "warmup_steps": 1, "progress": False, "device": "cpu"}
    r1, _ = torchrun(1, "sft", cfg(tmp_path / "one"))
    r2, _ = torchrun(2, "sft", cfg(tmp_path / "two"))
    assert r1.returncode == 0 and r2.returncode == 0, (r1.stderr + r2.stderr)[-3000:]
    assert_same_weights(tmp_path / "one" / "export", tmp_path / "two" / "export", "SFT 2 vs 1 processes",
                        tiny_student)


def test_a_dead_rank_ends_the_job_and_the_checkpoint_survives(tiny_student, probe_dir, tmp_path):
    run = tmp_path / "dead"
    r, secs = torchrun(2, "train", train_cfg(tiny_student, probe_dir, run, steps=5), 1, 3, timeout=300)
    assert r.returncode != 0
    assert secs < 240, f"the job took {secs:.0f}s to notice a dead rank"
    last = checkpoint.latest(run)
    assert last is not None and json.loads((last / "state.json").read_text())["step"] == 2
    # the surviving checkpoint resumes (here on one process) and finishes the run
    r, _ = torchrun(1, "train", train_cfg(tiny_student, probe_dir, run, steps=3, resume=True))
    assert r.returncode == 0, r.stderr[-3000:]


def test_per_rank_memory_falls_with_ranks(tiny_student, tmp_path):
    for n in (1, 2):
        r, _ = torchrun(n, "memory", {"model": str(tiny_student), "out": str(tmp_path)})
        assert r.returncode == 0, r.stderr[-3000:]
    one = json.loads((tmp_path / "mem-1-0.json").read_text())
    two = [json.loads((tmp_path / f"mem-2-{r}.json").read_text()) for r in (0, 1)]
    for rec in two:
        print(f"rank {rec['rank']}/2: params {rec['param_bytes']} B, AdamW state {rec['optim_bytes']} B "
              f"(1 process: {one['param_bytes']} B, {one['optim_bytes']} B)")
        assert rec["param_bytes"] < 0.6 * one["param_bytes"]
        assert 0 < rec["optim_bytes"] < 0.6 * one["optim_bytes"]


@pytest.mark.parametrize("lora", [False, True])
def test_torchrun_cli_with_real_generation(tiny_student, probe_dir, tmp_path, lora):
    """`torchrun -m exgrpo train` with transformers generation on the FSDP2-sharded policy: ranks
    generate different lengths, so this hangs or fails if the parameters are not gathered up front.
    With LoRA the reference is the same sharded model with its adapters off, and the export merges."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "0"}
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "exgrpo",
           "train", "--model", str(tiny_student), "--probes", str(probe_dir), "--out", str(out), "--steps", "2",
           "--questions-per-step", "2", "--group-size", "2", "--k-probes", "2", "--max-new-tokens", "16",
           "--device", "cpu", "--no-progress", "--save-every", "1"] + (["--lora", "--lora-r", "4", "--lr", "1e-2"]
                                                                      if lora else [])
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("exported:") == 1, "only rank 0 reports"
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in recs] == [1, 2] and all(not x["skipped"] for x in recs)
    assert checkpoint.latest(out).name == "ckpt-000002"
    before, after = exported_weights(tiny_student), exported_weights(out / "export")
    assert before.keys() == after.keys(), "the export is a plain model (LoRA merged)"
    assert any(not torch.equal(before[k], after[k]) for k in before)
