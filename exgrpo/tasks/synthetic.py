"""The embedded default task: multi-step arithmetic word problems with a program oracle.

Why it exists: it makes the whole pipeline runnable offline, and it is small enough that a tiny
character-level transformer can learn part of it in minutes on a CPU. The held-in / OOD gap is the
measurement: a student that memorised held-in surface forms fails the OOD split, which has more
steps, people and items no train question mentions, or is asked in reverse (given the result, find
the starting quantity).

A problem is a program: a start value and a list of (op, amount) steps, op in add/sub/mul. It
lives in `Example.meta["program"]`, so the oracle works from the `Example` alone:

    Tom has 5 apples. He buys 3 more. Then he gives away 2. How many apples does Tom have now?
    -> rationale "Tom starts with 5 apples. 5 + 3 = 8. 8 - 2 = 6. The answer is 6."

All text uses `CHARSET` only (numbers as plain digits), so a character vocabulary of ~70 symbols
covers questions, rationales, probes and probe answers.

The oracle also writes one probe, and its correct answer, for each of the ten EI rules
(`oracle_probe`). Every probe answer is machine-checkable: an integer, yes/no, or one of the words
add/subtract/multiply. Every probe is a piece of the solution (a count strictly between the start and
the end, or a fact about a step between two such counts) and none states the answer; `through_probe`
finishes the problem from a probe's answer, which is the oracle's filter-1 re-check.
"""
from __future__ import annotations

import random
import string
from dataclasses import dataclass
from typing import Literal

from exgrpo.tasks.example import Example

Split = Literal["held_in", "ood"]
Op = Literal["add", "sub", "mul"]

CHARSET = string.ascii_letters + string.digits + " .,?'\"-+*/=:()\n"

_NAMES = (("Tom", "he", "his"), ("Ana", "she", "her"), ("Ben", "he", "his"), ("Mia", "she", "her"),
          ("Sam", "he", "his"), ("Zoe", "she", "her"), ("Leo", "he", "his"), ("Ivy", "she", "her"))
_ITEMS = ("apples", "pens", "cards", "books", "coins", "shells", "stamps", "marbles")
# Only in the OOD split "ood_names": people and things no train question mentions.
_NEW_NAMES = (("Raj", "he", "his"), ("Eve", "she", "her"), ("Kai", "he", "his"), ("Uma", "she", "her"))
_NEW_ITEMS = ("buttons", "keys", "rocks", "tickets")
_ADD = ("buys {n} more", "finds {n} more", "gets {n} more")
_SUB = ("gives away {n}", "loses {n}", "sells {n}")
_MUL = {2: "doubles them", 3: "triples them"}
_SYM = {"add": "+", "sub": "-", "mul": "*"}
_OP_WORD = {"add": "add", "sub": "subtract", "mul": "multiply"}

RULES: tuple[str, ...] = ("why", "cause_effect", "process", "counterfactual", "comparison",
                          "hypothesis", "decomposition", "explanatory_challenge", "inverse",
                          "assumption")


@dataclass(frozen=True)
class Shape:
    """The size of one split's problems."""
    steps: tuple[int, int]      # inclusive range of the number of steps
    start: tuple[int, int]      # inclusive range of the starting quantity
    amount: tuple[int, int]     # inclusive range of add/sub amounts
    max_value: int              # no intermediate value above this
    reverse: bool = False       # ask for the start given the end
    new_names: bool = False     # people and items unseen in held-in problems


HELD_IN = Shape(steps=(2, 3), start=(1, 9), amount=(1, 5), max_value=30)
# OOD kinds, taken round-robin: each differs from held-in in one way only, so a failure says which.
OOD_KINDS: dict[str, Shape] = {
    "ood_steps": Shape(steps=(4, 5), start=(1, 9), amount=(1, 5), max_value=30),
    "ood_names": Shape(steps=(2, 3), start=(1, 9), amount=(1, 5), max_value=30, new_names=True),
    "ood_reverse": Shape(steps=(2, 3), start=(1, 9), amount=(1, 5), max_value=30, reverse=True),
}


# ---------------------------------------------------------------- programs

def apply(value: int, op: str, amount: int) -> int:
    return value + amount if op == "add" else value - amount if op == "sub" else value * amount


