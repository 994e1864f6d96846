"""Seed-level intervals: a hierarchical bootstrap over seeds, then items (prompts or task rows) within each seed.

The per-run intervals (`peft_safety.evaluation.stats`: percentile bootstrap, exact McNemar, paired bootstrap) treat
one run's prompts as the only source of variation; across fine-tuning seeds an arm moves more than that. Here each
replicate draws ``S`` seeds with replacement out of the ``S`` run, then, for every drawn seed, ``n`` items with
replacement out of its ``n``; the statistic is the mean over the drawn seeds of the per-seed item means (every seed
weighs the same). Paired statistics reuse the *same* seed and item draws for every array, so an arm and plain LoRA
of the same seed, on the same prompts, stay paired. With one seed it is the ordinary (paired) item bootstrap.

`linear_interval` computes the interval of any linear combination ``sum_k w_k * mean(X_k)`` of paired arrays, which
covers what the leaderboard needs: a rate, a change versus plain LoRA, the drop versus the aligned model, and the
criterion's task margin ``gain(arm) - 0.9 * gain(LoRA)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from peft_safety.evaluation.stats import Interval


def _as_array(values: Sequence[Sequence[float]], what: str) -> torch.Tensor:
    rows = [list(map(float, v)) for v in values]
    if not rows or not rows[0]:
        raise ValueError(f"{what}: need at least one seed with at least one item.")
    if len({len(r) for r in rows}) != 1:
        raise ValueError(f"{what}: every seed needs the same items, got lengths {[len(r) for r in rows]}.")
    return torch.tensor(rows, dtype=torch.float64)


def hierarchical_draws(n_seeds: int, n_items: int, n_resamples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seed draws ``(R, S)`` and item draws ``(R, S, n)``, from one seeded generator (seeds first, then items)."""
    gen = torch.Generator().manual_seed(int(seed))
    seeds = torch.randint(0, n_seeds, (n_resamples, n_seeds), generator=gen)
    items = torch.randint(0, n_items, (n_resamples, n_seeds, n_items), generator=gen)
    return seeds, items


def _percentile(sorted_values: torch.Tensor, q: float) -> float:
    import math

    k = max(0, min(sorted_values.numel() - 1, math.ceil(q * sorted_values.numel()) - 1))
    return float(sorted_values[k])


def linear_interval(
    arrays: Sequence[Sequence[Sequence[float]]],
    weights: Sequence[float],
    *,
    confidence: float = 0.95,
    n_resamples: int = 10_000,
    seed: int = 0,
) -> Interval:
    """Hierarchical-bootstrap interval of ``sum_k weights[k] * mean(arrays[k])``.

    Args:
        arrays: each ``[seed][item]`` (same seeds and items for every array: paired); an array with a single row
            (the aligned model) is repeated for every seed.
        weights: one weight per array.
        confidence: nominal coverage.
        n_resamples: bootstrap replicates.
        seed: seed of the draws.

    Returns:
        An `Interval` whose estimate is the statistic on the data (mean over seeds of per-seed item means).
    """
    if len(arrays) != len(weights):
        raise ValueError(f"{len(arrays)} arrays but {len(weights)} weights.")
    ts = [_as_array(a, f"arrays[{k}]") for k, a in enumerate(arrays)]
    n_seeds = max(t.shape[0] for t in ts)
    n_items = ts[0].shape[1]
    for k, t in enumerate(ts):
        if t.shape[1] != n_items:
            raise ValueError(f"arrays[{k}] has {t.shape[1]} items per seed, arrays[0] {n_items}: not paired.")
        if t.shape[0] not in (1, n_seeds):
            raise ValueError(f"arrays[{k}] has {t.shape[0]} seeds; expected 1 or {n_seeds}.")
    ts = [t.expand(n_seeds, n_items) for t in ts]
    combo = sum(w * t for w, t in zip(weights, ts))  # (S, n): the statistic is linear, so combine first
    estimate = float(combo.mean(dim=1).mean())
    seeds, items = hierarchical_draws(n_seeds, n_items, n_resamples, seed)
    stats = torch.empty(n_resamples, dtype=torch.float64)
    chunk = max(1, 4_000_000 // max(1, n_seeds * n_items))
    for s in range(0, n_resamples, chunk):
        e = min(n_resamples, s + chunk)
        rows = combo[seeds[s:e]]  # (r, S, n): the drawn seeds
        picked = torch.gather(rows, 2, items[s:e])  # the drawn items of each drawn seed
        stats[s:e] = picked.mean(dim=2).mean(dim=1)
    ordered = torch.sort(stats).values
    alpha = (1.0 - confidence) / 2.0
    return Interval(estimate, _percentile(ordered, alpha), _percentile(ordered, 1.0 - alpha), confidence,
                    n_seeds * n_items, "hierarchical_bootstrap")  # fmt: skip
