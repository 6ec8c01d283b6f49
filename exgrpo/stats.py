"""How sure the demo's report may be of an accuracy, and of a gap between two training arms.

Every arm is scored on the same questions, so two arms are compared question by question (a paired
design), not as two independent samples: what carries the evidence is the questions one arm got right
and the other wrong. All here are pure functions of 0/1 scores, standard library only:

    wilson(k, n)          the Wilson score interval of one accuracy k/n (sound at 0/n and n/n and for
                          small n, where the textbook p +- z*sqrt(p(1-p)/n) collapses or leaves [0, 1])
    paired(a, b)          accuracies of A and B, the interval of their difference (Newcombe 1998,
                          method 10) and the exact McNemar p-value
    format_interval(p, ci)  "34.8 % [30.7, 39.1]"

Newcombe RG (1998), "Improved confidence intervals for the difference between binomial proportions
based on paired data", Statistics in Medicine 17:2635-2650.
"""
from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist


def _z(confidence: float) -> float:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    return NormalDist().inv_cdf(1 - (1 - confidence) / 2)


def wilson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval for k successes in n trials: the p with |k/n - p| <= z*sqrt(p(1-p)/n).
    Exactly 0.0 below at k = 0 and 1.0 above at k = n."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n!r}")
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, n] = [0, {n}], got {k!r}")
    z = _z(confidence)
    centre = (k + z * z / 2) / (n + z * z)
    half = z * math.sqrt(k * (n - k) / n + z * z / 4) / (n + z * z)
    lo = 0.0 if k == 0 else max(0.0, centre - half)
    hi = 1.0 if k == n else min(1.0, centre + half)
    return lo, hi


@dataclass(frozen=True)
class Paired:
    """A and B scored on the same n questions."""
    n: int
    a: float                      # accuracy of A
    b: float                      # accuracy of B
    diff: float                   # a - b
    ci: tuple[float, float]       # confidence interval of diff (Newcombe's method 10)
    a_only: int                   # questions A got right and B wrong
    b_only: int                   # questions B got right and A wrong
    p_value: float                # two-sided exact McNemar test of a == b

    @property
    def shown(self) -> bool:
        """The interval excludes 0: the data show which arm is better at this confidence."""
        return self.ci[0] > 0 or self.ci[1] < 0


def _scores(name: str, values: Sequence[bool | int]) -> list[int]:
    """0/1 ints from bools or integers 0/1 (numpy integers too, not numpy bools: pass .tolist()); anything
    else, 0.5 or 1.0 too, is refused rather than guessed at."""
    out = []
    for i, v in enumerate(values):
        try:
            x = operator.index(v)
        except TypeError:
            x = None
        if x not in (0, 1):
            raise ValueError(f"{name}[{i}] must be 0/1 or a bool, got {v!r}")
        out.append(x)
    return out


def _mcnemar_exact(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p-value: under a == b each discordant question is a fair coin, so a_only
    ~ Bin(a_only + b_only, 1/2). In integers (math.comb) up to one division, so thousands of
    discordant questions neither underflow nor lose the tail."""
    m = a_only + b_only
    if m == 0:
        return 1.0
    tail = sum(math.comb(m, i) for i in range(min(a_only, b_only) + 1))
    return min(1.0, 2 * tail / 2**m)


def _newcombe(n11: int, n10: int, n01: int, n00: int, confidence: float) -> tuple[float, float]:
    """Newcombe's method 10 for the paired difference (n11 + n10)/n - (n11 + n01)/n: each side of the
    interval adds the matching Wilson half-widths of the two accuracies in quadrature, less their
    covariance through phi, the correlation of the 2x2 table. As in the paper, a positive ad - bc is
    first reduced by n/2 (not below 0), a continuity correction that keeps phi from overstating the
    correlation; phi = 0 when a margin is 0 or n."""
    n = n11 + n10 + n01 + n00
    ka, kb = n11 + n10, n11 + n01
    pa, pb = ka / n, kb / n
    la, ua = wilson(ka, n, confidence)
    lb, ub = wilson(kb, n, confidence)
    det = n11 * n00 - n10 * n01
    if det > 0:
        det = max(det - n / 2, 0)
    margins = ka * (n - ka) * kb * (n - kb)
    phi = det / math.sqrt(margins) if margins else 0.0
    d = (n10 - n01) / n
    lo = d - math.sqrt((pa - la) ** 2 - 2 * phi * (pa - la) * (ub - pb) + (ub - pb) ** 2)
    hi = d + math.sqrt((ua - pa) ** 2 - 2 * phi * (ua - pa) * (pb - lb) + (pb - lb) ** 2)
    return max(-1.0, lo), min(1.0, hi)       # a rounding guard: as |phi| <= 1, lo >= la - ub and hi <= ua - lb


def paired(a: Sequence[bool | int], b: Sequence[bool | int], confidence: float = 0.95) -> Paired:
    """Compare A and B scored on the same questions (index i is the same question in both)."""
    if len(a) != len(b):
        raise ValueError(f"a and b must score the same questions: len(a) = {len(a)}, len(b) = {len(b)}")
    if not a:
        raise ValueError("a and b are empty: no questions to compare")
    _z(confidence)                                   # refuse a bad confidence before any work
    sa, sb = _scores("a", a), _scores("b", b)
    n11 = sum(x & y for x, y in zip(sa, sb))
    n10 = sum(sa) - n11
    n01 = sum(sb) - n11
    n = len(sa)
    return Paired(n=n, a=(n11 + n10) / n, b=(n11 + n01) / n, diff=(n10 - n01) / n,
                  ci=_newcombe(n11, n10, n01, n - n11 - n10 - n01, confidence),
                  a_only=n10, b_only=n01, p_value=_mcnemar_exact(n10, n01))


def format_interval(p: float, ci: tuple[float, float]) -> str:
    """A proportion and its interval in percent, one decimal: "34.8 % [30.7, 39.1]"."""
    return f"{100 * p:.1f} % [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def mean_interval(xs: Sequence[float], confidence: float = 0.95) -> tuple[float, tuple[float, float]]:
    """The mean of per-question values (e.g. P_full - P_partial, each a mean over G samples) and its normal
    interval mean +- z * s / sqrt(n), s the sample standard deviation: what the central limit theorem gives
    for n of a few hundred bounded values."""
    if len(xs) < 2:
        raise ValueError(f"xs must hold at least 2 values for an interval, got {len(xs)}")
    z = _z(confidence)
    m = math.fsum(xs) / len(xs)
    s = math.sqrt(math.fsum((x - m) ** 2 for x in xs) / (len(xs) - 1))
    half = z * s / math.sqrt(len(xs))
    return m, (m - half, m + half)