def states(program: dict) -> list[int]:
    """[start, after step 1, ..., after the last step]."""
    out = [program["start"]]
    for op, n in program["steps"]:
        out.append(apply(out[-1], op, n))
    return out


def _sample_program(rng: random.Random, shape: Shape) -> dict:
    # Rejection-free: each step is drawn from the ops that keep the value in [0, max_value].
    n_steps = rng.randint(*shape.steps)
    start = value = rng.randint(*shape.start)
    steps: list[tuple[str, int]] = []
    for i in range(n_steps):
        ops: list[tuple[str, int]] = []
        if value + shape.amount[0] <= shape.max_value:
            ops.append(("add", rng.randint(shape.amount[0], min(shape.amount[1], shape.max_value - value))))
        if value - shape.amount[0] >= 0:
            ops.append(("sub", rng.randint(shape.amount[0], min(shape.amount[1], value))))
        if i > 0 and steps[-1][0] != "mul" and 0 < value * 2 <= shape.max_value:
            ops.append(("mul", 3 if value * 3 <= shape.max_value and rng.random() < 0.4 else 2))
        op, n = rng.choice(ops)
        steps.append((op, n))
        value = apply(value, op, n)
    return {"start": start, "steps": [list(s) for s in steps]}


def shape_start(steps: list[tuple[str, int]], end: int) -> int:
    """The start value that `steps` take to `end` (undoing them from the last)."""
    v = end
    for op, n in reversed(steps):
        v = v - n if op == "add" else v + n if op == "sub" else v // n
    return v


# ---------------------------------------------------------------- text

def _who(program: dict) -> tuple[str, str, str, str]:
    name, pron, poss = (_NAMES + _NEW_NAMES)[program["who"]]
    return name, pron, poss, (_ITEMS + _NEW_ITEMS)[program["item"]]


def step_phrase(op: str, n: int) -> str:
    return _MUL[n] if op == "mul" else (_ADD if op == "add" else _SUB)[n % 3].format(n=n)


def _story(program: dict) -> list[str]:
    """The step sentences: "He buys 3 more.", "Then he gives away 2." ..."""
    name, pron, _, _ = _who(program)
    out = []
    for i, (op, n) in enumerate(program["steps"]):
        lead = pron.capitalize() if i == 0 else f"Then {pron}"
        out.append(f"{lead} {step_phrase(op, n)}.")
    return out


def question_text(program: dict) -> str:
    name, pron, _, item = _who(program)
    s = states(program)
    if program["reverse"]:
        return " ".join([f"{name} has some {item}.", *_story(program),
                         f"Now {pron} has {s[-1]} {item}.",
                         f"How many {item} did {name} have at the start?"])
    return " ".join([f"{name} has {s[0]} {item}.", *_story(program),
                     f"How many {item} does {name} have now?"])


def _eq(a: int, op: str, n: int, b: int) -> str:
    return f"{a} {_SYM[op]} {n} = {b}."


def _undo_eq(after: int, op: str, n: int, before: int) -> str:
    inv = {"add": "-", "sub": "+", "mul": "/"}[op]
    return f"{after} {inv} {n} = {before}."


def rationale_text(program: dict) -> str:
    """Step-by-step solution ending in "The answer is N."."""
    name, _, _, item = _who(program)
    s = states(program)
    steps = program["steps"]
    if program["reverse"]:
        parts = [f"Undo the steps from the end, starting from {s[-1]}."]
        parts += [_undo_eq(s[i + 1], op, n, s[i]) for i, (op, n) in reversed(list(enumerate(steps)))]
        return " ".join(parts + [f"The answer is {s[0]}."])
    parts = [f"{name} starts with {s[0]} {item}."]
    parts += [_eq(s[i], op, n, s[i + 1]) for i, (op, n) in enumerate(steps)]
    return " ".join(parts + [f"The answer is {s[-1]}."])


def answer_of(program: dict) -> int:
    s = states(program)
    return s[0] if program["reverse"] else s[-1]


# ---------------------------------------------------------------- the generator

