"""The typed item every stage passes along: one question with its gold answer."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Example:
    """One question of one task.

    `answer` is the gold answer in the task's canonical form: a letter ("B") for multiple choice,
    "yes"/"no" for boolean tasks, a number string ("1234", "-2.5", "3/4") for numeric tasks, the
    `\\boxed{}` content for MATH, free text for TabMWP's text answers. `choices` holds the option
    texts in letter order (A, B, ...) and is empty for open-ended tasks; the question text already
    lists them, so a prompt is `question + task.instruction`.
    """

    id: str
    task: str
    question: str
    answer: str
    choices: tuple[str, ...] = ()
    rationale: str | None = None  # a reference chain of thought (R_T) when the dataset has one
    meta: dict[str, Any] = field(default_factory=dict)  # task-specific extras; must be JSON-serialisable

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["choices"] = list(self.choices)
        return d

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Example:
        return Example(
            id=str(d["id"]),
            task=str(d["task"]),
            question=str(d["question"]),
            answer=str(d["answer"]),
            choices=tuple(str(c) for c in d.get("choices") or ()),
            rationale=d.get("rationale"),
            meta=dict(d.get("meta") or {}),
        )


LETTERS = "ABCDEFGHIJ"


def format_choices(choices: tuple[str, ...] | list[str]) -> str:
    """Options as the prompt shows them: one per line, '(A) text'."""
    return "\n".join(f"({LETTERS[i]}) {c}" for i, c in enumerate(choices))
