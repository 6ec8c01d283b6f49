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
import math
import re
import threading
from fractions import Fraction

# "The answer is", "the final answer is:", "Answer:", "**Answer**:", GSM8K's "#### 18" — the last one in the
# text counts. Markdown bold around the phrase ("**Answer:** 18", "**Final Answer**: 18") is part of it.
_ANSWER_IS = re.compile(r"(?:(?:final\s+answer|answer)[*_]*\s*(?:is\b|:)\s*:?[*_]*|^\s*####)\s*",
                        re.IGNORECASE | re.MULTILINE)


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
    return None if idx < 0 else _boxed_at(text, idx)


def _boxed_at(text: str, idx: int) -> str | None:
    """Content of the `\\boxed`/`\\fbox` that starts at `idx`, or None when its braces are not closed."""
    i = text.find("{", idx)
    if i < 0 or text[idx:i].strip() not in ("\\boxed", "\\fbox"):
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

# Where a letter answer is stated: "answer is", "Answer:", "**Answer**:", "the best option is", "the correct choice:".
_LETTER_IS = re.compile(r"(?:answer|option|choice)[*_]*\s*(?:is\b|:)\s*:?\s*", re.IGNORECASE)
# The stated letter: "(B)", "(b)", "**B**", "B", "B)", "b.", "option B" — an upper-case letter not inside a word (so
# "A good option is" and "Because" give nothing), a lower-case one only where it ends the statement ("a bit"
# gives nothing), or any letter in brackets.
_STATED = re.compile(r"[*_]*\s*(?:(?i:option|choice)\s+)?[*_]*\s*"
                     r"(?:\(\s*([A-Za-z])\s*\)|\b([A-Z])(?![\w'’])|\b([a-z])(?=[.):,;]|\s*$))")
# The letter first: "B is the correct answer", "(C) is correct", "Option D is the best choice".
_LETTER_FIRST = re.compile(r"(?<![\w(])\(?([A-Z])\)?[*_]*\s+is\s+(?:the\s+)?(?:correct|right|best)\b")
# A boxed letter: "\boxed{B}", "\boxed{(B)}", "\boxed{\text{B}}", "\boxed{B: bank}".
_BOXED_LETTER = re.compile(r"\(?\s*([A-Za-z])\s*\)?|\(?([A-Z])\)?(?:[:.)]|\s)\s*\S.*", re.DOTALL)


def _stated_letter(span: str, valid: set[str]) -> str | None:
    m = _STATED.match(span)
    if m is None:
        return None
    letter = next(g for g in m.groups() if g).upper()
    return letter if letter in valid else None


def _boxed_letter(content: str | None, valid: set[str]) -> str | None:
    if content is None:
        return None
    content = re.sub(r"\\(?:text|textbf|mathrm|mathbf)\{([^{}]*)\}", r"\1", content).strip()
    m = _BOXED_LETTER.fullmatch(content)
    if m is None:
        return None
    letter = (m.group(1) or m.group(2)).upper()
    return letter if letter in valid else None


def _letter_statements(text: str, valid: set[str]) -> list[tuple[int, str]]:
    """Every valid letter the text states as its answer, with where the statement starts."""
    found = []
    for m in _LETTER_IS.finditer(text):
        if (v := _stated_letter(text[m.end():], valid)) is not None:
            found.append((m.start(), v))
    for m in _LETTER_FIRST.finditer(text):
        if m.group(1) in valid:
            found.append((m.start(), m.group(1)))
    for m in re.finditer(r"\\(?:boxed|fbox)", text):
        if (v := _boxed_letter(_boxed_at(text, m.start()), valid)) is not None:
            found.append((m.start(), v))
    return found


def extract_letter(text: str, letters: str = "ABCDE") -> str | None:
    """The chosen option letter, restricted to `letters`.

    Order of preference: the last statement — "The answer is (B)", "Answer: B", "**Answer**: B", "the best option
    is B: bank", "The answer is **B**", "The answer is option B", "B is the correct answer", "\\boxed{B}"; then the
    last bold "**B**" or "**(B)**"; then the last "(X)" anywhere; then a last line that starts "B) ..." or
    "(B) ..."; then a response that is just the letter. Refused: a letter inside a word ("Because"), a capital
    used as a word ("A good answer ..."), a lower-case word ("the answer is a bit unclear"), a letter outside
    `letters`."""
    valid = set(letters.upper())
    if statements := _letter_statements(text, valid):
        return max(statements)[1]
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
    return _close(a, b, rel_tol)


# ---------------------------------------------------------------- MATH expressions

# A unit written after a number: "5\text{ cm}", "12\,\mbox{inches}", "3\text{ m}^2". MATH's answers add them at
# will, so, as in Hendrycks et al.'s grader, they are dropped.
_TRAILING_UNIT = re.compile(r"(?<=[\d}])(?:\s|\\[,;:! ])*\\(?:text|mbox|mathrm)\{\s*[A-Za-z][A-Za-z .]*\}"
                            r"(?:\^\{?[23]\}?)?\s*$")
