"""Equivalence testing for Table 1 of Schlatt et al. (ECIR 2024): the paired TOST (Schuirmann, 1987) and its power.

Two systems are equivalent within ±bound when both one-sided t-tests on the per-query differences reject, which is
the same as the (1 - 2α) confidence interval of the mean difference lying inside ±bound. When they do not reject,
the power analysis says whether the test could have: the probability that a TOST on ``n`` queries with the observed
spread concludes equivalence if the systems were in truth equal, and how many queries would give 80%.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from scipy import stats


def tost(differences: Sequence[float], bound: float) -> float:
    """p-value of a paired TOST for equivalence within ±``bound``: the larger of the two one-sided t-test p-values.

    Returns 1.0 (no evidence) for fewer than two differences and 0.0 when all differences are equal and inside the
    bound.
    """
    if len(differences) < 2:
        return 1.0
    if max(differences) == min(differences):
        return 0.0 if abs(differences[0]) < bound else 1.0
    lower = stats.ttest_1samp(differences, -bound, alternative="greater").pvalue
    upper = stats.ttest_1samp(differences, bound, alternative="less").pvalue
    return float(max(lower, upper))


def tost_power(sd: float, n: int, bound: float, delta: float = 0.0, alpha: float = 0.05) -> float:
    """Probability that a paired TOST on ``n`` differences of standard deviation ``sd`` and true mean ``delta``
    concludes equivalence within ±``bound`` (central-t approximation of both one-sided tests)."""
    if n < 2 or sd <= 0:
        return float(abs(delta) < bound) if n >= 2 else 0.0
    se, critical = sd / math.sqrt(n), stats.t.ppf(1 - alpha, n - 1)
    power = stats.t.cdf((bound - delta) / se - critical, n - 1) + stats.t.cdf((bound + delta) / se - critical, n - 1) - 1
    return float(max(power, 0.0))


def queries_for_power(sd: float, bound: float, delta: float = 0.0, alpha: float = 0.05, target: float = 0.8,
                      limit: int = 1_000_000) -> int | None:
    """The fewest differences that give a TOST ``target`` power, or None when even ``limit`` do not (|delta| >= bound)."""
    if abs(delta) >= bound:
        return None
    low, high = 2, 2
    while tost_power(sd, high, bound, delta, alpha) < target:
        if high >= limit:
            return None
        low, high = high, min(high * 2, limit)
    while low < high:  # power grows with n
        mid = (low + high) // 2
        low, high = (mid + 1, high) if tost_power(sd, mid, bound, delta, alpha) < target else (low, mid)
    return high


def detectable_difference(sd: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest true mean difference a two-sided paired t-test on ``n`` differences of spread ``sd`` detects with
    ``power`` (noncentral t; bisection)."""
    if n < 2 or sd <= 0:
        return float("nan")
    critical = stats.t.ppf(1 - alpha / 2, n - 1)

    def power_at(delta: float) -> float:
        ncp = delta / (sd / math.sqrt(n))
        return float(stats.nct.sf(critical, n - 1, ncp) + stats.nct.cdf(-critical, n - 1, ncp))

    low, high = 0.0, 10 * sd
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if power_at(mid) < power else (low, mid)
    return high


def detectable_of(differences: Sequence[float]) -> float | None:
    """:func:`detectable_difference` at the spread of these paired differences; ``None`` without spread."""
    spread = float(stats.tstd(differences)) if len(differences) > 1 else 0.0
    return detectable_difference(spread, len(differences)) if spread > 0 else None


def paired_p(values: Sequence[float], base: Sequence[float]) -> float:
    """Two-sided paired t-test p-value; 1.0 when the two are identical, 0.0 for a constant non-zero difference."""
    differences = [a - b for a, b in zip(values, base)]
    if all(d == 0 for d in differences):
        return 1.0
    if len(set(differences)) == 1:
        return 0.0
    return float(stats.ttest_rel(values, base).pvalue)


def equivalence_summary(differences: Sequence[float], bound: float, alpha: float = 0.05) -> dict:
    """Mean Δ, TOST p, the (1 - 2α) interval of Δ, the spread, the power at a true Δ of 0 and the queries that 80%
    power would need."""
    n = len(differences)
    delta = sum(differences) / n if n else float("nan")
    summary = {"delta": delta, "tost_p": tost(differences, bound), "queries": n}
    if n >= 2:
        sd = float(stats.tstd(differences))
        half = stats.t.ppf(1 - alpha, n - 1) * sd / math.sqrt(n)
        summary.update(sd=sd, ci=[delta - half, delta + half], power_at_zero=tost_power(sd, n, bound, 0.0, alpha),
                       queries_for_80=queries_for_power(sd, bound, 0.0, alpha))
    return summary
