"""The OpenAI-compatible HTTP teacher against a real server on loopback: retries, time-outs,
bad replies, R_T checked against the gold answer, a dead server, and resuming after an interruption
(including SIGKILL, in the probe stage and in the R_T stage)."""
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from exgrpo.probes import (
    LOG_FILE,
    SET_FILE,
    HTTPBackend,
    HTTPSettings,
    LLMTeacher,
    TeacherUnavailable,
    load_rules,
    run_pipeline,
)
from exgrpo.probes.pipeline import RATIONALE_FILE
from exgrpo.probes.summary import summarize
from exgrpo.tasks import Example, get_task

RULES = load_rules()
GSM = get_task("gsm8k")
REPO = Path(__file__).resolve().parents[1]


class State:
    def __init__(self):
        self.lock = threading.Lock()
        self.attempts = {}        # body hash -> attempts seen
        self.total = 0
        self.down_after = None    # answer 503 to every request after this many
        self.delay = 0.0
        self.flaky = False        # "[FLAKY]" probe writes get an HTML page while this is set
        self.solve_delay = 0.0    # extra seconds on every R_T request (teacher.solve)
        self.requests = []        # (kind, the messages) of every chat completion answered

    def reset(self):
        self.__init__()


STATE = State()


def _kind(messages):
    """Which teacher call a request is: "write", "answer" (a probe), "recheck" or "solve" (R_T)."""
    if messages[0]["role"] == "system":
        return "write"
    if len(messages) == 3:
        return "recheck"
    return "answer" if RULES.answer_instruction in messages[-1]["content"] else "solve"


