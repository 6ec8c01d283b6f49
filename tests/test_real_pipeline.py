"""The whole method on a real dataset file without rationales (CommonsenseQA's original release), through the
command line: `exgrpo probe` with an HTTP teacher (a scripted one on loopback) and filter 2 judged by a tiny
student, then `exgrpo sft`, `exgrpo train` and `exgrpo eval`. R_T must be the teacher's (the dataset has none),
checked against the gold answer; a question the teacher never solves is dropped; the probe text SFT and the
rollouts show is the one the teacher and filter 2 saw."""
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from exgrpo.cli import main as cli_main
from exgrpo.probes import load_rules
from exgrpo.tasks import get_task, load_examples

DATA = Path(__file__).resolve().parents[2] / "shared" / "real-data" / "commonsenseqa" / "dev_rand_split.jsonl"
CSQA = get_task("commonsenseqa")
RULES = load_rules()
N = 8                      # questions probed (--limit)
NEVER = {2, 5}             # indices of the questions whose R_T the teacher always gets wrong
ONCE = {3}                 # ... wrong on the first attempt only


def _rt(ex) -> str:
    """The scripted teacher's chain of thought for a question, right answer."""
    g = ex.answer
    return f"TEACHER R_T {ex.id[:6]}: only ({g}) {ex.choices['ABCDE'.index(g)]} fits. The answer is ({g})."


def _wrong(ex) -> str:
    w = "B" if ex.answer == "A" else "A"
    return f"TEACHER GUESS {ex.id[:6]}: maybe ({w}). The answer is ({w})."


def _probe(ex) -> str:
    g = ex.answer
    return f"Why is ({g}) {ex.choices['ABCDE'.index(g)]} the best answer to: {ex.question.splitlines()[0]}"


PROBE_ANSWER = "Because it fits the question best. The answer is yes."


class Teacher:
    """A scripted chat model over the first N CommonsenseQA questions: solves them (R_T), writes probes, answers
    them, re-answers Q after a probe turn. Counts requests by kind and question."""

    def __init__(self, examples):
        self.exs = examples
        self.lock = threading.Lock()
        self.seen = {}                  # request body hash -> times asked
        self.calls = []                 # (kind, example index)

    def _find(self, text):
        return next(i for i, e in enumerate(self.exs) if e.question in text or _probe(e) in text)

    def reply(self, messages, body_hash):
        last = messages[-1]["content"]
        i = self._find(last)
        ex = self.exs[i]
        with self.lock:
            n = self.seen[body_hash] = self.seen.get(body_hash, 0) + 1
        if messages[0]["role"] == "system":
            kind, text = "write", f"Probe: {_probe(ex)}"
        elif len(messages) == 3:
            kind, text = "recheck", f"After that, the answer is clear. The answer is ({ex.answer})."
        elif RULES.answer_instruction in last:
            kind, text = "answer", PROBE_ANSWER
        else:
            kind = "solve"
            text = _wrong(ex) if i in NEVER or (i in ONCE and n == 1) else _rt(ex)
        with self.lock:
            self.calls.append((kind, i))
        return text


@pytest.fixture(scope="module")
def examples():
    if not DATA.exists():
        pytest.skip(f"the real CommonsenseQA file is not here: {DATA}")
    exs = load_examples("commonsenseqa", DATA).examples
    assert len(exs) >= N and not any(e.rationale for e in exs)        # a dataset without rationales
    return exs


