"""Sharded scoring and selection, 2 processes (gloo, CPU): the mask of a sharded run equals, index for index, the mask
of the same scoring run in one process.

The ranks shard `sharded_model` (an odd MLP width, so FSDP2 row shards are uneven and ZeRO-3 partitions split rows)
with FSDP2 ``fully_shard`` (one tensor sharded along its columns: a box that is not one range of flat indices), with
accelerate's FSDP2 preparation, or with DeepSpeed ZeRO-3 (when deepspeed is installed), score it with snip (exact
per-sample), snip abs-of-sum, esi and wanda, and select globally (largest and smallest), per tensor and per row. The
reference is the same `score` + `select` on the unsharded model in this process. The accelerate and ZeRO-3 variants
are marked slow (run them with ``-m slow``); the ZeRO-3 one needs ``pip install deepspeed``. Every mask is compared entry for
entry, with its fingerprints and provenance; the streamed mask files (`select_and_save`) are compared with the
reference mask's file (header entries and data bytes); the gathered scores (`Scores.save_pretrained` of sharded
scores) with the reference scores: bit for bit for snip's exact per-sample mode, within fp32 summation-order rounding
for the data-parallel modes.
"""

from __future__ import annotations

import importlib.util

import pytest
from _ddp_worker import (
    SHARDED_RUNS,
    SHARDED_SELECTIONS,
    launch,
    sharded_reference,
    sharded_selection_kwargs,
    verify_sharded_run,
)

pytest.importorskip("torch.distributed.fsdp")

WORLD = 2


@pytest.fixture(scope="module")
def reference():
    """{run label: Scores} of the unsharded model in this process."""
    return sharded_reference()


def check_sharded_run(out, reference, **kwargs) -> None:
    verify_sharded_run(out, reference, world=WORLD, **kwargs)


@pytest.mark.multiprocess
def test_fsdp2_sharded_masks_equal_single_process_masks(tmp_path, reference):
    launch("fsdp2_score", tmp_path, world=WORLD, timeout=400)
    check_sharded_run(tmp_path, reference, column_sharded=True, flat_partitions=False)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_accelerate_fsdp2_sharded_masks_equal_single_process_masks(tmp_path, reference):
    """The model sharded by accelerate's own FSDP2 preparation (``fsdp2_prepare_model``, what ``accelerator.prepare``
    runs under an FSDP2 config on GPUs; on CPU accelerate does not apply its FSDP plugin, so it is called directly)."""
    launch("fsdp2_score", tmp_path, world=WORLD, timeout=400, args=("accelerate",))
    check_sharded_run(tmp_path, reference, column_sharded=False, flat_partitions=False)


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed (pip install deepspeed)")
def test_zero3_sharded_masks_equal_single_process_masks(tmp_path, reference):
    """DeepSpeed ZeRO-3 on CPU (its CPU accelerator, gloo). Its linear layers run DeepSpeed's own autograd function,
    whose fp32 gradients differ from PyTorch's in the last bits, so even snip's per-sample mode matches within
    rounding only; the masks are still identical."""
    launch("zero3_score", tmp_path, world=WORLD, timeout=500, env={"DS_ACCELERATOR": "cpu"})
    check_sharded_run(tmp_path, reference, column_sharded=False, flat_partitions=True, exact_snip=False)


def test_run_modes_cover_every_scope_and_supported_scorer():
    """The sharded runs exercise every scope and every scorer that declares sharding support."""
    from peft_safety.scoring.registry import SCORERS

    scopes = {sharded_selection_kwargs(label)["scope"] for label, _ in SHARDED_SELECTIONS}
    assert scopes == {"global", "per_tensor", "per_row"}
    supporting = {name for name in SCORERS.names() if getattr(SCORERS.get(name), "supports_sharding", False)}
    assert supporting == {method for _, method, _ in SHARDED_RUNS} == {"snip", "esi", "wanda"}
