"""Uncertainty for refusal rates: Wilson intervals, McNemar's exact test, paired tests for continuous shifts.

225 tasks give wide intervals (±6 points at 50 %), so every rate carries one, and dense-vs-pruned comparisons
use the pairing (same prompts): McNemar's exact test looks only at the prompts whose verdict changed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from scipy import stats

Z95 = 1.959963984540054


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """Wilson score interval for k successes in n trials (None for n = 0): honest near 0 and 1, unlike Wald.

    scipy's `binomtest(...).proportion_ci(method="wilson")` gives the bounds (for the usual 95 %; another `z`
    uses the same closed form). The bounds are then clamped to [0, rate] and [rate, 1]: the closed form leaves
    rounding residue at k = 0 or k = n (a lower bound of 5.6e-17 at rate 0), which made error bars negative
    and crashed the plot at the end of a run.
    """
    if n <= 0:
        return None
    if not 0 <= k <= n:
        raise ValueError(f"k={k} outside [0, n={n}]")
    p = k / n
    if abs(z - Z95) < 1e-12:
        ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        lo, hi = float(ci.low), float(ci.high)
    else:
        denom = 1 + z * z / n
        centre = (p + z * z / (2 * n)) / denom
        half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
        lo, hi = centre - half, centre + half
    return min(max(lo, 0.0), p), max(min(hi, 1.0), p)


def error_bar(r: dict[str, Any]) -> tuple[float, float]:
    """(below, above) distances of a rate's interval from the rate, never negative (matplotlib's `yerr`)."""
    lo, hi = r["ci95"]
    return max(0.0, r["rate"] - lo), max(0.0, hi - r["rate"])


def rate(flags: Sequence[bool | None]) -> dict[str, Any]:
    """Count, rate and Wilson 95 % interval of True among the decided verdicts (None = undecided, excluded)."""
    decided = [f for f in flags if f is not None]
    k, n = sum(bool(f) for f in decided), len(decided)
    return {"k": k, "n": n, "rate": k / n if n else None, "ci95": wilson(k, n),
            "undecided": len(flags) - n}


def mcnemar_exact(before: Sequence[bool | None], after: Sequence[bool | None]) -> dict[str, Any]:
    """Paired change of a binary outcome (e.g. refused dense → refused pruned), McNemar's exact two-sided test.

    Pairs with an undecided verdict are dropped. `gained` = False→True, `lost` = True→False; the p-value is
    the binomial test of gained vs lost at 1/2 (1.0 when nothing changed).
    """
    if len(before) != len(after):
        raise ValueError("paired verdicts must have the same length")
    pairs = [(a, b) for a, b in zip(before, after, strict=True) if a is not None and b is not None]
    gained = sum(1 for a, b in pairs if not a and b)
    lost = sum(1 for a, b in pairs if a and not b)
    n = len(pairs)
    p_value = stats.binomtest(gained, gained + lost, 0.5).pvalue if gained + lost else 1.0
    return {"n": n, "gained": gained, "lost": lost, "both": sum(1 for a, b in pairs if a and b),
            "neither": sum(1 for a, b in pairs if not a and not b),
            "difference": (gained - lost) / n if n else None, "p_value": float(p_value)}


def paired_difference(before: Sequence[float], after: Sequence[float]) -> dict[str, Any]:
    """Mean paired difference (after − before) with a t interval, the t-test and the Wilcoxon signed-rank test."""
    if len(before) != len(after):
        raise ValueError("paired values must have the same length")
    pairs = [(a, b) for a, b in zip(before, after, strict=True) if math.isfinite(a) and math.isfinite(b)]
    diffs = [b - a for a, b in pairs]
    n = len(diffs)
    if n < 2:
        return {"n": n, "mean_before": None, "mean_after": None, "mean_difference": diffs[0] if diffs else None,
                "ci95": None, "t_p_value": None, "wilcoxon_p_value": None}
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    nonzero = any(d != 0 for d in diffs)
    t_p = float(stats.ttest_1samp(diffs, 0.0).pvalue) if sd > 0 else (1.0 if not nonzero else 0.0)
    w_p = float(stats.wilcoxon(diffs).pvalue) if nonzero else 1.0
    return {"n": n, "mean_before": sum(a for a, _ in pairs) / n, "mean_after": sum(b for _, b in pairs) / n,
            "mean_difference": mean, "ci95": (mean - half, mean + half), "t_p_value": t_p, "wilcoxon_p_value": w_p}
