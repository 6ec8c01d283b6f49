"""Teachers behind one interface: an LLM over any `ChatBackend`, or the synthetic oracle.

A teacher does four things for the EI pipeline, one request each, all thread-safe:
`solve` (R_T: the teacher's solution of Q, kept by the pipeline only when its extracted answer is
the gold one, and asked again when it is not), `write_probe` (Q_aug from a rule), `answer_probe`
(R_aug ending in "The answer is A_aug") and `recheck` (filter 1: answer Q after the probe turn).
The pipeline parses every reply the same way, whoever wrote it.
"""
from __future__ import annotations

import json
import random
import re
from typing import Protocol

from exgrpo.probes.backends import ChatBackend, Reply
from exgrpo.probes.rules import ProbeRule, RuleSet
from exgrpo.tasks import synthetic
from exgrpo.tasks.answers import extract_short
from exgrpo.tasks.example import LETTERS, Example
from exgrpo.tasks.registry import Task


class Teacher(Protocol):
    fingerprint: str  # part of every resume key: change the teacher, redo the work

    def solve(self, task: Task, ex: Example) -> Reply: ...
    def write_probe(self, task: Task, ex: Example, rule: ProbeRule, rationale: str) -> Reply: ...
    def answer_probe(self, task: Task, ex: Example, rule: ProbeRule, probe: str) -> Reply: ...
    def recheck(self, task: Task, ex: Example, probe: str, probe_response: str) -> Reply: ...


def gold_display(ex: Example) -> str:
    """The gold answer as a teacher should see it: "(B) bank" rather than "B"."""
    if ex.choices and len(ex.answer) == 1 and ex.answer in LETTERS[: len(ex.choices)]:
        return f"({ex.answer}) {ex.choices[LETTERS.index(ex.answer)]}"
    return ex.answer


def probe_prompt(probe: str, rules: RuleSet) -> str:
    """A probe's user turn: the probe, then the rule set's answer instruction (so that A_aug can be
    extracted). The one text every reader of a probe sees: the teacher answering it, filter 1, filter
    2's student, and, through the probe set's "prompt" field, SFT and the ExGRPO dialogues."""
    return f"{probe}\n{rules.answer_instruction}"


def recheck_messages(task: Task, ex: Example, probe: str, probe_response: str,
                     rules: RuleSet) -> list[dict[str, str]]:
    """Filter 1's dialogue [Q_aug ‖ R_aug, A_aug ‖ Q]: the probe turn, then the original question."""
    return [{"role": "user", "content": probe_prompt(probe, rules)},
            {"role": "assistant", "content": probe_response},
            {"role": "user", "content": task.prompt(ex)}]


class LLMTeacher:
    def __init__(self, backend: ChatBackend, rules: RuleSet):
        self.backend, self.rules = backend, rules
        self.fingerprint = backend.fingerprint

    def solve(self, task: Task, ex: Example) -> Reply:
        """R_T: Q as the student is asked it (with the task's answer-format instruction), so that the
        pipeline can extract the answer and check it against the gold one."""
        return self.backend.complete([{"role": "user", "content": task.prompt(ex)}])

    def write_probe(self, task: Task, ex: Example, rule: ProbeRule, rationale: str) -> Reply:
        return self.backend.complete([
            {"role": "system", "content": self.rules.system},
            {"role": "user", "content": rule.render(ex.question, gold_display(ex), rationale or "(none)")}])

    def answer_probe(self, task: Task, ex: Example, rule: ProbeRule, probe: str) -> Reply:
        return self.backend.complete([{"role": "user", "content": probe_prompt(probe, self.rules)}])

    def recheck(self, task: Task, ex: Example, probe: str, probe_response: str) -> Reply:
        return self.backend.complete(recheck_messages(task, ex, probe, probe_response, self.rules))


