"""bench/step.py in its tiny CPU mode: every case runs in its own process through the same code the
GPU run uses, records every phase, and the plain-PyTorch loss peer computes the same loss as the
fused kernels (fp32 here), so the benchmark times the objective the trainer optimises."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

OURS = ("rollout", "logprobs", "loss", "optimizer", "update", "loss_eager")
TRL_PHASES = ("rollout", "logprobs", "loss", "optimizer", "update")


def test_step_bench_tiny(benchmark, tmp_path):
    pytest.importorskip("trl")
    from bench.step import CASES, main
    # adamw for full FT: torchao's compiled 8-bit step costs ~20 s to compile per process on this
    # machine, and tests/test_trainer.py already trains, checkpoints and resumes with it
    argv = ["--tiny", "--full-optimizer", "adamw", "--profile", "--out", str(tmp_path)]
    record = benchmark.pedantic(main, args=(argv,), rounds=1, iterations=1)
    (path,) = tmp_path.glob("step-cpu-*.json")
    assert json.loads(path.read_text())["results"] == record["results"]
    png = path.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    res = {r["case"]: r for r in record["results"]}
    assert list(res) == list(CASES)
    for case in ("exgrpo:lora", "exgrpo:full", "trl:lora", "trl:full"):
        r = res[case]
        assert r.get("error") is None, (case, r.get("error"))
        want = OURS if case.startswith("exgrpo") else TRL_PHASES
        for ph in want:
            p = r["phases"][ph]
            assert p["ms"] > 0, (case, ph)
            if ph != "optimizer":
                assert p["tokens_per_s"] > 0, (case, ph)
        assert r["update_tflops"] > 0 and r["update_frac_of_matmul"] > 0
        assert r["phases"]["update"]["ms"] >= r["phases"]["loss"]["ms"]
    # the trainer's step: per question G = 2 Scenario A dialogues (k = 2 probes + Q: 3 turns) and 2 of B
    # (k' = 1: 2 turns), every turn exactly `completion` sampled tokens, plus one teacher-forced aux sequence
    a, r = record["args"], res["exgrpo:lora"]
    assert (a["k_probes"], a["group"], a["questions"]) == (2, 2, 1)
    assert r["phases"]["rollout"]["tokens"] == 2 * (3 + 2) * a["completion"]
    assert r["trajectories"] == 4 and r["sequences"] == 5 and len(r["sequence_lens"]) == 5
    assert r["phases"]["logprobs"]["tokens"] == sum(r["sequence_lens"])
    assert r["packed"] and r["padding_frac"] <= r["padding_frac_padded_layout"]   # sdpa: rows as wide as the longest
    # the same loss and gradient, fused kernels vs materialised logits, on the same weights and
    # micro-batches (the last step's: the policy has moved off the reference, so the KL term counts)
    for case in ("exgrpo:lora", "exgrpo:full"):
        r = res[case]
        assert r["loss"] == pytest.approx(r["loss_eager"], rel=1e-4, abs=1e-6), case
        assert r["grad_norm"] == pytest.approx(r["grad_norm_eager"], rel=1e-3), case
        assert r["grad_norm"] > 0
    # LoRA trains adapters only, in both trainers, with the same rank and targets
    assert res["exgrpo:lora"]["trainable_params"] == res["trl:lora"]["trainable_params"]
    assert res["exgrpo:lora"]["trainable_params"] < res["exgrpo:full"]["trainable_params"] / 5
    assert res["exgrpo:full"]["trainable_params"] == res["trl:full"]["trainable_params"]
    for case in ("trl-liger:lora", "trl-liger:full"):                 # runs, or says why not
        assert res[case].get("error") or res[case]["phases"]["update"]["ms"] > 0
    assert record["machine"]["torch"] and "commit" in record["machine"]
    # --profile: the loss phase's operators, the LM head's GEMMs among them
    for case in ("exgrpo:lora", "exgrpo:full"):
        top = res[case]["profile_loss"]
        assert top and all(t["self_ms"] >= 0 and t["calls"] >= 1 for t in top)
        assert any("mm" in t["op"] for t in top), [t["op"] for t in top]


def test_step_bench_runs_the_trainers_step(tmp_path):
    """The exgrpo cases run what `exgrpo train` trains: the first step's loss in the benchmark (its own
    process) equals train()'s on the same model, probe set, seed and rewards, for LoRA and full FT."""
    from bench.step import bench_reward, engine_factory, main, parse, train_config
    from exgrpo.train import train
    argv = ["--tiny", "--cases", "exgrpo:lora", "exgrpo:full", "--full-optimizer", "adamw", "--no-eager-loss",
            "--model-dir", str(tmp_path / "model"), "--out", str(tmp_path)]
    record = main(argv)
    a = parse(argv)
    a.device_type, a.model_path = "cpu", tmp_path / "model"
    for r in record["results"]:
        assert r.get("error") is None, r["error"]
        mode = r["case"].split(":")[1]
        cfg = train_config(a, mode, out=str(tmp_path / f"train-{mode}"))
        cfg.steps, cfg.save_every = 1, 1
        train(cfg, engine=engine_factory(a), reward_fn=bench_reward)
        rec = json.loads((tmp_path / f"train-{mode}" / "metrics.jsonl").read_text().splitlines()[0])
        assert rec["n_tokens"] > 0 and rec["n_sft_tokens"] > 0, "policy and auxiliary SFT tokens both trained"
        assert rec["loss"] == pytest.approx(r["losses"][0], rel=1e-6, abs=1e-9), mode


