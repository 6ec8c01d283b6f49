"""exgrpo.stats against independent computations: the Wilson interval by its defining equation, the
McNemar p-value by an exact brute-force sum, Newcombe's interval by published worked examples and by
its coverage in simulation."""
import math
import random
import re
from fractions import Fraction
from statistics import NormalDist

import pytest

from exgrpo.stats import format_interval, mean_interval, paired, wilson

Z95 = NormalDist().inv_cdf(0.975)
KN = [(0, 1), (1, 1), (0, 2), (1, 2), (2, 2), (0, 10), (3, 10), (10, 10), (1, 37), (36, 37),
      (81, 263), (0, 1000), (1, 1000), (500, 1000), (999, 1000), (1000, 1000)]


def _gap(k: int, n: int, p: float, z: float = Z95) -> float:
    """|k/n - p| - z*sqrt(p(1-p)/n): <= 0 exactly on the Wilson interval, 0 at its ends."""
    return abs(k / n - p) - z * math.sqrt(p * (1 - p) / n)


def _table(n11: int, n10: int, n01: int, n00: int) -> tuple[list[int], list[int]]:
    """Score lists for a 2x2 table: n11 both right, n10 A only, n01 B only, n00 neither."""
    a = [1] * n11 + [1] * n10 + [0] * n01 + [0] * n00
    b = [1] * n11 + [0] * n10 + [1] * n01 + [0] * n00
    return a, b


# --- wilson ---

@pytest.mark.parametrize("k,n", KN)
def test_wilson_ends_solve_the_score_equation(k, n):
    lo, hi = wilson(k, n)
    assert 0.0 <= lo <= k / n <= hi <= 1.0
    assert abs(_gap(k, n, lo)) < 1e-9 and abs(_gap(k, n, hi)) < 1e-9
    assert (lo == 0.0) == (k == 0) and (hi == 1.0) == (k == n)


@pytest.mark.parametrize("k,n", KN)
def test_wilson_is_exactly_the_set_the_equation_accepts(k, n):
    lo, hi = wilson(k, n)
    eps = 1e-6
    for p in (i / 2000 for i in range(2001)):
        if min(abs(p - lo), abs(p - hi)) > eps:        # leave rounding at the very ends out
            assert (lo <= p <= hi) == (_gap(k, n, p) <= 0), p
    for inside in (lo + eps, hi - eps):
        assert _gap(k, n, inside) <= 0
    for outside in (lo - eps, hi + eps):
        if 0 < outside < 1:
            assert _gap(k, n, outside) > 0


def test_wilson_textbook_value_and_confidence():
    # 81/263 at 95 %: (0.2553, 0.3662), checked by the root test above (it is in KN)
    assert [round(x, 4) for x in wilson(81, 263)] == [0.2553, 0.3662]
    z99 = NormalDist().inv_cdf(0.995)
    lo, hi = wilson(81, 263, confidence=0.99)
    assert abs(_gap(81, 263, lo, z99)) < 1e-9 and abs(_gap(81, 263, hi, z99)) < 1e-9
    assert lo < 0.2553 and hi > 0.3662


# --- paired: the exact McNemar p-value ---

def _brute_p(a_only: int, b_only: int) -> float:
    """Two-sided binomial test at 1/2 the long way, in exact fractions: the probability of every outcome
    no likelier than the one observed."""
    m = a_only + b_only
    pmf = [Fraction(math.comb(m, x), 2**m) for x in range(m + 1)]
    return float(sum(q for q in pmf if q <= pmf[a_only]))


@pytest.mark.parametrize("a_only,b_only", [(0, 0), (0, 1), (0, 5), (5, 0), (7, 7), (3, 20), (20, 3),
                                           (10, 11), (40, 60), (1500, 1400)])
def test_mcnemar_against_brute_force(a_only, b_only):
    a, b = _table(4, a_only, b_only, 9)
    r = paired(a, b)
    assert (r.a_only, r.b_only) == (a_only, b_only)
    assert 0.0 <= r.p_value <= 1.0
    assert r.p_value == pytest.approx(_brute_p(a_only, b_only), rel=1e-12, abs=0)
    assert paired(b, a).p_value == r.p_value


def test_mcnemar_does_not_underflow():
    # 3000 discordant questions at 1700 : 1300: p ~ 3e-13, though 0.5**3000 alone underflows to 0.0
    r = paired(*_table(0, 1700, 1300, 0))
    assert 0.0 < r.p_value < 1e-6
    assert r.p_value == pytest.approx(_brute_p(1700, 1300), rel=1e-12)


# --- paired: Newcombe's interval of the difference ---

@pytest.mark.parametrize("table,expected,places", [
    # Newcombe (1998)'s worked example, his method 10 (the same formula with phi left uncorrected
    # gives 0.0618, 0.3242: this catches a missing correction)
    ((20, 12, 2, 16), (0.0562, 0.3292), 4),
    # Fagerland, Lydersen & Laake (2014), Statistics in Medicine 33:2850, using Newcombe's method 10
    ((1, 1, 7, 12), (-0.507, -0.026), 3),
    # Cavo et al. (2012) in Fagerland, Lydersen & Laake, "Statistical Analysis of Contingency Tables"
    ((59, 6, 16, 80), (-0.1186, -0.0046), 4),
])
def test_newcombe_published_examples(table, expected, places):
    r = paired(*_table(*table))
    assert [round(x, places) for x in r.ci] == list(expected)