class OracleTeacher:
    """The synthetic task's program oracle: no model, no network.

    `slip_rate` makes it a fallible teacher, as a real one is: that share of its probe answers (chosen
    by a hash of the example and rule, so a rerun slips on the same ones) ends with a wrong A_aug
    after a correct worked answer. Filter 1 is what catches them: `recheck` takes the probe's answer
    as given and finishes the problem from it (`synthetic.through_probe`), so a wrong sub-result leads
    to a wrong answer to Q."""

    def __init__(self, slip_rate: float = 0.0):
        if not 0.0 <= slip_rate < 1.0:
            raise ValueError(f"slip_rate must be in [0, 1), got {slip_rate}")
        self.slip_rate = slip_rate
        self.fingerprint = json.dumps({"backend": "synthetic-oracle", "version": 2,
                                       **({"slip_rate": slip_rate} if slip_rate else {})})

    def solve(self, task: Task, ex: Example) -> Reply:
        """The program's worked solution: always the correct R_T."""
        return self._guard(ex) or Reply(synthetic.rationale_text(ex.meta["program"]))

    def write_probe(self, task: Task, ex: Example, rule: ProbeRule, rationale: str) -> Reply:
        if (bad := self._guard(ex, rule)) is not None:
            return bad
        return Reply(synthetic.oracle_probe(ex, rule.name).question)

    def answer_probe(self, task: Task, ex: Example, rule: ProbeRule, probe: str) -> Reply:
        if (bad := self._guard(ex, rule)) is not None:
            return bad
        p = synthetic.oracle_probe(ex, rule.name)
        if probe.strip() != p.question.strip():
            return Reply(None, "the oracle answers only the probes it wrote")
        if self.slip_rate and random.Random(f"exgrpo-oracle-slip:{ex.id}:{rule.name}").random() < self.slip_rate:
            return Reply(p.response[: p.response.rindex("The answer is")] + f"The answer is {slip(p.answer)}.")
        return Reply(p.response)

    def recheck(self, task: Task, ex: Example, probe: str, probe_response: str) -> Reply:
        """Q answered with the probe turn in context: the probe's stated answer taken as given."""
        if (bad := self._guard(ex)) is not None:
            return bad
        rule = next((r for r in synthetic.RULES if synthetic.oracle_probe(ex, r).question.strip() == probe.strip()),
                    None)
        if rule is None:
            return Reply(None, "the oracle re-checks only the probes it wrote")
        final = synthetic.through_probe(ex, rule, extract_short(probe_response))
        if final is None:
            return Reply("The probe's answer contradicts the problem, so I cannot answer it.")
        return Reply(f"Taking the probe's answer as given: The answer is {final}.")

    @staticmethod
    def _guard(ex: Example, rule: ProbeRule | None = None) -> Reply | None:
        if "program" not in ex.meta:
            return Reply(None, f"the synthetic oracle cannot handle example {ex.id!r} of task {ex.task!r}")
        if rule is not None and rule.name not in synthetic.RULES:
            return Reply(None, f"the synthetic oracle has no rule {rule.name!r}")
        return None


def slip(answer: str) -> str:
    """A wrong answer of the same kind: a number off by 1 to 3, the other verdict, another operation."""
    a = answer.strip().lower()
    if a in ("yes", "no"):
        return "no" if a == "yes" else "yes"
    if a in ("add", "subtract", "multiply"):
        return {"add": "subtract", "subtract": "multiply", "multiply": "add"}[a]
    return str(int(a) + (1 + int(a) % 3) * (1 if int(a) % 2 else -1))


# ---------------------------------------------------------------- parsing teacher output

MAX_PROBE_CHARS = 4000


def parse_probe(text: str) -> tuple[str | None, str | None]:
    """(probe, None) or (None, reason). Takes the text after the last "Probe:" when present."""
    t = text.strip()
    m = list(re.finditer(r"probe\s*:\s*", t, re.IGNORECASE))
    if m:
        t = t[m[-1].end():].strip()
    t = t.strip("\"'` *").strip()
    if not t:
        return None, "empty probe"
    if len(t) > MAX_PROBE_CHARS:
        return None, f"malformed probe: longer than {MAX_PROBE_CHARS} characters"
    return t, None
