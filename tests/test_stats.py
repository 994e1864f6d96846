"""Confidence intervals and paired tests against closed-form references (binomial laws, scipy when installed)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from peft_safety.evaluation.stats import (
    bootstrap_ci,
    cohen_kappa,
    mcnemar_exact,
    paired_bootstrap,
    proportion_ci,
    rate_with_ci,
)


def _binom_cdf(k: int, n: int, p: float) -> float:
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))


def _binom_ppf(q: float, n: int, p: float) -> int:
    # smallest k with CDF(k) >= q (explicit formula; scipy.stats.binom.ppf agrees)
    return next(k for k in range(n + 1) if _binom_cdf(k, n, p) >= q - 1e-12)


@pytest.mark.parametrize(("k", "n"), [(30, 100), (5, 40), (95, 100)])
def test_bootstrap_of_a_proportion_matches_binomial_quantiles(k, n):
    # The bootstrap distribution of the mean of n 0/1 values with k ones is exactly Binomial(n, k/n) / n, so the
    # percentile interval's bounds are its 2.5% and 97.5% quantiles (up to resampling noise of one step).
    values = [1] * k + [0] * (n - k)
    ci = bootstrap_ci(values, n_resamples=20_000, seed=3)
    assert ci.estimate == pytest.approx(k / n)
    lo_ref = _binom_ppf(0.025, n, k / n) / n
    hi_ref = _binom_ppf(0.975, n, k / n) / n
    assert abs(ci.low - lo_ref) <= 1.0 / n + 1e-12
    assert abs(ci.high - hi_ref) <= 1.0 / n + 1e-12
    assert ci.low <= ci.estimate <= ci.high


def test_bootstrap_is_seeded_and_rejects_bad_input():
    values = [1, 0, 1, 1, 0, 0, 1, 0, 1, 1]
    assert bootstrap_ci(values, seed=1) == bootstrap_ci(values, seed=1)
    with pytest.raises(TypeError, match=r"values\[1\] must be a number or bool, got None"):
        bootstrap_ci([1, None, 0])
    with pytest.raises(ValueError, match="empty"):
        bootstrap_ci([])
    with pytest.raises(ValueError, match="confidence must be in"):
        bootstrap_ci(values, confidence=1.5)
    with pytest.raises(ValueError, match="n_resamples must be an int >= 100"):
        bootstrap_ci(values, n_resamples=10)


def test_bootstrap_of_continuous_values_matches_the_normal_interval():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2000, generator=gen, dtype=torch.float64) * 2.0 + 1.0
    ci = bootstrap_ci(x, n_resamples=5000, seed=0)
    half = 1.959964 * float(x.std(unbiased=False)) / math.sqrt(x.numel())
    assert ci.low == pytest.approx(float(x.mean()) - half, abs=0.15 * half)
    assert ci.high == pytest.approx(float(x.mean()) + half, abs=0.15 * half)


@pytest.mark.parametrize(("k", "n"), [(8, 10), (0, 20), (50, 100), (99, 100)])
def test_wilson_interval_matches_reference(k, n):
    ci = proportion_ci(k, n)
    # explicit Wilson formula with z = 1.959963984540054
    z = 1.959963984540054
    p = k / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert ci.low == pytest.approx(max(0.0, center - half), abs=1e-9)
    assert ci.high == pytest.approx(min(1.0, center + half), abs=1e-9)
    scipy_stats = pytest.importorskip("scipy.stats")
    ref = scipy_stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert ci.low == pytest.approx(ref.low, abs=1e-9) and ci.high == pytest.approx(ref.high, abs=1e-9)


def test_wilson_known_value():
    # 8 of 10: Wilson 95% interval (0.4902, 0.9433), a textbook value
    ci = proportion_ci(8, 10)
    assert (round(ci.low, 4), round(ci.high, 4)) == (0.4902, 0.9433)
    with pytest.raises(ValueError, match="0 <= successes <= n"):
        proportion_ci(11, 10)


def test_mcnemar_exact_matches_the_binomial_test():
    # 6 discordant pairs all one way: p = 2 * (1/2)^6
    assert mcnemar_exact([1] * 6 + [0, 1], [0] * 6 + [0, 1]).p_value == pytest.approx(2 / 64)
    gen = torch.Generator().manual_seed(1)
    a = (torch.rand(120, generator=gen) < 0.6).int()
    b = (torch.rand(120, generator=gen) < 0.4).int()
    test = mcnemar_exact(a, b)
    a_only = int(((a == 1) & (b == 0)).sum())
    b_only = int(((a == 0) & (b == 1)).sum())
    assert test.details == {"a_only": a_only, "b_only": b_only}
    m, n = min(a_only, b_only), a_only + b_only
    ref = min(1.0, 2 * sum(math.comb(n, i) for i in range(m + 1)) / 2**n)
    assert test.p_value == pytest.approx(ref, rel=1e-9)
    assert test.difference == pytest.approx(float(a.double().mean() - b.double().mean()))
    scipy_stats = pytest.importorskip("scipy.stats")
    assert test.p_value == pytest.approx(scipy_stats.binomtest(a_only, n, 0.5).pvalue, rel=1e-9)


def test_mcnemar_no_discordant_pairs_and_bad_input():
    assert mcnemar_exact([1, 0, 1], [1, 0, 1]).p_value == 1.0
    with pytest.raises(ValueError, match="same length"):
        mcnemar_exact([1, 0], [1])
    with pytest.raises(ValueError, match="0/1 outcomes"):
        mcnemar_exact([0.5, 1], [1, 0])


def test_paired_bootstrap_interval_and_p_value():
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(400, generator=gen, dtype=torch.float64)
    shifted = base + 0.3 + 0.1 * torch.randn(400, generator=gen, dtype=torch.float64)
    test = paired_bootstrap(shifted, base, n_resamples=4000, seed=0)
    d = shifted - base
    half = 1.959964 * float(d.std(unbiased=False)) / math.sqrt(d.numel())
    assert test.difference == pytest.approx(float(d.mean()))
    assert test.low == pytest.approx(float(d.mean()) - half, abs=0.2 * half)
    assert test.high == pytest.approx(float(d.mean()) + half, abs=0.2 * half)
    assert test.p_value < 0.001
    # no systematic difference: the interval covers 0 and the p-value is large (both, not either)
    same = paired_bootstrap(base + 0.1 * torch.randn(400, generator=gen, dtype=torch.float64), base, seed=0)
    assert same.low < 0 < same.high
    assert same.p_value > 0.05


def test_cohen_kappa_against_a_hand_computed_table():
    # confusion table [[20, 5], [10, 15]]: p_o = 0.7, p_e = 0.5 * 0.6 + 0.5 * 0.4 = 0.5, kappa = 0.4
    a = ["r"] * 25 + ["c"] * 25
    b = ["r"] * 20 + ["c"] * 5 + ["r"] * 10 + ["c"] * 15
    assert cohen_kappa(a, b) == pytest.approx(0.4)
    assert cohen_kappa(a, a) == pytest.approx(1.0)
    assert cohen_kappa(["x", "x"], ["x", "x"]) == 1.0
    with pytest.raises(ValueError, match="same length"):
        cohen_kappa([1], [1, 2])


def test_rate_with_ci_excludes_undecided():
    out = rate_with_ci([True, False, None, True, True])
    assert (out["k"], out["n"], out["undecided"]) == (3, 4, 1)
    assert out["rate"] == pytest.approx(0.75)
    assert out["low"] <= 0.75 <= out["high"]
    assert rate_with_ci([None, None])["rate"] is None


# ------------------------------------------------------------------------------------------------------------------
# Exact pins: the same resamples recomputed with numpy, and hand tables where the wrong formula gives another number
# ------------------------------------------------------------------------------------------------------------------


def _resampled_means(values, n_resamples: int, seed: int, chunk: int = 2000):
    """The bootstrap resamples the library draws (its documented seeded index stream: ``torch.randint`` rows of
    ``n`` indices from ``Generator().manual_seed(seed)``, ``chunk`` rows at a time), with the means taken in numpy."""
    v = np.asarray(values, dtype=np.float64)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, n_resamples, chunk):
        idx = torch.randint(0, v.size, (min(chunk, n_resamples - start), v.size), generator=gen).numpy()
        out.append(v[idx].mean(axis=1))
    return np.concatenate(out)


CASES = [
    ([1] * 7 + [0] * 13, 0.95, 2000, 0),
    ([1] * 30 + [0] * 70, 0.90, 5000, 3),  # spans the 2000-row chunks
    ([0.25, 1.5, -2.0, 3.25, 0.0, 7.5, -1.25], 0.95, 999, 11),  # continuous values, an odd count
    ([1, 0, 0, 1, 1], 0.80, 100, 5),
]


@pytest.mark.parametrize(("values", "confidence", "n_resamples", "seed"), CASES)
def test_bootstrap_interval_is_exactly_the_inverted_cdf_percentile_of_its_resamples(
    values, confidence, n_resamples, seed
):
    ci = bootstrap_ci(values, confidence=confidence, n_resamples=n_resamples, seed=seed)
    means = _resampled_means(values, n_resamples, seed)
    alpha = (1 - confidence) / 2
    assert ci.estimate == pytest.approx(float(np.mean(values)), rel=1e-15)
    assert ci.low == pytest.approx(float(np.quantile(means, alpha, method="inverted_cdf")), rel=1e-13, abs=0)
    assert ci.high == pytest.approx(float(np.quantile(means, 1 - alpha, method="inverted_cdf")), rel=1e-13, abs=0)


@pytest.mark.parametrize(("values", "confidence", "n_resamples", "seed"), CASES)
def test_paired_bootstrap_is_exactly_its_resamples(values, confidence, n_resamples, seed):
    a = np.asarray(values, dtype=np.float64)
    b = np.roll(a, 1) * 0.5  # another arm on the same items
    test = paired_bootstrap(a.tolist(), b.tolist(), confidence=confidence, n_resamples=n_resamples, seed=seed)
    diffs = _resampled_means(a - b, n_resamples, seed)
    alpha = (1 - confidence) / 2
    assert test.difference == pytest.approx(float(np.mean(a - b)), rel=1e-15, abs=1e-15)
    assert test.low == pytest.approx(float(np.quantile(diffs, alpha, method="inverted_cdf")), rel=1e-13, abs=1e-15)
    assert test.high == pytest.approx(
        float(np.quantile(diffs, 1 - alpha, method="inverted_cdf")), rel=1e-13, abs=1e-15
    )
    p_ref = min(1.0, 2 * min(float(np.mean(diffs <= 0)), float(np.mean(diffs >= 0))))
    assert test.p_value == p_ref


def test_paired_bootstrap_p_value_counts_zero_differences_on_both_sides():
    """0/1 outcomes with two discordant pairs: many resamples have a difference of exactly 0, where ``<=``/``>=``
    and ``<``/``>`` give different p-values; the documented rule counts them on both sides."""
    a = [1, 1, 0, 0, 1, 0, 1, 0, 0, 0]
    b = [1, 0, 0, 0, 1, 0, 0, 0, 0, 0]
    test = paired_bootstrap(a, b, n_resamples=3000, seed=7)
    diffs = _resampled_means(np.subtract(a, b), 3000, 7)
    zeros = float(np.mean(diffs == 0))
    assert zeros > 0.05  # the case exercises the tie rule
    strict = min(1.0, 2 * min(float(np.mean(diffs < 0)), float(np.mean(diffs > 0))))
    inclusive = min(1.0, 2 * min(float(np.mean(diffs <= 0)), float(np.mean(diffs >= 0))))
    assert strict != inclusive
    assert test.p_value == inclusive


def _kappa_reference(table) -> float:
    """Cohen's kappa from a confusion table with numpy: (n * trace - sum(row * col)) / (n^2 - sum(row * col))."""
    t = np.asarray(table, dtype=np.float64)
    n = t.sum()
    chance = float(t.sum(axis=1) @ t.sum(axis=0))
    return (n * np.trace(t) - chance) / (n * n - chance)