# Spaces go, except the one that ends a command before a letter: "\pi r" must not become "\pir".
_SPACE = re.compile(r"(\\[a-zA-Z]+)\s+(?=[a-zA-Z])|\s+")


def normalize_math(s: str) -> str:
    """A light canonical form of a MATH answer, in the spirit of Hendrycks et al.'s `strip_string`:
    drop spacing commands, \\left/\\right, degrees, dollars, percent signs, units after a number, \\text{}
    wrappers, "x =" prefixes, trailing dots; unify \\dfrac/\\tfrac; remove spaces (but keep "\\pi r" two tokens)."""
    s = s.strip()
    s = _TRAILING_UNIT.sub("", s)
    s = re.sub(r"\\(?:text|mbox)\{\s*([^{}]*)\}", r"\1", s)
    s = re.sub(r"\\(?:left|right)(?![a-zA-Z])", "", s)
    s = re.sub(r"(?<!\\)\\[!,; ]", "", s)     # spacing commands, not the "\\" of a matrix row end
    for a, b in (("^\\circ", ""), ("^{\\circ}", ""), ("\\$", ""), ("$", ""), ("\\dfrac", "\\frac"),
                 ("\\tfrac", "\\frac"), ("\\%", ""), ("%", "")):
        s = s.replace(a, b)
    s = re.sub(r"^[a-zA-Z]\s*=\s*", "", s)  # "x = 5" -> "5"
    s = _SPACE.sub(lambda m: f"{m.group(1)} " if m.group(1) else "", s).strip().rstrip(".")
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)  # \frac12 -> \frac{1}{2}
    s = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)
    if re.fullmatch(r"\d+\.0+", s):
        s = s.split(".")[0]
    if re.fullmatch(r"[-+]?\.\d+", s):
        s = s.replace(".", "0.", 1)
    return s


_INLINE_MATH = re.compile(r"\$\$(.+?)\$\$|\$(.+?)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]", re.DOTALL)


def _span_math(span: str) -> str:
    """The answer inside an "answer is" span: its first `$...$` (or `\\(...\\)`, `\\[...\\]`) when it has one,
    else the span up to the end of its sentence. So the common "Final Answer: The final answer is $x$. I hope
    it is correct." gives x."""
    m = _INLINE_MATH.search(span)
    if m is not None:
        return next(g for g in m.groups() if g is not None).strip()
    return re.split(r"\.\s+(?=[A-Z])", span, maxsplit=1)[0].strip().rstrip(".").strip("*_ ")


def extract_boxed(text: str) -> str | None:
    """MATH: the last `\\boxed{}` content anywhere, else the answer of the last "answer is" span (see _span_math:
    "The answer is $x$.", "Final Answer: The final answer is $x$. I hope it is correct."), normalised."""
    b = last_boxed(text)
    if b is None:
        span = answer_span(text)
        if span is None:
            return None
        b = _span_math(span)
    return normalize_math(b) or None


# A MATH answer that is a plain number after normalize_math: "-12", "1,000", "0.75", "3/4", "\frac{3}{4}".
_PLAIN_NUMBER = re.compile(r"[-+]?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+|\d+/\d+|\\frac\{[-+]?\d+\}\{\d+\})")


def _plain_number(s: str) -> Fraction | None:
    """The exact value of `s` when it is nothing but a number, else None (so "\\sqrt{2}" or "2\\pi" is not 2)."""
    return parse_number(s) if _PLAIN_NUMBER.fullmatch(s) else None


# A gold answer that is words, not mathematics ("\\text{Evelyn}", "\\text{odd}"): compared ignoring case.
_TEXT_ANSWER = re.compile(r"\\(?:text|textbf|mbox)\{[^{}]*\}")

MAX_VERIFY_CHARS = 300      # longer predictions are compared as strings only
MAX_VERIFY_DEPTH = 12       # so are deeper bracket nestings: math-verify's parse time grows fast with depth
MAX_VERIFY_BITS = 2 ** 21   # and expressions whose exact value would need more bits than this (9^{9^9}, 10^6!)
MAX_EXPANDED_POWER = 100    # or that raise a sum to a power above this ((x+1)^{1000}): sympy would expand them


def math_equal(pred: str | None, gold: str) -> bool:
    """MATH answers: equal after MATH's usual normalisation (normalize_math); else, when both are plain numbers,
    equal as numbers (relative tolerance 1e-6); else equivalent as mathematics by math-verify (`0.5` vs
    `\\frac12`, reordered sets, `2\\sqrt{2}` vs `\\sqrt{8}`, `x^2+2x+1` vs `(x+1)^2`; tuples and intervals must
    match in order and ends). A prediction math-verify would take unbounded time on (see MAX_VERIFY_*) is only
    compared as a string, so that judging is fast, safe in any thread and the same on every machine."""
    if pred is None:
        return False
    p, g = normalize_math(pred), normalize_math(gold)
    if p == g or (_TEXT_ANSWER.fullmatch(gold.strip()) and p.lower() == g.lower()):
        return True
    a, b = _plain_number(p), _plain_number(g)
    if a is not None and b is not None:
        return _close(a, b)
    if not p or not g or len(p) > MAX_VERIFY_CHARS or _bracket_depth(p) > MAX_VERIFY_DEPTH:
        return False
    return _verified(g, p)