def _tables(max_n: int):
    """Every 2x2 table (n11, n10, n01, n00) of 1 .. max_n questions."""
    for n in range(1, max_n + 1):
        for n11 in range(n + 1):
            for n10 in range(n + 1 - n11):
                for n01 in range(n + 1 - n11 - n10):
                    yield n11, n10, n01, n - n11 - n10 - n01


@pytest.mark.parametrize("confidence", [0.5, 0.95, 0.999])
def test_newcombe_properties_on_every_small_table(confidence):
    for table in [*_tables(10), (100, 17, 3, 0), (0, 40, 0, 0), (3, 0, 50, 0)]:
        a, b = _table(*table)
        r = paired(a, b, confidence)
        n = sum(table)
        assert r.n == n and r.a == (table[0] + table[1]) / n and r.b == (table[0] + table[2]) / n, table
        assert r.diff == pytest.approx(r.a - r.b, abs=1e-15), table
        assert -1.0 <= r.ci[0] <= r.diff <= r.ci[1] <= 1.0, table
        assert r.shown == (r.ci[0] > 0 or r.ci[1] < 0), table
        s = paired(b, a, confidence)
        assert s.ci == pytest.approx((-r.ci[1], -r.ci[0]), abs=1e-12) and s.p_value == r.p_value, table


@pytest.mark.parametrize("scores", [[1, 0, 1, 1, 0], [1] * 7, [0] * 7, [True, False, False]])
def test_identical_arms_differ_by_nothing(scores):
    r = paired(scores, list(scores))
    assert r.diff == 0 and (r.a_only, r.b_only) == (0, 0) and r.p_value == 1.0
    assert r.ci[0] <= 0 <= r.ci[1] and not r.shown


def test_newcombe_narrows_with_more_questions():
    small = paired(*_table(20, 12, 2, 16))
    large = paired(*_table(200, 120, 20, 160))
    assert large.diff == small.diff
    assert large.ci[1] - large.ci[0] < 0.5 * (small.ci[1] - small.ci[0])
    assert large.shown and large.p_value < small.p_value


def test_newcombe_coverage_by_simulation():
    # Both right .30, A only .15, B only .05, neither .50: true difference .10, n = 200 questions.
    # Coverage over 2000 simulated tables has Monte Carlo std sqrt(.95 * .05 / 2000) ~ 0.005, so
    # [0.92, 0.975] is about 6 std below and 5 above the nominal 0.95: a sound interval passes, and
    # one that ignores the pairing (phi = 0: too wide here, it covers ~0.997) does not.
    rng = random.Random(20240601)
    cells = [(1, 1)] * 30 + [(1, 0)] * 15 + [(0, 1)] * 5 + [(0, 0)] * 50     # 100 equal-weight cells
    covered = 0
    for _ in range(2000):
        a, b = zip(*(rng.choice(cells) for _ in range(200)))
        lo, hi = paired(a, b).ci
        covered += lo <= 0.10 <= hi
    assert 0.92 <= covered / 2000 <= 0.975


# --- bad input ---

@pytest.mark.parametrize("call,name", [
    (lambda: wilson(5, 4), "k"),
    (lambda: wilson(-1, 4), "k"),
    (lambda: wilson(0, 0), "n"),
    (lambda: wilson(1, 4, confidence=1.0), "confidence"),
    (lambda: wilson(1, 4, confidence=0.0), "confidence"),
    (lambda: wilson(1, 4, confidence=95), "confidence"),
    (lambda: paired([1, 0], [1]), "a and b must score the same questions"),
    (lambda: paired([], []), "a and b are empty"),
    (lambda: paired([1, 2], [1, 0]), "a[1]"),
    (lambda: paired([1, 0], [1, 0.5]), "b[1]"),
    (lambda: paired([1, 0], [1.0, 0]), "b[0]"),
    (lambda: paired(["1"], [1]), "a[0]"),
    (lambda: paired([1, 0], [1, 0], confidence=1.5), "confidence"),
])
def test_bad_input_names_the_argument(call, name):
    with pytest.raises(ValueError, match=r"^" + re.escape(name)):
        call()


# --- format_interval ---

def test_format_interval():
    assert format_interval(0.348, (0.3071, 0.3914)) == "34.8 % [30.7, 39.1]"
    assert format_interval(-0.05, (-0.1186, -0.0046)) == "-5.0 % [-11.9, -0.5]"
    assert format_interval(1.0, (0.0, 1.0)) == "100.0 % [0.0, 100.0]"


def test_mean_interval_is_the_normal_interval_and_covers_the_mean():
    import statistics
    xs = [0.5, -0.25, 0.0, 0.75, 0.25]
    m, (lo, hi) = mean_interval(xs)
    half = statistics.NormalDist().inv_cdf(0.975) * statistics.stdev(xs) / len(xs) ** 0.5
    assert m == pytest.approx(statistics.fmean(xs)) and (lo, hi) == pytest.approx((m - half, m + half))
    # coverage of the true mean 0.1 for n = 300 draws of a bounded variable (Monte Carlo std ~0.005 at 2000 runs)
    rng = random.Random(7)
    hits = 0
    for _ in range(2000):
        ys = [rng.choice((-0.5, 0.0, 0.5, 0.5, 0.0)) for _ in range(300)]
        _, (a, b) = mean_interval(ys)
        hits += a <= 0.1 <= b
    assert 0.92 <= hits / 2000 <= 0.975
    with pytest.raises(ValueError, match="xs"):
        mean_interval([1.0])