def test_step_bench_targets_are_judged_on_measurements_only():
    from bench.step import targets
    phase = lambda tps, gb: {"tokens_per_s": tps, "peak_alloc_gb": gb, "peak_reserved_gb": gb + 1}
    res = [
        {"case": "exgrpo:lora", "peak_alloc_gb": 61.0, "phases": {"update": phase(3000.0, 30.0)}},
        {"case": "trl-liger:lora", "peak_alloc_gb": 70.0, "phases": {"update": phase(1500.0, 70.0)}},
        {"case": "exgrpo:full", "peak_alloc_gb": 95.0, "phases": {"update": phase(1000.0, 90.0)}},
        {"case": "trl-liger:full", "error": "OutOfMemoryError: ..."},
    ]
    got = {t["target"]: (t["met"], t["measured"]) for t in targets(res)}
    assert got["exgrpo lora fits, peak <= 60 GB"] == (False, "peak allocated 61.0 GB, reserved 31.0 GB")
    assert got["exgrpo full fits"][0] is True
    assert got["lora update tokens/s >= 1.5x TRL+Liger"] == (True, "2.00x")
    assert got["lora update peak memory <= 0.5x TRL+Liger"] == (True, "0.43x")
    assert not any("full update" in k for k in got)                   # a failed peer is not a comparison


def test_step_plot_with_memory_and_a_failed_case(tmp_path):
    """A GPU-shaped record: memory per phase is drawn, a failed case shows its error instead of bars."""
    from bench.plots import STEP_PHASES, plot_record, step_figure
    ph = lambda ms, gb: {"ms": ms, "peak_alloc_gb": gb, "peak_reserved_gb": gb + 2, "tokens_per_s": 1e4}
    rec = {"bench": "step", "machine": {"gpu": "NVIDIA H200", "commit": "abc1234"},
           "args": {"shape": {"hidden_size": 3072}, "questions": 1, "group": 8, "prompt_len": 1536,
                    "partial_len": 1280, "completion": 256},
           "results": [{"case": "exgrpo:lora", "phases": {p: ph(100.0 * (i + 1), 20.0 + i)
                                                          for i, p in enumerate([*STEP_PHASES, "update"])}},
                       {"case": "trl-liger:lora", "error": "OutOfMemoryError: CUDA out of memory."}]}
    fig = step_figure(rec)
    ax_t, ax_m = fig.axes
    widths = sorted(round(b.get_width(), 3) for b in ax_t.patches)
    assert widths == [0.1, 0.2, 0.3, 0.4]                               # seconds, one bar per phase
    assert sorted(b.get_width() for b in ax_m.patches) == [20.0, 21.0, 22.0, 23.0]
    assert any("OutOfMemoryError" in t.get_text() for t in ax_t.texts)
    assert "NVIDIA H200" in fig._suptitle.get_text()
    import matplotlib.pyplot as plt
    plt.close(fig)
    assert plot_record(rec, tmp_path / "s.png").stat().st_size > 10_000


def test_step_case_peaks_leave_out_the_eager_peer():
    """A case's peak is its own step's: the materialised-logits peer (loss_eager) only has its phase row."""
    from bench.step import _summarise, targets
    ph = lambda ms, gb: {"ms": ms, "peak_alloc_gb": gb, "peak_reserved_gb": gb + 1}
    steps = [{"rollout": ph(10, 30.0), "logprobs": ph(5, 31.0), "loss_eager": ph(9, 70.0), "loss": ph(4, 40.0),
              "optimizer": ph(1, 35.0)}]
    out = _summarise(steps, {}, 1e12, {})
    assert out["peak_alloc_gb"] == 40.0 and out["phases"]["loss_eager"]["peak_alloc_gb"] == 70.0
    assert out["step_ms"] == 20
    (t,) = targets([{"case": "exgrpo:lora", **out}])
    assert t["met"] and t["measured"] == "peak allocated 40.0 GB, reserved 41.0 GB"


def test_step_interrupted_run_keeps_finished_cases(tmp_path, monkeypatch):
    """The JSON is rewritten after every case, so a run killed during a case (a stage time limit on the GPU
    machine) keeps the cases before it."""
    import bench.step as S
    calls = []

    def fake_case(argv, case, model_dir, timeout, echo):
        calls.append((case, timeout))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return {"error": "RuntimeError: made up for the test"}

    monkeypatch.setattr(S, "_case_in_subprocess", fake_case)
    with pytest.raises(KeyboardInterrupt):
        S.main(["--tiny", "--cases", "exgrpo:lora", "trl:lora", "--case-timeout", "123", "--out", str(tmp_path)])
    [js] = tmp_path.glob("step-cpu-*.json")
    rec = json.loads(js.read_text())
    assert [r["case"] for r in rec["results"]] == ["exgrpo:lora"] and calls[0] == ("exgrpo:lora", 123.0)
    assert rec["results"][0]["error"] == "RuntimeError: made up for the test"


def test_case_output_streaming_survives_bad_bytes_and_timeouts(capsys):
    """A child's non-UTF-8 bytes and 1 MB of output neither stop the reader nor block the child on a full
    pipe; its lines are echoed with the case's name; a child past its time limit is killed (rc None)."""
    import os
    import time

    from bench.step import _run_streamed
    noisy = ("import sys; sys.stdout.buffer.write(b'bad \\xff\\xfe byte\\n'); "
             "[print('x' * 1000) for _ in range(1000)]; print('done')")
    t0 = time.time()
    rc, tail = _run_streamed([sys.executable, "-c", noisy], dict(os.environ), 60, "case:x", echo=True)
    assert rc == 0 and tail[-1] == "done" and time.time() - t0 < 30
    err = capsys.readouterr().err
    assert "[case:x] bad \ufffd\ufffd byte" in err and err.count("[case:x] x") == 1000
    rc, tail = _run_streamed([sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"],
                             dict(os.environ), 3, "case:y", echo=False)
    assert rc is None and tail == ["started"]