@pytest.fixture(scope="module")
def teacher_url(examples):
    teacher = Teacher(examples[:N])

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):
            raw = self.rfile.read(int(self.headers["Content-Length"]))
            msgs = json.loads(raw)["messages"]
            body = json.dumps({"choices": [{"message": {"role": "assistant", "content": teacher.reply(
                msgs, hashlib.sha1(raw).hexdigest())}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1", teacher
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def student(examples, tmp_path_factory):
    """The tiny random student, its tokenizer trained on texts like those it will see."""
    from exgrpo.models import build_tiny_student
    corpus = []
    for e in examples:
        corpus += [CSQA.prompt(e), _rt(e), _wrong(e), f"{_probe(e)}\n{RULES.answer_instruction}", PROBE_ANSWER]
    return build_tiny_student(tmp_path_factory.mktemp("student") / "tiny", corpus, vocab_size=400, context=1024)


def _jsonl(path):
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_probe_sft_train_eval_on_commonsenseqa_with_an_http_teacher(examples, teacher_url, student, tmp_path,
                                                                    monkeypatch, capsys):
    url, teacher = teacher_url
    exs = examples[:N]
    probes = tmp_path / "probes"

    # ------------------------------------------------------------------ exgrpo probe
    rc = cli_main(["probe", "--task", "commonsenseqa", "--data", str(DATA), "--limit", str(N), "--teacher", "http",
                   "--base-url", url, "--teacher-model", "scripted", "--rules", "why,inverse", "--concurrency", "4",
                   "--max-retries", "1", "--timeout-s", "30", "--student", str(student), "--tau-hard", "0",
                   "--student-max-new-tokens", "6", "--no-progress", "--out", str(probes)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "no_rationale: 2" in out and "R_T from: none: 2  teacher: 6" in out
    recs = {r["example_id"]: r for r in _jsonl(probes / "probe_set.jsonl")}
    assert len(recs) == N
    for i, e in enumerate(exs):
        r = recs[e.id]
        if i in NEVER:
            assert r["verdict"] == "no_rationale" and not r["kept"] and r["probes"] == []
            assert [a["reason"] for a in r["rationale_attempts"]] == [
                f"wrong answer {_wrong(e)[-3:-2]!r} (gold {e.answer!r})"] * 3
            assert not [k for k, j in teacher.calls if j == i and k != "solve"]     # no probe call spent on it
        else:
            assert r["verdict"] == "kept", r["verdict"]
            assert r["rationale"] == _rt(e) and r["rationale_source"] == "teacher"
            assert len(r["rationale_attempts"]) == (2 if i in ONCE else 1)
            assert [p["prompt"] for p in r["probes"]] == [f"{_probe(e)}\n{RULES.answer_instruction}"] * 2
            assert all(p["student_response"] is not None for p in r["probes"])      # filter 2 ran
    assert sorted(j for k, j in teacher.calls if k == "solve") == sorted(
        [i for i in range(N) for _ in range(3 if i in NEVER else 2 if i in ONCE else 1)])
    prompts = {p["prompt"] for r in recs.values() for p in r["probes"]}

    # ------------------------------------------------------------------ exgrpo sft, on the teacher's R_T
    import exgrpo.sft as sft_module
    seen = {}
    real_sequences = sft_module.sft_sequences

    def recording_sequences(items, tok, cfg):
        seqs = real_sequences(items, tok, cfg)
        seen["sft"] = [tok.decode([i for i, m in zip(s.ids, s.sft) if m]) for s in seqs]
        seen["full"] = [tok.decode(s.ids) for s in seqs]
        return seqs

    monkeypatch.setattr(sft_module, "sft_sequences", recording_sequences)
    sft_out = tmp_path / "sft"
    rc = cli_main(["sft", "--model", str(student), "--probes", str(probes), "--out", str(sft_out), "--epochs", "1",
                   "--batch-size", "6", "--lr", "1e-3", "--warmup-steps", "0", "--device", "cpu", "--no-progress"])
    assert rc == 0, capsys.readouterr().out
    kept = [e for i, e in enumerate(exs) if i not in NEVER]
    assert len(seen["sft"]) == len(kept) * 3                              # Q -> R_T, and two probes each
    for e in kept:
        assert _rt(e) + "<end_of_turn>" in seen["sft"]                   # the teacher's R_T is what SFT trains on
    assert all(p in "".join(seen["full"]) for p in prompts)
    assert [json.loads(x)["step"] for x in (sft_out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]

    # ------------------------------------------------------------------ exgrpo train
    import exgrpo.rollout as rollout_module
    real_dialogues = rollout_module.run_dialogues
    turns_seen = []

    def recording_dialogues(engine, turns):
        turns_seen.extend(u["content"] for t in turns for u in t[:-1])
        return real_dialogues(engine, turns)

    monkeypatch.setattr(rollout_module, "run_dialogues", recording_dialogues)
    rl = tmp_path / "rl"
    rc = cli_main(["train", "--model", str(sft_out / "export"), "--probes", str(probes), "--out", str(rl),
                   "--steps", "1", "--questions-per-step", "2", "--group-size", "2", "--k-probes", "2",
                   "--max-new-tokens", "6", "--device", "cpu", "--no-progress"])
    assert rc == 0, capsys.readouterr().out
    assert turns_seen and set(turns_seen) <= prompts                      # rollouts show the stored probe text
    (m,) = _jsonl(rl / "metrics.jsonl")
    assert m["step"] == 1 and m["n_tokens"] > 0
    assert (rl / "export" / "config.json").exists()

    # ------------------------------------------------------------------ exgrpo eval
    report = tmp_path / "eval.json"
    rc = cli_main(["eval", "--model", str(rl / "export"), "--task", "commonsenseqa", "--data", str(DATA),
                   "--limit", "4", "--max-new-tokens", "6", "--batch-size", "4", "--device", "cpu", "--no-progress",
                   "--out", str(report)])
    assert rc == 0, capsys.readouterr().err
    rep = json.loads(report.read_text())
    assert [r["n"] for r in rep["results"]] == [4] and rep["task"] == "commonsenseqa"
    assert len(rep["examples"]) == 4
