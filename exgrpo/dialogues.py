"""Probe sets -> Scenario A/B dialogues -> token ids with the three masks.

Two ways to tokens. Rollouts (`turn_segments`): the chat template's text around the assistant turns is
rendered once and tokenised segment by segment, and the student's sampled ids go between the segments
as they are, never decoded and re-encoded (token in, token out). Teacher-forced text (`render`): SFT
pairs and the auxiliary probe answers, whose contents are text to begin with.

For `render`, a dialogue is a list of chat messages; every assistant message says how it is trained:
    "policy"  student-generated: the clipped policy loss
    "sft"     teacher-forced teacher response: the auxiliary SFT loss
    None      context only (all user turns; assistant turns used as history but not trained)
Rendering goes through the tokenizer's own chat template, and each assistant message's characters
(its content plus the end-of-turn marker, so the model learns to stop) are mapped to tokens through
the fast tokenizer's offsets. The template must be prefix-stable (rendering the first i messages is a
prefix of rendering all of them), which every mainstream template is; we check it and say so if not.
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from exgrpo.tasks import Example, get_task
from exgrpo.tasks.files import natural_key

POLICY, SFT = "policy", "sft"


class DialogueError(ValueError):
    pass


@dataclass(frozen=True)
class Probe:
    rule: str
    question: str           # the probe's user turn exactly as the teacher and filter 2 saw it: Q_i_aug + the rule
                            # set's answer instruction (the probe set's "prompt"; exgrpo.probes.teachers.probe_prompt)
    response: str           # the teacher's R_i_aug (ends with its answer)
    answer: str             # A_i_aug


@dataclass(frozen=True)
class ProbeItem:
    """One training question with its kept probes and the R_T the probe set settled on for it (the teacher's
    solution checked against the gold answer, or the dataset's own where `exgrpo probe --rationale dataset`
    chose it). `rationale` is what SFT's Q -> R_T pair trains on; `example.rationale` is only the dataset's
    field as loaded, and None for datasets without one."""
    example: Example
    probes: tuple[Probe, ...]
    rationale: str | None = None            # R_T
    rationale_source: str | None = None     # "teacher" | "dataset" | None (not settled or not recorded)


def load_probe_set(path: str | Path, *, kept_only: bool = True) -> list[ProbeItem]:
    """Read `probe_set.jsonl` from `exgrpo probe`: kept questions, each with its kept probes and its R_T, in the
    order of their task and example id.

    A question with several records (a re-run with other settings appends new records and leaves the old for
    audit) is read from its last one. Each probe is shown as its record's "prompt", the exact text the teacher and
    filter 2 saw; a probe set written before that field existed is an error that says to re-run `exgrpo probe`
    (which rewrites the records and reuses nothing it should not), rather than a silent fall-back to a probe
    text the teacher never answered."""
    p = Path(path)
    if p.is_dir():
        p = p / "probe_set.jsonl"
    if not p.exists():
        raise DialogueError(f"probe set not found: {p}")
    latest: dict[tuple[str, str], tuple[int, dict]] = {}
    with p.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DialogueError(f"{p}:{n}: not JSON ({e.msg})") from None
            ex = rec.get("example") if isinstance(rec, dict) else None
            if not isinstance(ex, dict):
                raise DialogueError(f"{p}:{n}: not a probe-set record (no 'example' object)")
            latest[(str(ex.get("task")), str(ex.get("id")))] = (n, rec)
    items = [_item(rec, f"{p}:{n}", kept_only) for n, rec in latest.values() if not kept_only or rec.get("kept")]
    if not items:
        raise DialogueError(f"{p} holds no kept question: nothing to train on (run `exgrpo probe` first)")
    # `exgrpo probe` appends each question as its teacher calls finish, so the file's order varies from run
    # to run; training order must depend on the probe set's contents only.
    return sorted(items, key=lambda it: (it.example.task, natural_key(it.example.id)))


def _item(rec: dict, where: str, kept_only: bool) -> ProbeItem:
    """One probe-set record -> a ProbeItem (its kept probes; with kept_only False, every written probe)."""
    probes = []
    for q in rec.get("probes", []):
        if not (q.get("kept") or (not kept_only and q.get("probe"))):
            continue
        if not q.get("prompt"):
            raise DialogueError(
                f"{where}: probe {q.get('rule')!r} of question {rec['example'].get('id')!r} has no 'prompt' (the exact "
                "probe turn the teacher answered and filter 2's student saw): the probe set was written by an older "
                "`exgrpo probe`; run the same `exgrpo probe` command again to rewrite it")
        missing = [k for k in ("rule", "probe", "response", "probe_answer") if q.get(k) in (None, "")]
        if missing:
            raise DialogueError(f"{where}: kept probe {q.get('rule')!r} of question {rec['example'].get('id')!r} "
                                f"has no {', '.join(missing)}: the record is incomplete (edited by hand, or "
                                "written by another tool); fix it or run `exgrpo probe` again")
        probes.append(Probe(q["rule"], q["prompt"], q["response"], str(q["probe_answer"])))
    try:
        ex = Example.from_dict(rec["example"])
    except KeyError as e:
        raise DialogueError(f"{where}: the question's 'example' has no {e.args[0]!r} (it has "
                            f"{', '.join(rec['example'])})") from None
    return ProbeItem(ex, tuple(probes), rec.get("rationale"), rec.get("rationale_source"))


# ----------------------------------------------------------------------------- scenarios

def sample_probes(item: ProbeItem, k: int, rng: random.Random) -> list[Probe]:
    """Scenario A's probes: k of the question's probes without replacement (fewer if it has fewer)."""
    return rng.sample(list(item.probes), min(k, len(item.probes)))


def partial_count(k_full: int, rng: random.Random, fixed: int | None = None) -> int:
    """Scenario B keeps the first k' < k probes: k' uniform in 1..k-1 (0 when k <= 1), or min(fixed, k-1)
    (--partial-probes). [choice]"""
    if fixed is not None:
        return max(0, min(fixed, k_full - 1))
    return rng.randint(1, k_full - 1) if k_full > 1 else 0


def question_message(ex: Example) -> dict:
    return {"role": "user", "content": get_task(ex.task).prompt(ex)}


def dialogue(probes: list[Probe], answers: list[str] | None, ex: Example | None, final: str | None,
             *, answer_train: str | None, final_train: str | None = POLICY) -> list[dict]:
    """Messages: each probe then its answer (the student's `answers`, or the teacher's responses when
    answers is None), then Q and the final answer when `ex` is given."""
    msgs = []
    for i, pr in enumerate(probes):
        msgs.append({"role": "user", "content": pr.question})
        msgs.append({"role": "assistant", "content": pr.response if answers is None else answers[i],
                     "train": answer_train})
    if ex is not None:
        msgs.append(question_message(ex))
        if final is not None:
            msgs.append({"role": "assistant", "content": final, "train": final_train})
    return msgs


# ----------------------------------------------------------------------------- rendering

class Tokenized(NamedTuple):
    ids: list[int]          # [L]
    policy: list[bool]      # [L] token produced by the student: clipped policy loss
    sft: list[bool]         # [L] teacher-forced token: auxiliary SFT loss


def _render(tok, messages, add_generation_prompt=False) -> str:
    clean = [{"role": m["role"], "content": m["content"]} for m in messages]
    return tok.apply_chat_template(clean, tokenize=False, add_generation_prompt=add_generation_prompt)


# Stands in for the i-th assistant turn while the template is rendered: private-use code points, no
# whitespace (a template that trims contents leaves it alone), never in real text.
_HOLE = "\ue000{}\ue001"
_HOLE_RE = re.compile("\ue000[0-9]+\ue001")


def turn_segments(tok, user_turns: list[dict]) -> list[list[int]]:
    """The chat template's token ids around the assistant turns of a dialogue whose user messages are
    `user_turns` (probes..., then Q): segments[t] goes before assistant turn t (segments[0] starts the
    dialogue, each ends with the generation prompt), segments[-1] closes the last turn.

    Turn t's prompt is segments[0] + reply_0 + ... + segments[t], with the replies' sampled ids in
    place: exactly what the rollout engine is given and what is trained afterwards. Each segment is
    rendered by the template and tokenised once, so a reply's ids never merge with their neighbours."""
    msgs: list[dict] = []
    for i, u in enumerate(user_turns):
        msgs += [{"role": "user", "content": u["content"]}, {"role": "assistant", "content": _HOLE.format(i)}]
    text = _render(tok, msgs)
    holes = [m.group(0) for m in _HOLE_RE.finditer(text)]
    if holes != [_HOLE.format(i) for i in range(len(user_turns))]:
        raise DialogueError("the chat template drops, repeats or reorders assistant turns; the sampled turns "
                            "cannot be placed in the dialogue")
    parts = _HOLE_RE.split(text)
    for t in range(len(user_turns)):                    # prefix-stable: turn t's prompt is what the model saw
        want = "".join(p + h for p, h in zip(parts[:t], holes[:t])) + parts[t]
        if _render(tok, msgs[: 2 * t + 1], add_generation_prompt=True) != want:
            raise DialogueError("the chat template is not prefix-stable: the prompt for a turn is not a prefix of "
                                "the whole dialogue, so the sampled turns cannot be placed in it")
    return [tok(p, add_special_tokens=False).input_ids if p else [] for p in parts]


def render(tok, messages: list[dict]) -> Tokenized:
    text = _render(tok, messages)
    eot = tok.eos_token or ""
    spans = []                                          # (start, end, kind) in characters
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or not m.get("train"):
            continue
        prefix = _render(tok, messages[:i], add_generation_prompt=True)
        if not text.startswith(prefix):
            raise DialogueError("the chat template is not prefix-stable: rendering the first messages is not a "
                                "prefix of rendering them all, so trained tokens cannot be located")
        start = len(prefix)
        if text[start:start + len(m["content"])] != m["content"]:
            raise DialogueError("the chat template changes message contents; trained tokens cannot be located")
        end = start + len(m["content"])
        if eot and text.startswith(eot, end):
            end += len(eot)
        spans.append((start, end, m["train"]))
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    policy, sft = [], []
    for a, _ in enc["offset_mapping"]:
        kind = next((k for s, e, k in spans if s <= a < e), None)
        policy.append(kind == POLICY)
        sft.append(kind == SFT)
    return Tokenized(list(enc["input_ids"]), policy, sft)
