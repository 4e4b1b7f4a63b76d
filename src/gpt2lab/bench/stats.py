"""How sure a speed comparison is: the median of per-round ratios, with a distribution-free interval.

Shared by the benchmarks that compare (``bench train --compare``, ``bench sample``): the variants
run interleaved, one ratio per round, and a gap is reported only when the interval excludes 1.00.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

CONFIDENCE = 0.95  # of the interval around the median ratio


@dataclass
class Ratio:
    """How much faster B is than A: the median per-round ratio and a confidence interval for it."""

    median: float
    low: float
    high: float
    confidence: float  # the interval's exact coverage (order statistics of n ratios)
    rounds: int

    @property
    def verdict(self) -> str:
        if self.low <= 1.0 <= self.high:
            return "no measurable difference"
        return "faster" if self.low > 1.0 else "slower"

    def describe(self, a: str, b: str) -> str:
        """e.g. 'optimised vs plain: 1.52x faster (95.0% interval 1.451x-1.603x, median of 10 rounds)'."""
        spread = f"{self.confidence:.1%} interval {self.low:.3f}x-{self.high:.3f}x, median of {self.rounds} rounds"
        if self.verdict == "no measurable difference":
            return f"{b} vs {a}: no measurable difference ({self.median:.2f}x; {spread})"
        if self.verdict == "faster":
            return f"{b} vs {a}: {self.median:.2f}x faster ({spread})"
        return f"{b} vs {a}: {1 / self.median:.2f}x slower (speed {self.median:.2f}x; {spread})"


def ratio(a: list[float], b: list[float], confidence: float | None = None) -> Ratio:
    """B's speed-up over A from per-round step times (a[r] / b[r]), with an interval for its median.

    The interval [r_(k), r_(n+1-k)] of the sorted ratios covers the true median with probability
    1 - 2 P(Binomial(n, 1/2) < k), whatever their distribution: k is the largest that keeps that
    probability >= ``confidence`` (k = 1, the full range, when no k does: then fewer rounds than
    the confidence asks for, and the coverage printed says so).
    """
    confidence = CONFIDENCE if confidence is None else confidence
    ratios = sorted(x / y for x, y in zip(a, b, strict=True))
    n = len(ratios)

    def coverage(k: int) -> float:
        return 1 - 2 * sum(math.comb(n, i) for i in range(k)) / 2**n

    k = 1
    while k + 1 <= (n + 1) // 2 and coverage(k + 1) >= confidence:
        k += 1
    return Ratio(statistics.median(ratios), ratios[k - 1], ratios[n - k], coverage(k), n)
