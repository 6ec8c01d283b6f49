"""Answer extraction and comparison, one pair per answer format.

Every extractor takes the model's full response and returns the answer in canonical form, or None
when there is none to find. Models are asked to end with "The answer is ...", so that phrase wins
when present; otherwise each extractor falls back to the format's usual last-resort rule (last
"(X)" letter, last yes/no word, last number, last `\\boxed{}`), because real teachers and students
often ignore the instruction.
"""
from __future__ import annotations

import functools
import logging
import re
from fractions import Fraction

# "The answer is", "the final answer is:", "Answer:", GSM8K's "#### 18" — the last one in the text counts.
_ANSWER_IS = re.compile(r"(?:(?:final\s+answer|answer)\s*(?:is\b|:)\s*:?|^\s*####)\s*", re.IGNORECASE | re.MULTILINE)


def answer_span(text: str) -> str | None:
    """The text after the last "answer is"/"Answer:", up to the end of that line."""
    last = None
    for m in _ANSWER_IS.finditer(text):
        last = m
    if last is None:
        return None
    span = text[last.end():].split("\n", 1)[0].strip()
    return span or None


# ---------------------------------------------------------------- \boxed{} with nested braces

def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`), braces matched, so that
    `\\boxed{\\frac{1}{2}}` gives `\\frac{1}{2}`. An unclosed box gives None."""
    idx = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if idx < 0:
        return None
    i = text.find("{", idx)
    if i < 0:
        # "\boxed 5" (no braces) is legal LaTeX for a single token.
        m = re.match(r"\\(?:boxed|fbox)\s+(\S+)", text[idx:])
        return m.group(1).rstrip("$.") if m else None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j].strip()
    return None


# ---------------------------------------------------------------- letters

# Where a letter answer is stated: "answer is", "Answer:", "the best option is", "the correct choice:".
_LETTER_IS = re.compile(r"(?:answer|option|choice)\s*(?:is\b|:)\s*:?\s*", re.IGNORECASE)
# The stated letter: "(B)", "(b)", "**B**", "B", "B)", "b." — an upper-case letter not inside a word (so
# "A good option is" and "Because" give nothing), a lower-case one only where it ends the statement ("a bit"
# gives nothing), or any letter in brackets.
_STATED = re.compile(r"[*_]*\s*(?:\(\s*([A-Za-z])\s*\)|\b([A-Z])(?![\w'’])|\b([a-z])(?=[.):,;]|\s*$))")


def _stated_letter(span: str, valid: set[str]) -> str | None:
    m = _STATED.match(span)
    if m is None:
        return None
    letter = next(g for g in m.groups() if g).upper()
    return letter if letter in valid else None


def extract_letter(text: str, letters: str = "ABCDE") -> str | None:
    """The chosen option letter, restricted to `letters`.

    Order of preference: the last statement "The answer is (B)" / "Answer: B" / "the best option is B: bank" /
    "The answer is **B**"; then the last bold "**B**" or "**(B)**"; then the last "(X)" anywhere; then a last
    line that starts "B) ..." or "(B) ..."; then a response that is just the letter. Refused: a letter inside
    a word ("Because"), a capital used as a word ("A good answer ..."), a letter outside `letters`."""
    valid = set(letters.upper())
    for m in reversed(list(_LETTER_IS.finditer(text))):
        if (v := _stated_letter(text[m.end():], valid)) is not None:
            return v
    for pattern in (r"\*\*\s*\(?([A-Za-z])\)?\s*\*\*", r"\(([A-Za-z])\)"):
        for m in reversed(list(re.finditer(pattern, text))):
            if m.group(1).upper() in valid:
                return m.group(1).upper()
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    if lines and (m := re.match(r"\(?([A-Z])\)\s+\S", lines[-1])) and m.group(1) in valid:
        return m.group(1)
    bare = text.strip().rstrip(".").strip("*").strip("()").strip()
    if len(bare) == 1 and bare.upper() in valid:
        return bare.upper()
    return None


# ---------------------------------------------------------------- yes / no

_YES = {"yes", "true", "correct"}
_NO = {"no", "false", "incorrect"}


def _yes_no_word(word: str) -> str | None:
    w = word.lower()
    return "yes" if w in _YES else "no" if w in _NO else None


def extract_yes_no(text: str) -> str | None:
    """"yes" or "no": the first word of the "answer is" span, else the last yes/no word."""
    span = answer_span(text)
    if span is not None:
        m = re.match(r"[\(\"'*\s]*([A-Za-z]+)", span)
        if m and (v := _yes_no_word(m.group(1))) is not None:
            return v
    for m in reversed(list(re.finditer(r"\b(yes|no)\b", text, re.IGNORECASE))):
        return m.group(1).lower()
    return None


def normalize_yes_no(gold: object) -> str:
    """Dataset booleans come as true/false, "True", "yes", 1: map them all to "yes"/"no"."""
    if isinstance(gold, bool):
        return "yes" if gold else "no"
    v = _yes_no_word(str(gold).strip()) if not str(gold).strip().isdigit() else (
        "yes" if int(str(gold).strip()) else "no")
    if v is None:
        raise ValueError(f"not a yes/no answer: {gold!r}")
    return v


# ---------------------------------------------------------------- numbers

# A number as people write it: optional sign, digits with thousands commas or plain, decimals,
# or a fraction a/b. The lookarounds keep "3.5.1" or "v2" fragments from matching partially.
_NUM = r"[-+−]?\s?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s?/\s?\d+(?:\.\d+)?)?|[-+−]?\.\d+"
_NUM_RE = re.compile(rf"(?<![\w.])(?:{_NUM})(?![\d])")
_LATEX_FRAC = re.compile(r"\\[dt]?frac\s*\{\s*([-+]?[\d.,]+)\s*\}\s*\{\s*([-+]?[\d.,]+)\s*\}")


def parse_number(s: str) -> Fraction | None:
    """Exact value of one number string ("1,234.50", "-3/4", "\\frac{1}{2}", "$5", "12%"), else None.

    Units and currency around the number are allowed; two numbers in the string are not."""
    s = s.strip().replace("−", "-").replace("\\!", "").replace("\\,", "")
    s = _LATEX_FRAC.sub(r"\1/\2", s)
    s = re.sub(r"^\$|\\\$|\$$", "", s).strip()
    found = _NUM_RE.findall(s)
    if len(found) != 1:
        return None
    try:
        return _to_fraction(found[0])
    except (ValueError, ZeroDivisionError):
        return None


def _to_fraction(tok: str) -> Fraction:
    tok = tok.replace(",", "").replace(" ", "").replace("−", "-")
    if "/" in tok:
        a, b = tok.split("/")
        return Fraction(a) / Fraction(b)
    return Fraction(tok)


def format_number(x: Fraction) -> str:
    """Canonical string: integers plain, terminating decimals as decimals, else a/b."""
    if x.denominator == 1:
        return str(x.numerator)
    d = x.denominator
    while d % 2 == 0:
        d //= 2
    while d % 5 == 0:
        d //= 5
    if d == 1:  # terminating decimal
        s = f"{float(x):.12f}".rstrip("0").rstrip(".")
        return s
    return f"{x.numerator}/{x.denominator}"


def extract_number(text: str) -> str | None:
    """The final numeric answer, canonical ("1,234" -> "1234", "$-5.50" -> "-5.5", "3/4" -> "0.75",
    "1/3" -> "1/3": fractions that terminate as decimals are written as decimals).

    Preference: the last `\\boxed{}` if it holds a number, then the first number in the "answer is"
    span, then the last number in the text. Commas as thousands separators are removed; a
    percentage keeps its number (12% -> "12"), as GSM8K-style golds do."""
    text = text.replace("−", "-")
    boxed = last_boxed(text)
    if boxed is not None and (v := parse_number(boxed)) is not None:
        return format_number(v)
    span = answer_span(text)
    for source, pick_last in ((span, False), (text, True)):
        if source is None:
            continue
        source = _LATEX_FRAC.sub(r"\1/\2", source)
        nums = _NUM_RE.findall(source)
        if not nums:
            continue
        tok = nums[-1] if pick_last else nums[0]
        try:
            return format_number(_to_fraction(tok))
        except (ValueError, ZeroDivisionError):
            continue
    return None


def numbers_equal(pred: str | None, gold: str, rel_tol: float = 1e-6) -> bool:
    """Exact rational equality, with a relative tolerance so that "0.3333333" matches "1/3"."""
    if pred is None:
        return False
    a, b = parse_number(pred), parse_number(gold)
    if a is None or b is None:
        return False
    if a == b:
        return True
    return abs(float(a - b)) <= rel_tol * max(1.0, abs(float(b)))


# ---------------------------------------------------------------- MATH expressions

def normalize_math(s: str) -> str:
    """A light canonical form of a MATH answer, in the spirit of Hendrycks et al.'s `strip_string`:
    drop spacing commands, \\left/\\right, degrees, dollars, \\text{} wrappers, "x =" prefixes,
    trailing dots; unify \\dfrac/\\tfrac; remove spaces."""
    s = s.strip()
    s = re.sub(r"\\text\{\s*([^{}]*)\}", r"\1", s)
    s = re.sub(r"\\mbox\{\s*([^{}]*)\}", r"\1", s)
    for a, b in (("\\left", ""), ("\\right", ""), ("\\!", ""), ("\\,", ""), ("\\;", ""), ("\\ ", ""),
                 ("^\\circ", ""), ("^{\\circ}", ""), ("\\$", ""), ("$", ""), ("\\dfrac", "\\frac"),
                 ("\\tfrac", "\\frac"), ("\\%", ""), ("%", "")):
        s = s.replace(a, b)
    s = re.sub(r"^[a-zA-Z]\s*=\s*", "", s)  # "x = 5" -> "5"
    s = s.replace(" ", "").rstrip(".")
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)  # \frac12 -> \frac{1}{2}
    s = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)
    if re.fullmatch(r"\d+\.0+", s):
        s = s.split(".")[0]
    if s.startswith("0.") is False and re.fullmatch(r"\.\d+", s):
        s = "0" + s
    return s


_INLINE_MATH = re.compile(r"\$\$(.+?)\$\$|\$(.+?)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]", re.DOTALL)


def _span_math(span: str) -> str:
    """The answer inside an "answer is" span: its first `$...$` (or `\\(...\\)`, `\\[...\\]`) when it has one,
    else the span up to the end of its sentence. So the common "Final Answer: The final answer is $x$. I hope
    it is correct." gives x."""
    m = _INLINE_MATH.search(span)
    if m is not None:
        return next(g for g in m.groups() if g is not None).strip()
    return re.split(r"\.\s+(?=[A-Z])", span, maxsplit=1)[0].strip().rstrip(".").strip()


def extract_boxed(text: str) -> str | None:
    """MATH: the last `\\boxed{}` content, else the answer of the last "answer is" span (see _span_math)."""
    b = last_boxed(text)
    if b is None:
        span = answer_span(text)
        if span is None:
            return None
        b = _span_math(span)
    return normalize_math(b) or None


MAX_VERIFY_CHARS = 300      # longer predictions are compared as strings only (sympy on junk can take long)


def math_equal(pred: str | None, gold: str) -> bool:
    """MATH answers: equal after MATH's usual normalisation (normalize_math), or equivalent as mathematics by
    math-verify (fractions vs decimals, `\\dfrac` vs `\\frac`, reordered sets, intervals, tuples in order,
    `x = 5` vs `5`, units and degrees dropped, `2\\sqrt{2}` vs `\\sqrt{8}`)."""
    if pred is None:
        return False
    p, g = normalize_math(pred), normalize_math(gold)
    if p == g:
        return True
    if parse_number(p) is not None and parse_number(g) is not None:
        return numbers_equal(p, g)
    if len(pred) > MAX_VERIFY_CHARS:
        return False
    return _verify(gold.strip(), pred.strip())


def _verify(gold: str, pred: str) -> bool:
    import threading

    from math_verify import parse, verify
    # math-verify's time-outs use SIGALRM, which only the main thread may set; elsewhere (the probe pipeline's
    # worker threads) they are off and the length bound above keeps sympy's work small.
    t = 5 if threading.current_thread() is threading.main_thread() else None
    try:
        return bool(verify(_parse_gold(gold, t), parse(f"${pred}$", parsing_timeout=t), timeout_seconds=t))
    except Exception:                    # a parse or comparison error means not shown equal
        return False


@functools.lru_cache(maxsize=4096)
def _parse_gold(gold: str, t: int | None):
    from math_verify import parse
    logging.getLogger("math_verify").setLevel(logging.ERROR)     # its "timeout disabled" notice, once per call
    return parse(f"${gold}$", parsing_timeout=t)


# ---------------------------------------------------------------- short free-text answers

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_text(s: str) -> str:
    """SQuAD-style: lowercase, no punctuation, no articles, single spaces."""
    s = s.lower()
    s = re.sub(r"[^\w\s/.-]", " ", s)
    s = s.replace(".", " ").replace("-", " ")
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def extract_short(text: str) -> str | None:
    """A short free-form answer (probe answers, TabMWP text answers): the "answer is" span without
    wrapping brackets, quotes or a trailing full stop; else the last non-empty line."""
    span = answer_span(text)
    if span is None:
        lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
        if not lines:
            return None
        span = lines[-1]
    b = last_boxed(span)
    if b is not None:
        span = b
    span = span.strip().rstrip(".").strip()
    span = span.strip("*\"'`").strip()
    if len(span) >= 2 and span[0] in "([" and span[-1] in ")]":
        span = span[1:-1].strip()
    return span or None


def short_equal(pred: str | None, gold: str) -> bool:
    """Compare short answers: numerically if both are numbers, as yes/no if both are, else as
    normalised text."""
    if pred is None:
        return False
    pn, gn = parse_number(pred), parse_number(gold)
    if gn is not None and pn is not None:
        return numbers_equal(pred, gold)
    py, gy = extract_yes_no(pred), _yes_no_word(gold.strip().rstrip("."))
    if gy is not None:
        return py == gy
    return normalize_text(pred) == normalize_text(gold)