def _bracket_depth(s: str) -> int:
    depth = deepest = 0
    for c in s:
        if c in "{([":
            depth += 1
            deepest = max(deepest, depth)
        elif c in "})]":
            depth = max(0, depth - 1)
    return deepest


# math-verify's own time-outs are SIGALRM alarms: only the main thread may set them, they cancel any alarm of the
# caller's, and what they cut short depends on the machine's speed. They are off here (None; checked on
# math-verify 0.9.0); the bounds above keep the work small instead. The lock serialises calls into sympy and
# math-verify's parser, whose caches are not documented as thread-safe (the GIL serialises the work anyway).
_MATH_VERIFY_LOCK = threading.RLock()


@functools.cache
def _math_verify():
    try:
        import math_verify
    except ImportError as e:
        raise ImportError("judging MATH answers needs the math-verify package: pip install 'math-verify>=0.7'") from e
    # With time-outs off it warns so once, and it logs every answer it cannot parse: expected here.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    return math_verify


def _verified(gold: str, pred: str) -> bool:
    """math-verify's verdict on two normalised answers (each wrapped in `$...$`, as it expects); False when
    either does not parse or is too costly to compare (_too_costly)."""
    g, p = _parsed(gold), _parsed(pred)
    if not g or not p or _too_costly(g) or _too_costly(p):
        return False
    with _MATH_VERIFY_LOCK:
        try:
            return bool(_math_verify().verify(list(g), list(p), timeout_seconds=None))
        except Exception:                  # an error inside sympy means not shown equal
            return False


@functools.lru_cache(maxsize=8192)
def _parsed(s: str) -> tuple:
    mv = _math_verify()
    with _MATH_VERIFY_LOCK:
        try:
            return tuple(mv.parse(f"${s}$", parsing_timeout=None))
        except Exception:
            return ()


def _too_costly(parsed: tuple) -> bool:
    """Whether verifying would make sympy compute a huge exact number or expand a huge power."""
    return any(_cost_bits(x) > MAX_VERIFY_BITS for x in parsed if not isinstance(x, str))


def _cost_bits(e) -> float:
    """An upper bound, found without evaluating anything, on the bits of the exact value sympy may compute for `e`
    (for symbols and sums: a size that grows the same way). Infinite for integrals and limits (unbounded work),
    huge powers and factorials, and sums or products over more than about a thousand terms."""
    import sympy
    if isinstance(e, sympy.MatrixBase):
        return max((_cost_bits(x) for x in e), default=1.0)
    if not isinstance(e, sympy.Basic):
        return 1.0
    if e.is_Rational:
        return float(max(abs(e.p).bit_length(), e.q.bit_length(), 1))
    if e.is_Float:
        return max(1.0, math.log2(abs(float(e)) + 1.0))
    if isinstance(e, (sympy.Integral, sympy.Limit)):
        return math.inf
    if isinstance(e, (sympy.Sum, sympy.Product)):
        if any(b.is_number and _cost_bits(b) > 10 for lim in e.limits for b in lim[1:]):
            return math.inf
        return 1000 * max(_cost_bits(a) for a in e.args)
    if e.is_Pow:
        base, ex = e.args
        if not ex.is_number:
            return _cost_bits(base) + _cost_bits(ex)
        n = _abs_bound(ex)
        if not base.is_Atom and n > MAX_EXPANDED_POWER:
            return math.inf
        return n * _cost_bits(base)
    if isinstance(e, (sympy.factorial, sympy.factorial2, sympy.subfactorial, sympy.binomial, sympy.gamma,
                      sympy.RisingFactorial, sympy.FallingFactorial)):
        n = max(_abs_bound(a) for a in e.args)
        return n * max(1.0, math.log2(n + 1.0))
    bits = [_cost_bits(a) for a in e.args]
    if e.is_Mul:
        return sum(bits)
    return max(bits, default=1.0) + (math.log2(len(bits)) if e.is_Add else 0.0)


def _abs_bound(e) -> float:
    """An upper bound on |e| for a number `e` (infinite when it would not fit a float)."""
    if e.is_Rational or e.is_Float:
        try:
            return abs(float(e))
        except OverflowError:
            return math.inf
    if _cost_bits(e) > 1000:
        return math.inf
    try:                                   # small enough to evaluate: its value, not the bound
        return abs(complex(e.evalf(15)))
    except (TypeError, ValueError, OverflowError):
        return 2.0 ** _cost_bits(e)


def _close(a: Fraction, b: Fraction, rel_tol: float = 1e-6) -> bool:
    """Exact equality, or within `rel_tol` of the larger of 1 and |b| (so "0.3333333" is "1/3")."""
    return a == b or abs(float(a - b)) <= rel_tol * max(1.0, abs(float(b)))


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
