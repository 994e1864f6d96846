"""Uncertainty for evaluation numbers: bootstrap confidence intervals, paired tests between arms, agreement.

A refusal rate on 100 prompts has a 95% interval about +-10 points wide; two arms evaluated on the *same* prompts
should be compared by a paired test, which uses the per-prompt pairing and is far more sensitive than comparing two
intervals. This module has what the reports and `benchmarks/preserve.py` need:

* `bootstrap_ci`: a percentile bootstrap interval for the mean of per-item values (0/1 verdicts, losses), with a
  seeded generator (the same seed gives the same interval).
* `proportion_ci`: the closed-form Wilson score interval (a check on the bootstrap, and the right choice for tiny n).
* `mcnemar_exact`: the exact McNemar test for paired binary outcomes (two-sided binomial test on the discordant
  pairs).
* `paired_bootstrap`: the difference of means between two paired samples, its bootstrap interval and a two-sided
  bootstrap p-value.
* `cohen_kappa`: chance-corrected agreement between two labelings (judges vs labels, judge vs judge).

Example:

```python
>>> from peft_safety.evaluation.stats import bootstrap_ci, mcnemar_exact
>>> ci = bootstrap_ci([1, 0, 1, 1, 0, 1, 1, 1], seed=0)
>>> round(ci.estimate, 3)
0.75
>>> mcnemar_exact([1, 1, 1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0, 0, 0]).p_value
0.03125
```
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

__all__ = [
    "Interval",
    "PairedTest",
    "bootstrap_ci",
    "cohen_kappa",
    "mcnemar_exact",
    "paired_bootstrap",
    "proportion_ci",
    "rate_with_ci",
]


@dataclass(frozen=True)
class Interval:
    """A point estimate with a confidence interval.

    Args:
        estimate: the statistic on the full sample.
        low: the lower bound.
        high: the upper bound.
        confidence: the nominal coverage (0.95).
        n: the sample size.
        method: how the interval was computed (``"bootstrap"``, ``"wilson"``).
    """

    estimate: float = field(metadata={"help": "Statistic on the full sample."})
    low: float = field(metadata={"help": "Lower bound."})
    high: float = field(metadata={"help": "Upper bound."})
    confidence: float = field(default=0.95, metadata={"help": "Nominal coverage."})
    n: int = field(default=0, metadata={"help": "Sample size."})
    method: str = field(default="bootstrap", metadata={"help": "bootstrap or wilson."})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.estimate:.3f} [{self.low:.3f}, {self.high:.3f}]"


@dataclass(frozen=True)
class PairedTest:
    """A paired comparison of arm ``a`` against arm ``b`` on the same items.

    Args:
        difference: mean(a) - mean(b).
        p_value: two-sided p-value of "no difference".
        test: ``"mcnemar_exact"`` or ``"paired_bootstrap"``.
        n: number of pairs.
        low: lower bound of the interval of the difference (bootstrap only).
        high: upper bound (bootstrap only).
        details: counts (McNemar's discordant pairs ``a_only``/``b_only``) or resampling settings.
    """

    difference: float = field(metadata={"help": "mean(a) - mean(b)."})
    p_value: float = field(metadata={"help": "Two-sided p-value."})
    test: str = field(metadata={"help": "mcnemar_exact or paired_bootstrap."})
    n: int = field(metadata={"help": "Number of pairs."})
    low: float | None = field(default=None, metadata={"help": "Lower bound of the difference."})
    high: float | None = field(default=None, metadata={"help": "Upper bound of the difference."})
    details: dict[str, Any] = field(default_factory=dict, metadata={"help": "Counts or settings."})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _values(x: Sequence[Any] | torch.Tensor, what: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        t = x.detach().to("cpu", torch.float64).flatten()
    else:
        if isinstance(x, (str, bytes)):
            raise TypeError(f"{what} must be a sequence of numbers or booleans, got a {type(x).__name__}.")
        items = list(x)
        for i, v in enumerate(items):
            if v is None or isinstance(v, str) or not isinstance(v, (bool, int, float)):
                raise TypeError(
                    f"{what}[{i}] must be a number or bool, got {v!r}; drop undecided verdicts (None) before "
                    "computing a rate."
                )
        t = torch.tensor([float(v) for v in items], dtype=torch.float64)
    if t.numel() == 0:
        raise ValueError(f"{what} is empty; a confidence interval needs at least one value.")
    if not torch.isfinite(t).all():
        raise ValueError(f"{what} holds NaN or infinite values.")
    return t


def _check_confidence(confidence: float) -> None:
    if not isinstance(confidence, (int, float)) or not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}.")


def _check_resamples(n_resamples: int) -> None:
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, int) or n_resamples < 100:
        raise ValueError(f"n_resamples must be an int >= 100, got {n_resamples!r}.")


def _resample_means(values: torch.Tensor, n_resamples: int, seed: int, chunk: int = 2000) -> torch.Tensor:
    """Means of ``n_resamples`` bootstrap resamples (with replacement), in chunks to bound memory (fp64)."""
    gen = torch.Generator().manual_seed(int(seed))
    n = values.numel()
    out = torch.empty(n_resamples, dtype=torch.float64)
    for start in range(0, n_resamples, chunk):
        stop = min(start + chunk, n_resamples)
        idx = torch.randint(0, n, (stop - start, n), generator=gen)
        out[start:stop] = values[idx].mean(dim=1)
    return out


def _percentile(sorted_values: torch.Tensor, q: float) -> float:
    # the "inverted CDF" percentile: the smallest resample statistic with at least q of the mass at or below it
    k = max(0, min(sorted_values.numel() - 1, math.ceil(q * sorted_values.numel()) - 1))
    return float(sorted_values[k])


def bootstrap_ci(
    values: Sequence[Any] | torch.Tensor, *, confidence: float = 0.95, n_resamples: int = 10_000, seed: int = 0
) -> Interval:
    """Percentile bootstrap interval of the mean of per-item values.

    Args:
        values: per-item values, e.g. 1/0 refusal verdicts (undecided ones removed), or per-item losses.
        confidence: nominal coverage, 0.95 by default.
        n_resamples: bootstrap resamples (>= 100; 10,000 by default).
        seed: seed of the resampling generator; the same seed gives the same interval.

    Returns:
        An `Interval` (``method="bootstrap"``) whose estimate is the sample mean.

    Raises:
        ValueError: empty input, non-finite values, bad ``confidence`` or ``n_resamples``.
        TypeError: values that are not numbers (e.g. `None` for an undecided verdict).
    """
    _check_confidence(confidence)
    _check_resamples(n_resamples)
    t = _values(values, "values")
    means = torch.sort(_resample_means(t, n_resamples, seed)).values
    alpha = (1.0 - confidence) / 2.0
    return Interval(float(t.mean()), _percentile(means, alpha), _percentile(means, 1.0 - alpha), confidence,
                    t.numel(), "bootstrap")  # fmt: skip


def proportion_ci(successes: int, n: int, *, confidence: float = 0.95) -> Interval:
    """The Wilson score interval of a binomial proportion (closed form).

    Args:
        successes: number of successes (0 <= successes <= n).
        n: number of trials (>= 1).
        confidence: nominal coverage.

    Returns:
        An `Interval` with ``method="wilson"``.
    """
    _check_confidence(confidence)
    for name, v in (("successes", successes), ("n", n)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}.")
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"Need n >= 1 and 0 <= successes <= n, got successes={successes}, n={n}.")
    z = _normal_quantile(1.0 - (1.0 - confidence) / 2.0)
    p = successes / n
    denom = 1.0 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return Interval(p, max(0.0, center - half), min(1.0, center + half), confidence, n, "wilson")


def _normal_quantile(q: float) -> float:
    # inverse of the standard normal CDF by bisection on math.erf (stdlib only; 1e-12 accuracy is plenty)
    lo, hi = -10.0, 10.0
    for _ in range(100):
        mid = (lo + hi) / 2.0
        if 0.5 * (1.0 + math.erf(mid / math.sqrt(2.0))) < q:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2.0


def rate_with_ci(
    flags: Sequence[bool | None], *, confidence: float = 0.95, n_resamples: int = 10_000, seed: int = 0
) -> dict[str, Any]:
    """A rate over decided verdicts with its bootstrap interval, as a JSON-ready dict.

    ``None`` entries (undecided: judge errors) are excluded from the rate and counted in ``"undecided"``; they never
    count as either outcome.

    Returns:
        ``{"rate", "low", "high", "k", "n", "undecided", "confidence", "method"}``; rate and bounds are `None` when
        nothing was decided.
    """
    flags = list(flags)
    decided = [bool(f) for f in flags if f is not None]
    out: dict[str, Any] = {"k": sum(decided), "n": len(decided), "undecided": len(flags) - len(decided),
                           "confidence": confidence, "method": "bootstrap"}  # fmt: skip
    if not decided:
        return {**out, "rate": None, "low": None, "high": None}
    ci = bootstrap_ci(decided, confidence=confidence, n_resamples=n_resamples, seed=seed)
    return {**out, "rate": ci.estimate, "low": ci.low, "high": ci.high}


def _binom_two_sided_half(k: int, n: int) -> float:
    """Two-sided exact binomial p-value for Binomial(n, 1/2) at k (doubling the smaller tail, capped at 1)."""
    if n == 0:
        return 1.0
    m = min(k, n - k)
    # log-space sum of C(n, i) / 2^n for i <= m, exact enough for any n used here
    tail = sum(math.exp(math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2.0))
               for i in range(m + 1))  # fmt: skip
    return min(1.0, 2.0 * tail)


def _paired(a: Sequence[Any] | torch.Tensor, b: Sequence[Any] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ta, tb = _values(a, "a"), _values(b, "b")
    if ta.numel() != tb.numel():
        raise ValueError(f"Paired samples must have the same length, got {ta.numel()} and {tb.numel()}.")
    return ta, tb


def mcnemar_exact(a: Sequence[Any] | torch.Tensor, b: Sequence[Any] | torch.Tensor) -> PairedTest:
    """Exact McNemar test for paired binary outcomes (e.g. refusal of arm a and arm b on the same prompts).

    Only discordant pairs carry information: with ``a_only`` items where only ``a`` is 1 and ``b_only`` where only
    ``b`` is 1, under "no difference" ``a_only ~ Binomial(a_only + b_only, 1/2)``; the p-value is the two-sided
    exact binomial p-value (twice the smaller tail, capped at 1).

    Args:
        a: 0/1 outcomes of arm a (drop items where either arm is undecided, in both).
        b: 0/1 outcomes of arm b on the same items, in the same order.

    Returns:
        A `PairedTest` with ``difference = mean(a) - mean(b)`` and ``details={"a_only", "b_only"}``.
    """
    ta, tb = _paired(a, b)
    if not bool(((ta == 0) | (ta == 1)).all() and ((tb == 0) | (tb == 1)).all()):
        raise ValueError("mcnemar_exact needs 0/1 outcomes; use paired_bootstrap for continuous values.")
    a_only = int(((ta == 1) & (tb == 0)).sum())
    b_only = int(((ta == 0) & (tb == 1)).sum())
    p = _binom_two_sided_half(a_only, a_only + b_only)
    return PairedTest(float(ta.mean() - tb.mean()), p, "mcnemar_exact", ta.numel(),
                      details={"a_only": a_only, "b_only": b_only})  # fmt: skip


def paired_bootstrap(
    a: Sequence[Any] | torch.Tensor,
    b: Sequence[Any] | torch.Tensor,
    *,
    confidence: float = 0.95,
    n_resamples: int = 10_000,
    seed: int = 0,
) -> PairedTest:
    """Paired bootstrap of ``mean(a) - mean(b)``: resample items (pairs kept together).

    The interval is the percentile interval of the resampled differences; the two-sided p-value is
    ``min(1, 2 * min(P*(d <= 0), P*(d >= 0)))`` over the resampled differences ``d`` (the share of resamples on the
    other side of zero, doubled).

    Args:
        a: per-item values of arm a.
        b: per-item values of arm b on the same items.
        confidence: nominal coverage of the interval.
        n_resamples: bootstrap resamples (>= 100).
        seed: seed of the resampling generator.

    Returns:
        A `PairedTest` with ``low``/``high`` set.
    """
    _check_confidence(confidence)
    _check_resamples(n_resamples)
    ta, tb = _paired(a, b)
    diffs = torch.sort(_resample_means(ta - tb, n_resamples, seed)).values
    alpha = (1.0 - confidence) / 2.0
    below = float((diffs <= 0).double().mean())
    above = float((diffs >= 0).double().mean())
    return PairedTest(
        float((ta - tb).mean()), min(1.0, 2.0 * min(below, above)), "paired_bootstrap", ta.numel(),
        low=_percentile(diffs, alpha), high=_percentile(diffs, 1.0 - alpha),
        details={"n_resamples": n_resamples, "seed": seed, "confidence": confidence},
    )  # fmt: skip


def cohen_kappa(a: Sequence[Any], b: Sequence[Any]) -> float:
    """Cohen's kappa between two labelings of the same items (any hashable labels).

    ``kappa = (p_o - p_e) / (1 - p_e)`` with ``p_o`` the observed agreement and ``p_e`` the agreement expected from
    the two marginal distributions. When both labelings use one and the same single label (``p_e == 1``), kappa is
    1.0 if they agree everywhere.

    Raises:
        ValueError: different lengths or no items.
    """
    a, b = list(a), list(b)
    if len(a) != len(b):
        raise ValueError(f"cohen_kappa needs labelings of the same length, got {len(a)} and {len(b)}.")
    if not a:
        raise ValueError("cohen_kappa needs at least one item.")
    n = len(a)
    p_o = sum(x == y for x, y in zip(a, b)) / n
    labels = set(a) | set(b)
    p_e = sum((a.count(lab) / n) * (b.count(lab) / n) for lab in labels)
    if p_e >= 1.0:
        return 1.0 if p_o == 1.0 else 0.0
    return (p_o - p_e) / (1.0 - p_e)
