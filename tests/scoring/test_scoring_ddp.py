"""2-process data-parallel scoring (gloo, CPU): each rank scores its share, the all-reduce gives the full-data scores.

The ranks are started with torch.distributed env vars only; the scorers find the group through accelerate's
``PartialState`` (the path `accelerate launch` / `torchrun` users take) and split the calibration batches round-robin.
"""

from __future__ import annotations

import pytest
import torch
from _ddp_worker import SCORE_RUNS, launch, run_scorers, score_calibration

from peft_safety.testing import tiny_llama


@pytest.mark.multiprocess
def test_two_process_scores_equal_single_process_scores(tmp_path):
    world = 2
    launch("score", tmp_path, world=world)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    assert all(r["world_size"] == world for r in results)

    calib = score_calibration()
    model = tiny_llama(seed=0)
    forwards = []
    handle = model.register_forward_pre_hook(lambda *_: forwards.append(1))
    try:
        reference = run_scorers(model, calib)
    finally:
        handle.remove()

    # disjoint shares: the ranks' forward passes add up to the single-process count and neither rank ran them all
    # (snip sum_of_abs: 7 one-row passes; abs_of_sum and esi: 4 two-row batches each)
    per_rank = [r["forwards"] for r in results]
    assert sum(per_rank) == len(forwards) == len(calib) + 2 * 4
    assert per_rank == [4 + 2 + 2, 3 + 2 + 2]

    for label, _, _ in SCORE_RUNS:
        for r in results:
            got = r["scores"][label]
            assert set(got) == set(reference[label]), label
            for name, want in reference[label].items():
                assert got[name].dtype == torch.float32
                # summation order differs (rank partial sums, then the all-reduce): equal up to fp32 rounding
                torch.testing.assert_close(got[name], want, rtol=1e-5, atol=1e-10, msg=f"{label} {name}")
        # every rank holds the same all-reduced scores, bit for bit
        for name in reference[label]:
            assert torch.equal(results[0]["scores"][label][name], results[1]["scores"][label][name]), (label, name)
    # the scores are not trivially equal: a rank's half alone differs from the whole
    assert any(bool(v.abs().sum() > 0) for v in reference["snip"].values())
