"""Verdicts of paired comparisons: did a method's Dice differ from the baseline's by more than chance gives?

Reports (demo, benchmark) state one: "M&N beat / tied / trailed supervised by X, p = Y", from a two-sided
Wilcoxon signed-rank test over paired values (the same test case, and seed, scored by both; zero differences
dropped). A difference is called a win or a loss only at p < ``SIGNIFICANCE``; a table bolds only those.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

SIGNIFICANCE = 0.05


def wilcoxon_p(differences) -> float:
    """Two-sided Wilcoxon signed-rank p-value; NaN for fewer than 2 pairs, 1.0 when all differences are 0."""
    from scipy.stats import wilcoxon

    d = np.asarray(differences, dtype=np.float64)
    d = d[~np.isnan(d)]
    if d.size < 2:
        return float("nan")
    if not np.any(d):
        return 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        try:
            return float(wilcoxon(d).pvalue)
        except ValueError:
            return float("nan")


def smallest_p(n_pairs: int) -> float:
    """The smallest two-sided p the exact test can give with ``n_pairs`` non-zero differences (2 / 2^n)."""
    return 1.0 if n_pairs < 1 else min(1.0, 2.0 / 2.0**n_pairs)


@dataclass
class Comparison:
    """A method against the baseline on paired values: mean difference (method minus baseline) and p."""

    method: str
    baseline: str
    n_pairs: int
    mean_diff: float
    p_value: float
    method_mean: float = math.nan
    baseline_mean: float = math.nan

    @property
    def supported(self) -> bool:
        """True when the test supports a difference (p < SIGNIFICANCE)."""
        return math.isfinite(self.p_value) and self.p_value < SIGNIFICANCE and self.mean_diff != 0

    @property
    def outcome(self) -> str:
        """"beat", "trailed", "tied", or "n/a" (fewer than 2 pairs: no test)."""
        if not math.isfinite(self.p_value):
            return "n/a"
        if not self.supported:
            return "tied"
        return "beat" if self.mean_diff > 0 else "trailed"


def compare(method: str, baseline: str, mine: Mapping, theirs: Mapping) -> Comparison:
    """Pair the values of the keys (test cases, or (seed, case)) that both have, finite, and test them."""
    keys = sorted((k for k in mine if k in theirs and _finite(mine[k]) and _finite(theirs[k])), key=str)
    a = np.array([mine[k] for k in keys], dtype=np.float64)
    b = np.array([theirs[k] for k in keys], dtype=np.float64)
    if not keys:
        return Comparison(method, baseline, 0, math.nan, math.nan)
    return Comparison(method, baseline, len(keys), float(np.mean(a - b)), wilcoxon_p(a - b), float(a.mean()),
                      float(b.mean()))


def verdict_sentence(c: Comparison, what: str = "foreground-mean Dice", over: str = "test cases") -> str:
    """One plain sentence, e.g. "M&N beat supervised by 0.031 foreground-mean Dice (0.842 vs 0.811), p = 0.031 ..."."""
    if c.n_pairs == 0:
        return f"{c.method} vs {c.baseline}: no {over} scored by both, so no comparison."
    means = f"({c.method_mean:.3f} vs {c.baseline_mean:.3f})"
    test = f"paired Wilcoxon signed-rank test over {c.n_pairs} {over}"
    if c.outcome == "n/a":
        return (f"{c.method} vs {c.baseline}: {c.mean_diff:+.3f} {what} {means} on {c.n_pairs} {over}, too few "
                f"for a test (p n/a): no verdict.")
    if c.outcome == "tied":
        text = (f"{c.method} tied {c.baseline}: {c.mean_diff:+.3f} {what} {means}, p = {c.p_value:.2g} ({test}); "
                f"p ≥ {SIGNIFICANCE:g} is no evidence of a difference.")
        if smallest_p(c.n_pairs) >= SIGNIFICANCE:
            text += f" With {c.n_pairs} {over} no difference could reach p < {SIGNIFICANCE:g}."
        return text
    return (f"{c.method} {c.outcome} {c.baseline} by {abs(c.mean_diff):.3f} {what} {means}, "
            f"p = {c.p_value:.2g} ({test}).")


def _finite(value) -> bool:
    try:
        return value is not None and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False