def make_example(seed: int, split: Split, index: int) -> Example:
    """Example `index` of a split. Each example has its own RNG stream, so it does not depend on
    how many examples are generated or in what order."""
    rng = random.Random(f"exgrpo-synthetic:{seed}:{split}:{index}")
    if split == "held_in":
        kind, shape = "held_in", HELD_IN
    elif split == "ood":
        kind = list(OOD_KINDS)[index % len(OOD_KINDS)]
        shape = OOD_KINDS[kind]
    else:
        raise ValueError(f"unknown synthetic split {split!r} (held_in or ood)")
    program = _sample_program(rng, shape)
    names, items = (len(_NAMES), len(_NAMES) + len(_NEW_NAMES)), (len(_ITEMS), len(_ITEMS) + len(_NEW_ITEMS))
    if not shape.new_names:
        names, items = (0, names[0]), (0, items[0])
    program.update(who=rng.randrange(*names), item=rng.randrange(*items), reverse=shape.reverse)
    return Example(id=f"syn-{split}-{seed}-{index}", task="synthetic", question=question_text(program),
                   answer=str(answer_of(program)), choices=(), rationale=rationale_text(program),
                   meta={"program": program, "split": split, "kind": kind})


def generate(n: int, split: Split = "held_in", seed: int = 0, start: int = 0) -> list[Example]:
    """`n` examples of a split, indices start .. start+n-1. Deterministic in (seed, split, index)."""
    return [make_example(seed, split, i) for i in range(start, start + n)]


def make_splits(n_train: int, n_test: int, n_ood: int, seed: int = 0) -> dict[str, list[Example]]:
    """Train / held-in test / OOD test with no question text shared between train and the tests
    (small problems repeat by chance; a repeated one would measure memory, not generalisation)."""
    train = generate(n_train, "held_in", seed)
    seen = {e.question for e in train}
    test: list[Example] = []
    i = n_train
    while len(test) < n_test:
        if i > n_train + 50 * max(n_test, 1):
            raise ValueError(f"cannot find {n_test} held-in test problems unseen in {n_train} train ones")
        e = make_example(seed, "held_in", i)
        i += 1
        if e.question not in seen:
            seen.add(e.question)
            test.append(e)
    return {"train": train, "test": test, "ood": generate(n_ood, "ood", seed)}


# ---------------------------------------------------------------- the oracle's probes
#
# Every probe decomposes the problem: its answer is an intermediate count (or a fact about one step
# between two intermediate counts), a sub-result on the way to the answer. No probe states or asks for
# the answer itself: a probe touches only the states s[1] .. s[n-1] strictly between the start and the
# end, and the steps between them (forward problems: steps 0 .. n-2; reversed ones, which are solved
# from the end: steps 1 .. n-1). `through_probe` is the other half: the oracle's filter-1 re-check,
# which takes the probe's answer as given and finishes the problem from it.

@dataclass(frozen=True)
class OracleProbe:
    rule: str
    question: str   # the probe Q_aug
    response: str   # the teacher's reasoning R_aug, ending "The answer is X."
    answer: str     # A_aug, canonical
    params: dict    # what was chosen (step index, changed value, claim, threshold), for audit


def _program(ex: Example) -> dict:
    if "program" not in ex.meta:
        raise ValueError(f"example {ex.id!r} has no synthetic program in meta (not a synthetic example)")
    return ex.meta["program"]


def _safe_steps(p: dict) -> range:
    """The steps a probe may show worked: both their counts are strictly before the answer."""
    n = len(p["steps"])
    return range(1, n) if p["reverse"] else range(0, n - 1)


def _mul_product(steps) -> int:
    out = 1
    for o, m in steps:
        out *= m if o == "mul" else 1
    return out


def _undo(v: int, op: str, n: int) -> int | None:
    if op == "mul":
        return v // n if v % n == 0 else None
    return v - n if op == "add" else v + n


def finish_from(p: dict, i: int, value: int) -> int | None:
    """The answer when state i is `value` and everything else is as the problem says: forward problems
    run the steps after state i; reversed ones undo the steps before it. None where undoing is inexact."""
    steps = p["steps"]
    if not p["reverse"]:
        for op, n in steps[i:]:
            value = apply(value, op, n)
        return value
    v: int | None = value
    for op, n in reversed(steps[:i]):
        v = None if v is None else _undo(v, op, n)
    return v


