"""Confidence intervals for the rates eval reports (a share of prompts refused, answered, degenerate).

Wilson's score interval (Wilson 1927; Brown, Cai & DasGupta 2001 recommend it over the textbook "Wald"
interval, which is empty at 0/n and n/n and too narrow below a few hundred items) for one rate, and
Newcombe's hybrid score interval (Newcombe 1998, method 10) for the difference of two, built from theirs.

Written here rather than imported: each is a closed formula of a few lines, and scipy/statsmodels are not
dependencies of weightlock (statsmodels' ``proportion_confint(method="wilson")`` gives the same numbers;
tests/test_eval_categories.py checks known values).
"""

from __future__ import annotations

import math

Z95 = 1.96  # the standard normal's 97.5% quantile (1.95996...) as tables round it: a two-sided 95% interval


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval (low, high) of ``successes`` out of ``n``; refused (ValueError) when n is 0:
    a rate over no items is no rate."""
    if not isinstance(n, int) or not isinstance(successes, int) or isinstance(n, bool):
        raise TypeError("wilson takes whole counts")
    if n <= 0:
        raise ValueError("a rate over zero items has no interval")
    if not 0 <= successes <= n:
        raise ValueError(f"{successes} successes out of {n}")
    p = successes / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    # the exact ends at 0/n and n/n (the formula gives them up to rounding)
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def difference(a: tuple[int, int], b: tuple[int, int], z: float = Z95) -> tuple[float, float, float]:
    """(estimate, low, high) of rate a - rate b, each given as (successes, n): Newcombe's hybrid score
    interval. It treats the two samples as independent; eval's are the same prompts at two alphas, for which
    it is conservative (wider than a paired interval)."""
    l1, u1 = wilson(*a, z=z)  # refuses n = 0 and counts outside 0..n before anything is divided
    l2, u2 = wilson(*b, z=z)
    p1, p2 = a[0] / a[1], b[0] / b[1]
    d = p1 - p2
    return d, d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)


def rate(successes: int, n: int) -> dict | None:
    """A rate as eval reports it: {"rate", "count", "n", "low", "high"} (95% Wilson), or None over zero items."""
    if n == 0:
        if successes != 0:
            raise ValueError(f"{successes} successes out of 0")
        return None
    low, high = wilson(successes, n)
    return {"rate": successes / n, "count": successes, "n": n, "low": low, "high": high}


def overlap(a: dict, b: dict) -> bool:
    """Whether two reported rates' intervals overlap: at this sample size the two cannot be told apart."""
    return a["low"] <= b["high"] and b["low"] <= a["high"]
