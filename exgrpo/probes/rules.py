"""The ten EI rules as named, editable prompt templates (exgrpo/data/probe_rules.json)."""
from __future__ import annotations

import hashlib
import json
import string
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

PLACEHOLDERS = frozenset({"question", "answer", "rationale"})


@dataclass(frozen=True)
class ProbeRule:
    name: str
    family: str
    template: str   # str.format template over PLACEHOLDERS

    @property
    def digest(self) -> str:
        """Changes when the template does, so that a resumed run redoes an edited rule."""
        return hashlib.sha1(self.template.encode()).hexdigest()[:12]

    def render(self, question: str, answer: str, rationale: str) -> str:
        return self.template.format(question=question, answer=answer, rationale=rationale)


@dataclass(frozen=True)
class RuleSet:
    system: str
    answer_instruction: str   # appended to a probe when it is asked, so A_aug can be extracted
    rules: tuple[ProbeRule, ...]
    source: str

    def select(self, names: list[str] | None) -> RuleSet:
        if not names:
            return self
        by = {r.name: r for r in self.rules}
        missing = [n for n in names if n not in by]
        if missing:
            raise ValueError(f"unknown rule(s) {missing} in {self.source}; known: {', '.join(by)}")
        return RuleSet(self.system, self.answer_instruction, tuple(by[n] for n in names), self.source)

    @property
    def digest(self) -> str:
        blob = json.dumps([self.system, self.answer_instruction, [(r.name, r.template) for r in self.rules]])
        return hashlib.sha1(blob.encode()).hexdigest()[:12]


def load_rules(path: str | Path | None = None) -> RuleSet:
    """The shipped rules, or a user's file of the same shape. Errors name the file and the rule."""
    if path is None:
        text = resources.files("exgrpo").joinpath("data/probe_rules.json").read_text(encoding="utf-8")
        source = "exgrpo/data/probe_rules.json"
    else:
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"rules file not found: {p}")
        text, source = p.read_text(encoding="utf-8"), str(p)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{source}:{e.lineno}: invalid JSON ({e.msg})") from None
    try:
        raw_rules = data["rules"]
        system, instr = str(data["system"]), str(data["answer_instruction"])
    except (KeyError, TypeError):
        raise ValueError(f"{source}: needs 'system', 'answer_instruction' and a 'rules' list") from None
    rules: list[ProbeRule] = []
    for i, r in enumerate(raw_rules):
        if not isinstance(r, dict) or not r.get("name") or not r.get("template"):
            raise ValueError(f"{source}: rule #{i + 1} needs a 'name' and a 'template'")
        fields = {f for _, f, _, _ in string.Formatter().parse(r["template"]) if f is not None}
        if fields - PLACEHOLDERS:
            raise ValueError(f"{source}: rule {r['name']!r} uses unknown placeholder(s) "
                             f"{sorted(fields - PLACEHOLDERS)}; allowed: {sorted(PLACEHOLDERS)}")
        rules.append(ProbeRule(str(r["name"]), str(r.get("family", "")), str(r["template"])))
    names = [r.name for r in rules]
    if len(set(names)) != len(names):
        raise ValueError(f"{source}: duplicate rule names in {names}")
    if not rules:
        raise ValueError(f"{source}: no rules")
    return RuleSet(system, instr, tuple(rules), source)