def oracle_probe(ex: Example, rule: str) -> OracleProbe:
    """A correct probe and answer for one rule. Deterministic in (example id, rule)."""
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; the oracle knows {', '.join(RULES)}")
    p = _program(ex)
    if len(p["steps"]) < 2:
        raise ValueError(f"example {ex.id!r} has one step: no count lies strictly between its start and end")
    rng = random.Random(f"exgrpo-oracle:{ex.id}:{rule}")
    name, pron, poss, item = _who(p)
    s = states(p)
    steps = p["steps"]
    last = len(steps)
    rev = p["reverse"]
    k = rng.choice(list(_safe_steps(p)))
    op, n = steps[k]
    phrase = f"{pron} {step_phrase(op, n)}"
    # The one intermediate state next to the known end: just before the last step (forward), or just
    # after the first step (reversed, solved from the end).
    j, when = (1, "just after the first step") if rev else (last - 1, "just before the last step")
    # The states between the known end and state j, as (lo, hi): the steps lo .. hi-1 are worked to reach j.
    span = (1, last) if rev else (0, last - 1)
    # The problem without its final question, so that each probe stands on its own.
    setting = question_text(p).rsplit(" How many", 1)[0]

    def done(q: str, why: str, ans: object, **params: object) -> OracleProbe:
        return OracleProbe(rule, f"{setting}\n{q}", f"{why} The answer is {ans}.", str(ans), params)

    def walk(a: int, b: int, vals: list[int]) -> str:
        """The worked equations between states a and b, in the direction the problem is solved."""
        if rev:
            return " ".join(_undo_eq(vals[i + 1], o, m, vals[i]) for i, (o, m) in reversed(list(enumerate(steps)))
                            if a <= i < b)
        return " ".join(_eq(vals[i], o, m, vals[i + 1]) for i, (o, m) in enumerate(steps) if a <= i < b)

    if rule == "why":
        reason = {"add": f"the {item} are added to what {name} has",
                  "sub": f"the {item} leave what {name} has",
                  "mul": f"{poss} {item} become {n} times as many"}[op]
        return done(f"Why is the step where {phrase} solved the way it is? Which operation does it "
                    "use: add, subtract or multiply?",
                    f"When {phrase}, {reason}: {_eq(s[k], op, n, s[k + 1])}", _OP_WORD[op], step=k)
    if rule == "cause_effect":
        d = s[k + 1] - s[k]
        return done(f"What effect does the step where {phrase} have on the number of {item}: by how "
                    "much does it change the count, as a signed number (negative for a decrease)?",
                    f"Before it {name} has {s[k]} {item} and after it {s[k + 1]}, "
                    f"and {s[k + 1]} - {s[k]} = {d}.", d, step=k)
    if rule == "process":
        if rev:
            return done(f"Work back one step at a time. How many {item} did {name} have just before the last "
                        "step?", f"{name} ends with {s[last]} {item}. {walk(last - 1, last, s)}", s[last - 1])
        return done(f"Follow the process one step at a time. How many {item} does {name} have after "
                    "the first step?", f"{name} starts with {s[0]} {item}. {walk(0, 1, s)}", s[1])
    if rule == "counterfactual":
        # Shift the known end by a multiple of the multipliers' product so that every step stays exact.
        if rev:
            m = _mul_product(steps[1:])
            d = m * rng.randint(1, 3)
            new = [0] + [s[i] + d // _mul_product(steps[i:]) for i in range(1, last + 1)]
            return done(f"Suppose {name} had ended with {new[last]} {item} instead of {s[last]}, with the same "
                        f"steps. How many {item} would {pron} have had {when}?",
                        walk(1, last, new), new[1], new_end=new[last], shift=d)
        d = rng.randint(1, 3)
        new = [s[i] + d * _mul_product(steps[:i]) for i in range(last + 1)]
        return done(f"Suppose {name} had started with {new[0]} {item} instead of {s[0]}, with the same "
                    f"steps. How many {item} would {pron} have {when}?",
                    walk(0, last - 1, new), new[last - 1], new_start=new[0], shift=d)
    if rule == "comparison":
        a, b = span
        d = s[b] - s[a]
        which = "just after the first step and at the end" if rev else f"at the start and {when}"
        return done(f"Compare the number of {item} {which}. By how much is the later count larger than the "
                    "earlier one (negative if it is smaller)?",
                    f"{name} has {s[a]} and then {s[b]}, and {s[b]} - {s[a]} = {d}.", d)
    if rule == "hypothesis":
        t = max(0, s[j] + rng.choice((-3, -2, -1, 0, 1, 2)))
        verdict = "yes" if s[j] > t else "no"
        rel = "more than" if s[j] > t else "not more than"
        return done(f"Hypothesis: {name} has more than {t} {item} {when}. Is the hypothesis true?",
                    f"{walk(*span, s)} So {name} has {s[j]} {item} {when}, "
                    f"which is {rel} {t}.", verdict, threshold=t)
    if rule == "decomposition":
        return done(f"Break the problem into sub-steps. How many {item} does {name} have {when}?",
                    walk(*span, s), s[j])
    if rule == "explanatory_challenge":
        right = s[k + 1]
        claim = right if rng.random() < 0.5 else max(0, right + rng.choice((-2, -1, 1, 2)))
        if claim == right:
            why, verdict = f"{_eq(s[k], op, n, right)} The step is right.", "yes"
        else:
            why, verdict = f"{s[k]} {_SYM[op]} {n} = {right}, not {claim}.", "no"
        return done(f"One step of the solution says {s[k]} {_SYM[op]} {n} = {claim}. Is that step correct?",
                    why, verdict, step=k, claim=claim)
    if rule == "inverse":
        # Part of the story asked the other way round, never reaching the answer: forward problems are
        # asked for the start given the count just before the last step; reversed ones for the end
        # given the count just after the first step.
        sub = {**p, "steps": steps[1:] if rev else steps[:-1], "start": s[1] if rev else s[0], "reverse": not rev}
        rat = rationale_text(sub)
        return done(f"Now part of it the other way round. {question_text(sub)}",
                    rat[: rat.rindex(" The answer is")], answer_of(sub))
    # assumption
    inner = s[1:last]
    low = min(inner)
    return done(f"The answer assumes {name} never has fewer than zero {item} along the way. What is "
                f"the smallest number of {item} {name} has strictly between the start and the end?",
                f"The counts between the start and the end are {', '.join(str(v) for v in inner)}, and the "
                f"smallest is {low}.", low)


_OP_OF_WORD = {w: o for o, w in _OP_WORD.items()}


def through_probe(ex: Example, rule: str, claimed: str | None) -> int | None:
    """Filter 1's re-check for the oracle: the answer to Q when the probe's answer `claimed` is taken as
    given (the teacher shown [Q_aug, R_aug, A_aug, Q] answers Q). A claimed sub-result is carried to the
    end (`finish_from`), so a wrong one gives a wrong answer; a wrong yes/no verdict or a wrong smallest
    count leaves the oracle without a consistent picture: None. The problem itself is read from the
    program, as the teacher reads it from Q."""
    p = _program(ex)
    pr = oracle_probe(ex, rule)
    s, steps, last, rev = states(p), p["steps"], len(p["steps"]), p["reverse"]
    gold = answer_of(p)
    if claimed is None:
        return None
    c = claimed.strip().lower()
    num = int(c) if c.lstrip("-").isdigit() else None
    k = pr.params.get("step")

    def from_state(i: int, v: int | None) -> int | None:
        return None if v is None else finish_from(p, i, v)

    if rule == "why":
        o = _OP_OF_WORD.get(c)
        if o is None:
            return None
        n = steps[k][1]
        return from_state(k, _undo(s[k + 1], o, n)) if rev else from_state(k + 1, apply(s[k], o, n))
    if rule in ("hypothesis", "explanatory_challenge", "assumption"):
        if c != pr.answer:                  # a verdict or a fact that contradicts the problem
            if rule == "explanatory_challenge" and c == "yes":
                return from_state(k + 1, pr.params["claim"])          # believes the wrong step
            return None
        return gold
    if num is None:
        return None
    if rule == "cause_effect":
        return from_state(k, s[k + 1] - num) if rev else from_state(k + 1, s[k] + num)
    if rule == "process":
        return from_state(last - 1, num) if rev else from_state(1, num)
    if rule == "counterfactual":
        d = pr.params["shift"]
        if rev:
            return from_state(1, num - d // _mul_product(steps[1:]))
        return from_state(last - 1, num - d * _mul_product(steps[:last - 1]))
    if rule == "comparison":
        return from_state(1, s[last] - num) if rev else from_state(last - 1, s[0] + num)
    if rule == "decomposition":
        return from_state(1 if rev else last - 1, num)
    if rule == "inverse":
        return from_state(last, num) if rev else from_state(0, num)
    raise ValueError(f"unknown rule {rule!r}")