def _teacher_reply(messages):
    """A tiny arithmetic 'LLM': writes probes 'What is N + 1?', answers them, answers the task ([NORT]:
    its solution of the task, R_T, is always one off, while its rechecks stay right)."""
    last = messages[-1]["content"]
    if messages[0]["role"] == "system":                              # write a probe
        gold = last.split("\nAnswer: ", 1)[1].split("\n", 1)[0]
        markers = " ".join(m for m in ("[EMPTY]", "[NOANSWER]") if m in last)
        return f"Probe: What is {gold} + 1? {markers}"
    if RULES.answer_instruction in last and len(messages) == 1:      # answer a probe
        n = int(last.split("What is ", 1)[1].split(" + 1?")[0])
        return f"{n} + 1 = {n + 1}. The answer is {n + 1}."
    a, b = last.split("What is ", 1)[1].split("?")[0].split(" + ")   # solve or recheck the task
    wrong = ("[WRONG]" in last and len(messages) == 3) or ("[NORT]" in last and len(messages) == 1)
    return f"{a} + {b} = {int(a) + int(b)}. The answer is {int(a) + int(b) + wrong}."


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def _send(self, code, body, ctype="application/json"):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        try:
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (the time-out tests do this on purpose)

    def do_POST(self):
        raw = self.rfile.read(int(self.headers["Content-Length"]))
        h = hashlib.sha1(raw).hexdigest()
        with STATE.lock:
            STATE.total += 1
            n = STATE.attempts[h] = STATE.attempts.get(h, 0) + 1
            total = STATE.total
        if self.path != "/v1/chat/completions":
            return self._send(404, {"error": "not found"})
        if STATE.delay:
            time.sleep(STATE.delay)
        if STATE.down_after is not None and total > STATE.down_after:
            return self._send(503, {"error": "overloaded"})
        req = json.loads(raw)
        text = json.dumps(req["messages"])
        kind = _kind(req["messages"])
        with STATE.lock:
            STATE.requests.append((kind, req["messages"]))
        if kind == "solve" and STATE.solve_delay:
            time.sleep(STATE.solve_delay)
        if "[RATE]" in text and n <= 2:
            self.send_response(429)
            self.send_header("Retry-After", "0")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if "[ERR500]" in text and n <= 2:
            return self._send(500, {"error": "internal"})
        if "[SLOW]" in text and n == 1:
            time.sleep(1.0)
        if "[TRICKLE]" in text and n == 1:             # headers at once, then one byte every 0.1 s
            body = json.dumps({"choices": [{"message": {"content": "slow " * 40}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            try:
                for i in range(len(body)):
                    self.wfile.write(body[i:i + 1])
                    self.wfile.flush()
                    time.sleep(0.1)
            except (BrokenPipeError, ConnectionResetError):
                pass
            return
        if "[BAD400]" in text:
            return self._send(400, {"error": "context too long"})
        if "[AUTH]" in text:
            return self._send(401, {"error": "bad key"})
        if "[FLAKY]" in text and STATE.flaky and req["messages"][0]["role"] == "system":
            return self._send(200, b"<html>maintenance</html>", "text/html")
        if "[MALFORMED]" in text and req["messages"][0]["role"] == "system":
            return self._send(200, b"<html>oops</html>", "text/html")
        content = _teacher_reply(req["messages"])
        if "[EMPTY]" in text and RULES.answer_instruction in req["messages"][-1]["content"]:
            content = ""
        if "[NOANSWER]" in text and RULES.answer_instruction in req["messages"][-1]["content"]:
            content = "It is one more than before."
        self._send(200, {"choices": [{"message": {"role": "assistant", "content": content}}]})


@pytest.fixture(scope="module")
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()
    srv.server_close()


@pytest.fixture(autouse=True)
def _fresh_state():
    STATE.reset()


def _backend(url, **kw):
    s = dict(base_url=url, model="fake", api_key_env="EXGRPO_TEST_KEY", timeout_s=0.4, max_retries=3,
             backoff_s=0.01, backoff_max_s=0.05, max_concurrency=4)
    s.update(kw)
    return HTTPBackend(HTTPSettings(**s))


def _ask(b, q):
    return b.complete([{"role": "user", "content": f"What is 2 + 3? {q}"}])


def test_good_reply(server):
    r = _ask(_backend(server), "")
    assert r.ok and r.text.endswith("The answer is 5.")


@pytest.mark.parametrize("marker", ["[RATE]", "[ERR500]"])
def test_429_and_5xx_are_retried(server, marker):
    r = _ask(_backend(server), marker)
    assert r.ok and STATE.total == 3
    with pytest.raises(TeacherUnavailable, match=r"failed 2 times; last error: HTTP (429|500)"):
        STATE.reset()
        _ask(_backend(server, max_retries=1), marker)


def test_slow_reply_times_out_then_retry_succeeds(server):
    t0 = time.monotonic()
    r = _ask(_backend(server), "[SLOW]")
    assert r.ok and STATE.total == 2
    assert time.monotonic() - t0 < 1.0            # gave up on the slow attempt at the 0.4 s timeout
    STATE.reset()
    with pytest.raises(TeacherUnavailable, match="timed out after 0.4 s"):
        _ask(_backend(server, max_retries=0), "[SLOW]")


def test_the_time_out_bounds_the_whole_request_not_each_read(server):
    """A server trickling a byte every 0.1 s never trips a 0.4 s socket time-out, but the request has one."""
    t0 = time.monotonic()
    r = _ask(_backend(server), "[TRICKLE]")
    assert r.ok and STATE.total == 2
    assert time.monotonic() - t0 < 2.0            # the trickled body alone would take over 20 s


def test_other_4xx_is_not_retried(server):
    r = _ask(_backend(server), "[BAD400]")
    assert not r.ok and r.error.startswith("HTTP 400") and STATE.total == 1
    with pytest.raises(TeacherUnavailable, match="HTTP 401.*EXGRPO_TEST_KEY"):
        _ask(_backend(server), "[AUTH]")
    assert STATE.total == 2


def test_malformed_reply_is_a_failed_request(server):
    b = _backend(server)
    r = b.complete([{"role": "system", "content": "s"}, {"role": "user", "content": "[MALFORMED]"}])
    assert not r.ok and r.error.startswith("malformed response: not JSON") and STATE.total == 1


def test_dead_server_stops_with_a_clear_message():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()                                      # nothing listens there now
    with pytest.raises(TeacherUnavailable, match=r"failed 3 times; last error: cannot connect"):
        _ask(_backend(f"http://127.0.0.1:{port}/v1", max_retries=2), "")


def _examples(n, marker=""):
    return [Example(f"q{i}", "gsm8k", f"What is {i} + {i + 1}?{marker}", str(2 * i + 1)) for i in range(n)]


def test_pipeline_over_http_records_every_kind_of_bad_output(server, tmp_path):
    exs = _examples(3) + [
        Example("m", "gsm8k", "What is 1 + 1? [MALFORMED]", "2"),
        Example("e", "gsm8k", "What is 1 + 2? [EMPTY]", "3"),
        Example("n", "gsm8k", "What is 1 + 3? [NOANSWER]", "4"),
        Example("w", "gsm8k", "What is 1 + 4? [WRONG]", "5"),
        Example("r", "gsm8k", "What is 1 + 5? [RATE]", "6"),
        Example("x", "gsm8k", "What is 1 + 6? [NORT]", "7"),
    ]
    teacher = LLMTeacher(_backend(server), RULES)
    res = run_pipeline([(GSM, e) for e in exs], teacher, RULES, tmp_path, workers=4)
    assert res.stopped is None
    q = {r["example_id"]: r for r in res.question_records}
    assert len(q) == 9
    assert q["q1"]["verdict"] == "kept" and q["q1"]["n_consistent"] == 10
    assert q["q1"]["rationale"] == "1 + 2 = 3. The answer is 3."     # R_T from the teacher's solve
    assert q["q1"]["rationale_source"] == "teacher" and len(q["q1"]["rationale_attempts"]) == 1
    # A teacher at temperature 0 gives the same wrong R_T each time: asked 3 times, then the question is dropped
    # without a single probe request.
    x = q["x"]
    assert x["verdict"] == "no_rationale" and not x["kept"] and x["probes"] == [] and x["rationale"] is None
    assert [(a["response"], a["reason"]) for a in x["rationale_attempts"]] == \
        [("1 + 6 = 7. The answer is 8.", "wrong answer '8' (gold '7')")] * 3
    asked = [k for k, m in STATE.requests if "[NORT]" in json.dumps(m)]
    assert asked == ["solve"] * 3
    assert len(_jsonl(tmp_path / RATIONALE_FILE)) == 8 + 3
    assert q["q1"]["probes"][0]["probe_answer"] == "4"
    assert {p["reason"] for p in q["m"]["probes"]} == {"malformed response: not JSON (b'<html>oops</html>')"}
    assert {p["reason"] for p in q["e"]["probes"]} == {"empty response"}
    assert {p["reason"] for p in q["n"]["probes"]} == {"no extractable answer"}
    assert q["w"]["n_generated"] == 10 and q["w"]["verdict"] == "no_probes"
    assert q["r"]["verdict"] == "kept"
    s = summarize(res.unit_records, res.question_records)
    assert (s.total.attempted, s.total.failed, s.total.consistent) == (80, 30, 40)


def _jsonl(path):
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_server_going_down_stops_the_run_and_keeps_work_then_resume(server, tmp_path):
    exs = _examples(12)
    teacher = LLMTeacher(_backend(server, max_retries=2), RULES)
    STATE.down_after = 150
    res = run_pipeline([(GSM, e) for e in exs], teacher, RULES, tmp_path, workers=4)
    assert res.stopped and "HTTP 503" in res.stopped
    first = [json.loads(x) for x in (tmp_path / LOG_FILE).read_text().splitlines()]
    assert 0 < len(first) < 120 and all(r["status"] == "ok" for r in first)
    STATE.down_after = None
    res2 = run_pipeline([(GSM, e) for e in exs], teacher, RULES, tmp_path, workers=4)
    assert res2.stopped is None and res2.units_done == 120 - len(first)
    log = [json.loads(x) for x in (tmp_path / LOG_FILE).read_text().splitlines()]
    assert len(log) == len({r["key"] for r in log}) == 120
    qs = [json.loads(x) for x in (tmp_path / SET_FILE).read_text().splitlines()]
    assert sorted(r["example_id"] for r in qs) == sorted(e.id for e in exs)
    assert all(r["verdict"] == "kept" for r in qs)


def test_failed_probes_are_retried_on_the_next_run_up_to_a_count(server, tmp_path):
    from exgrpo.dialogues import load_probe_set
    exs = _examples(2) + [Example("f", "gsm8k", "What is 2 + 2? [FLAKY]", "4")]
    teacher = LLMTeacher(_backend(server), RULES)
    STATE.flaky = True                                         # the server serves an error page for a while
    run_pipeline([(GSM, e) for e in exs], teacher, RULES, tmp_path, workers=4)
    first = {r["example_id"]: r for r in _jsonl(tmp_path / SET_FILE)}
    assert first["f"]["n_generated"] == 0 and first["f"]["verdict"] == "no_probes"
    STATE.flaky = False
    n = STATE.total
    res = run_pipeline([(GSM, e) for e in exs], teacher, RULES, tmp_path, workers=4, retry_failed=1)
    assert res.units_done == 10 and res.questions_written == 1       # only f's failed probes, asked again
    assert STATE.total - n == 3 * 10                                 # write, answer, recheck per probe
    logged = {r["key"]: r for r in _jsonl(tmp_path / LOG_FILE)}       # the later line stands for the key
    assert all(r["status"] == "ok" for r in logged.values()) and len(logged) == 30
    items = {it.example.id: it for it in load_probe_set(tmp_path)}
    assert len(items["f"].probes) == 10                              # the rewritten record is what trains
    n = STATE.total
    res = run_pipeline([(GSM, e) for e in exs], teacher, RULES, tmp_path, workers=4, retry_failed=1)
    assert STATE.total == n and res.units_done == 0                 # done: nothing asked again
    # a count reached: not retried however often the run is repeated
    STATE.flaky = True
    other = tmp_path / "o"
    for _ in range(3):
        run_pipeline([(GSM, exs[2])], teacher, RULES, other, workers=4, retry_failed=1)
    tries = {r["tries"] if "tries" in r else 1 for r in _jsonl(other / LOG_FILE)}
    assert max(tries) == 2 and len({r["key"] for r in _jsonl(other / LOG_FILE)}) == 10
    STATE.flaky = False


def test_the_same_model_at_another_address_reuses_the_work(server, tmp_path):
    exs = _examples(3)
    run_pipeline([(GSM, e) for e in exs], LLMTeacher(_backend(server), RULES), RULES, tmp_path, workers=4)
    made = STATE.total
    other = server.replace("127.0.0.1", "localhost")          # the same server, another base URL
    res = run_pipeline([(GSM, e) for e in exs], LLMTeacher(_backend(other), RULES), RULES, tmp_path, workers=4)
    assert STATE.total == made and res.units_done == 0 and res.questions_written == 0
    qs = [json.loads(x) for x in (tmp_path / SET_FILE).read_text().splitlines()]
    assert len(qs) == len({q["example_id"] for q in qs}) == 3


_CHILD = """
import sys
from exgrpo.probes import HTTPBackend, HTTPSettings, LLMTeacher, load_rules, run_pipeline
from exgrpo.tasks import Example, get_task
url, out = sys.argv[1], sys.argv[2]
rules = load_rules()
exs = [Example(f"q{i}", "gsm8k", f"What is {i} + {i + 1}?", str(2 * i + 1)) for i in range(30)]
b = HTTPBackend(HTTPSettings(base_url=url, model="fake", timeout_s=5, max_retries=1, backoff_s=0.01))
run_pipeline([(get_task("gsm8k"), e) for e in exs], LLMTeacher(b, rules), rules, out, workers=4)
"""


def _sigkill_child_when(script, server, tmp_path, path, lines):
    """Run `script` (a pipeline over HTTP) in a child and SIGKILL it once `path` holds `lines` lines."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    child = subprocess.Popen([sys.executable, "-c", script, server, str(tmp_path)], env=env, cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline and child.poll() is None:
            if path.exists() and path.read_bytes().count(b"\n") >= lines:
                break
            time.sleep(0.01)
        assert child.poll() is None, f"child ended early: {child.stderr.read().decode()[-2000:]}"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(timeout=10)
    assert child.returncode == -signal.SIGKILL


def test_sigkill_mid_run_then_resume_loses_nothing_and_duplicates_nothing(server, tmp_path):
    STATE.delay = 0.01
    log = tmp_path / LOG_FILE
    _sigkill_child_when(_CHILD, server, tmp_path, log, 40)
    done_before = log.read_bytes().count(b"\n")
    assert 40 <= done_before < 300
    with open(log, "ab") as f:            # what a kill in the middle of a write leaves behind
        f.write(b'{"key":"0123","task":"gsm8k","exam')
    STATE.delay = 0.0
    rules = RULES
    teacher = LLMTeacher(_backend(server), rules)
    exs = [Example(f"q{i}", "gsm8k", f"What is {i} + {i + 1}?", str(2 * i + 1)) for i in range(30)]
    res = run_pipeline([(GSM, e) for e in exs], teacher, rules, tmp_path, workers=4)
    assert res.dropped_torn_lines == [str(log)]
    recs = [json.loads(x) for x in log.read_text().splitlines()]
    assert len(recs) == len({r["key"] for r in recs}) == 300
    assert res.units_done == 300 - done_before
    qs = [json.loads(x) for x in (tmp_path / SET_FILE).read_text().splitlines()]
    assert len(qs) == len({q["example_id"] for q in qs}) == 30


_CHILD_RT = """
import sys
from exgrpo.probes import HTTPBackend, HTTPSettings, LLMTeacher, load_rules, run_pipeline
from exgrpo.tasks import Example, get_task
url, out = sys.argv[1], sys.argv[2]
rules = load_rules().select(["why", "inverse"])
exs = [Example(f"q{i}", "gsm8k", f"What is {i} + {i + 1}?" + (" [NORT]" if i % 2 else ""), str(2 * i + 1))
       for i in range(16)]
b = HTTPBackend(HTTPSettings(base_url=url, model="fake", timeout_s=5, max_retries=1, backoff_s=0.01))
run_pipeline([(get_task("gsm8k"), e) for e in exs], LLMTeacher(b, rules), rules, out, workers=4)
"""


def test_sigkill_during_the_rationale_stage_then_resume_loses_nothing_and_duplicates_nothing(server, tmp_path):
    """Half the questions never get a correct R_T (3 attempts each, then dropped), and R_T requests are slow, so
    the kill lands while R_T attempts are being made. The resumed run makes exactly the attempts not yet logged."""
    STATE.solve_delay = 0.15
    rlog = tmp_path / RATIONALE_FILE
    _sigkill_child_when(_CHILD_RT, server, tmp_path, rlog, 10)
    before = _jsonl(rlog)
    assert 10 <= len(before) < 8 * 3 + 8                     # killed in the middle of the R_T stage
    with open(rlog, "ab") as f:                              # a write cut short by the kill
        f.write(b'{"key":"0123","task":"gsm8k","atte')
    solves_before = sum(k == "solve" for k, _ in STATE.requests)
    STATE.solve_delay = 0.0
    rules = RULES.select(["why", "inverse"])
    exs = [Example(f"q{i}", "gsm8k", f"What is {i} + {i + 1}?" + (" [NORT]" if i % 2 else ""), str(2 * i + 1))
           for i in range(16)]
    res = run_pipeline([(GSM, e) for e in exs], LLMTeacher(_backend(server), rules), rules, tmp_path, workers=4)
    assert res.stopped is None and res.dropped_torn_lines == [str(rlog)]
    log = _jsonl(rlog)
    assert len(log) == len({r["key"] for r in log}) == 8 * 1 + 8 * 3
    assert res.rationale_attempts_skipped == len(before) and res.rationale_attempts_done == len(log) - len(before)
    assert sum(k == "solve" for k, _ in STATE.requests) - solves_before == len(log) - len(before)
    for i in range(16):
        mine = [r for r in log if r["example_id"] == f"q{i}"]
        assert [r["attempt"] for r in mine] == list(range(3 if i % 2 else 1))
    qs = {q["example_id"]: q for q in _jsonl(tmp_path / SET_FILE)}
    assert len(qs) == 16
    assert {i for i, q in qs.items() if q["verdict"] == "no_rationale"} == {f"q{i}" for i in range(1, 16, 2)}
    units = _jsonl(tmp_path / LOG_FILE)
    assert len(units) == len({u["key"] for u in units}) == 8 * 2
    assert not [u for u in units if int(u["example_id"][1:]) % 2]   # no probe call for a dropped question