def _labelings(table, labels):
    a, b = [], []
    for i, row in enumerate(table):
        for j, count in enumerate(row):
            a += [labels[i]] * count
            b += [labels[j]] * count
    return a, b


@pytest.mark.parametrize(
    "table",
    [
        [[30, 40], [10, 20]],  # marginals (0.7, 0.3) vs (0.4, 0.6): p_e = 0.46, kappa = 0.04 / 0.54
        [[5, 1, 0], [7, 2, 3], [0, 4, 9]],  # three labels, every marginal different
        [[1, 9], [0, 0]],  # a never says "c": p_e = 0.1
    ],
)
def test_cohen_kappa_equals_the_confusion_table_formula_on_asymmetric_tables(table):
    a, b = _labelings(table, ["r", "c", "n"])
    assert cohen_kappa(a, b) == pytest.approx(_kappa_reference(table), rel=1e-12, abs=1e-15)
    # the wrong chance terms give other numbers on these tables, so the test tells them apart
    t = np.asarray(table, dtype=np.float64)
    n = t.sum()
    p_o = np.trace(t) / n
    for wrong_pe in (
        float((t.sum(axis=1) / n) @ (t.sum(axis=1) / n)),
        float((t.sum(axis=0) / n) @ (t.sum(axis=0) / n)),
    ):
        assert cohen_kappa(a, b) != pytest.approx((p_o - wrong_pe) / (1 - wrong_pe), rel=1e-6)


def test_cohen_kappa_hand_value_of_an_asymmetric_table():
    a, b = _labelings([[30, 40], [10, 20]], ["r", "c"])
    assert cohen_kappa(a, b) == pytest.approx((0.5 - 0.46) / (1 - 0.46), rel=1e-12)
