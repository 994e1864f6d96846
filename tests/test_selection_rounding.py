"""Selection's fraction rule, ``k = floor(fraction * n + 1/2)`` (round half up), pinned on the cases where it differs
from Python's ``round`` (half to even) and from ``floor``/``ceil``, against exact rational arithmetic, and end to end
through `select`."""

from __future__ import annotations

import math
from decimal import ROUND_HALF_UP, Decimal
from fractions import Fraction

import pytest
import torch

from peft_safety.scoring.scores import Scores
from peft_safety.scoring.selection import count_for_fraction, select


def _half_up(fraction: float, n: int) -> int:
    """The rule on the decimal the caller wrote, with `decimal`'s ROUND_HALF_UP (no float rounding of the product)."""
    exact = (Decimal(repr(fraction)) * n).quantize(Decimal(1), rounding=ROUND_HALF_UP)
    return min(n, int(exact))


# (fraction, n): exact halves where half-up and half-even disagree (2.5 -> 3 vs 2, 0.5 -> 1 vs 0, ...), and a
# product just below a whole number where floor disagrees (0.29 * 100 == 28.999999999999996)
DISAGREE = [(0.5, 5), (0.25, 2), (0.5, 1), (0.125, 20), (0.375, 12), (0.0625, 40), (0.5, 9)]


@pytest.mark.parametrize(("fraction", "n"), DISAGREE)
def test_exact_halves_round_up_where_half_even_would_not(fraction, n):
    product = Fraction(fraction) * n
    assert product.denominator == 2 and product.numerator // 2 % 2 == 0  # an exact half with an even floor
    assert round(fraction * n) != _half_up(fraction, n)  # the case tells the two rules apart
    assert count_for_fraction(fraction, n) == _half_up(fraction, n) == math.floor(product) + 1


def test_a_product_just_below_a_whole_number_is_not_floored():
    assert 0.29 * 100 < 29 and math.floor(0.29 * 100) == 28
    assert count_for_fraction(0.29, 100) == _half_up(0.29, 100) == 29


@pytest.mark.parametrize(("fraction", "n", "k"), [(0.58, 25, 15), (0.7, 45, 32), (0.145, 100, 15), (0.35, 90, 32)])
def test_a_decimal_half_whose_float_product_falls_below_rounds_up(fraction, n, k):
    """``0.58 * 25`` is 14.5; the float product is 14.499999999999998, which ``floor(x + 0.5)`` would take to 14."""
    assert math.floor(fraction * n + 0.5) == k - 1  # the float rule gets these wrong
    assert count_for_fraction(fraction, n) == _half_up(fraction, n) == k


@pytest.mark.parametrize("n", [1, 2, 3, 7, 10, 99, 250, 1001])
def test_the_count_equals_the_exact_rule_on_a_grid(n):
    for i in range(1, 101):
        fraction = i / 100
        assert count_for_fraction(fraction, n) == _half_up(fraction, n), (fraction, n)
    counts = [count_for_fraction(i / 100, n) for i in range(1, 101)]
    assert counts == sorted(counts)  # monotone in the fraction


@pytest.mark.parametrize(("fraction", "n"), DISAGREE)
@pytest.mark.parametrize("scope", ["global", "per_tensor"])
def test_select_selects_the_half_up_count(fraction, n, scope):
    scores = Scores({"w": torch.arange(n, dtype=torch.float32)})
    mask = select(scores, fraction=fraction, scope=scope)
    k = _half_up(fraction, n)
    assert mask["w"].tolist() == list(range(n - k, n))  # the k highest scores
