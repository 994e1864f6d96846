"""Sharded scoring and selection, 2 processes (gloo, CPU): the mask of a sharded run equals, index for index, the mask
of the same scoring run in one process.

The ranks shard `sharded_model` (an odd MLP width, so FSDP2 row shards are uneven and ZeRO-3 partitions split rows)
with FSDP2 ``fully_shard`` (one tensor sharded along its columns: a box that is not one range of flat indices), with
accelerate's FSDP2 preparation, or with DeepSpeed ZeRO-3 (when deepspeed is installed), score it with snip (exact
per-sample), snip abs-of-sum, esi and wanda, and select globally (largest and smallest), per tensor and per row. The
reference is the same `score` + `select` on the unsharded model in this process. Every mask is compared entry for
entry, with its fingerprints and provenance; the streamed mask files (`select_and_save`) are compared with the
reference mask's file (header entries and data bytes); the gathered scores (`Scores.save_pretrained` of sharded
scores) with the reference scores: bit for bit for snip's exact per-sample mode, within fp32 summation-order rounding
for the data-parallel modes.
"""

from __future__ import annotations

import importlib.util
import json
import struct

import pytest
import torch
from _ddp_worker import (
    COLUMN_SHARDED,
    SHARDED_RUNS,
    SHARDED_SELECTIONS,
    SHARDED_TARGETS,
    launch,
    score_calibration,
    sharded_model,
    sharded_selection_kwargs,
)

from peft_safety.mask import SafetyMask
from peft_safety.scoring import score
from peft_safety.scoring.scores import Scores
from peft_safety.scoring.selection import select

pytest.importorskip("torch.distributed.fsdp")

WORLD = 2


def _file_parts(data: bytes) -> tuple[dict, bytes]:
    """(parsed safetensors header, data bytes): the file's content without the header's key order (the safetensors
    library writes metadata keys in hash order)."""
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


@pytest.fixture(scope="module")
def reference():
    """{run label: Scores} of the unsharded model in this process."""
    model, calib = sharded_model(), score_calibration()
    return {
        label: score(model, calib, method, target_modules=SHARDED_TARGETS, progress=False, **kwargs)
        for label, method, kwargs in SHARDED_RUNS
    }


def _threshold_gap(scores: Scores, k: int, largest: bool) -> float:
    """Relative gap between the k-th and (k+1)-th best score: how far a rounding difference must move a score to
    change the selection."""
    flat = torch.cat([scores[n].reshape(-1) for n in scores.names]).double()
    values = flat.sort(descending=largest).values
    a, b = values[k - 1], values[k]
    return float((a - b).abs() / max(a.abs(), b.abs(), torch.tensor(1e-30, dtype=torch.float64)))


def check_sharded_run(
    out, reference: dict[str, Scores], *, column_sharded: bool, flat_partitions: bool, exact_snip: bool = True
) -> None:
    facts = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    assert all(f["world_size"] == WORLD for f in facts)
    assert all("cannot score a sharded model" in f["refused"] and "'magnitude'" in f["refused"] for f in facts)
    for label, _, _ in SHARDED_RUNS:
        ref = reference[label]
        runs = [f["runs"][label] for f in facts]
        # each rank held a shard only: together exactly the whole, neither rank everything
        assert all(r["sharded"] for r in runs)
        assert sum(r["local_numel"] for r in runs) == ref.numel() == runs[0]["numel"]
        assert all(r["local_numel"] < ref.numel() for r in runs)
        if flat_partitions:
            assert all(len(s["grid"]) == 1 for s in runs[0]["shards"].values())
        if column_sharded:
            assert runs[1]["shards"][COLUMN_SHARDED]["offsets"] == [0, 16]
            assert all("needs whole rows on each rank" in r["per_row_error"] for r in runs)
        # the collective histogram counts every entry once
        want_hist = sum(
            torch.histc(ref[n].reshape(-1), bins=16, min=0.0, max=1.0).round().long() for n in ref.names
        )
        assert all(torch.equal(r["histogram"], want_hist) for r in runs), label
        # the sharded weights' fingerprints are the full weights' fingerprints
        assert all(r["fingerprints"] == ref.fingerprints for r in runs) and ref.fingerprints

        gathered = Scores.from_pretrained(out / f"{label}_scores")
        assert gathered.names == ref.names and gathered.provenance == ref.provenance
        for n in ref.names:
            if label == "snip" and exact_snip:  # every rank ran every sample, only its owner with weight 1
                assert torch.equal(gathered[n], ref[n]), (label, n)
            else:  # the ranks summed different batches: fp32 summation order differs
                scale = float(ref[n].abs().max())
                torch.testing.assert_close(gathered[n], ref[n], rtol=1e-5, atol=1e-6 * scale, msg=f"{label} {n}")

        for sel, _ in SHARDED_SELECTIONS:
            kwargs = sharded_selection_kwargs(sel)
            source = ref.restrict([n for n in ref.names if n != COLUMN_SHARDED]) if sel == "per_row" else ref
            want = select(source, **kwargs)
            if kwargs["scope"] == "global" and not (label == "snip" and exact_snip):
                # the precondition of comparing with a rounding-different run: no near-tie at the threshold
                assert _threshold_gap(ref, len(want), kwargs.get("largest", True)) > 1e-4, (label, sel)
            got = SafetyMask.from_pretrained(out / f"{label}_{sel}")
            assert got == want, (label, sel)
            assert got.fingerprints == want.fingerprints and got.provenance == want.provenance, (label, sel)
            streamed = (out / f"{label}_{sel}_stream" / "safety_mask.safetensors").read_bytes()
            assert _file_parts(streamed) == _file_parts(want.to_bytes()), (label, sel)
            assert len(want) > 0


@pytest.mark.multiprocess
def test_fsdp2_sharded_masks_equal_single_process_masks(tmp_path, reference):
    launch("fsdp2_score", tmp_path, world=WORLD, timeout=400)
    check_sharded_run(tmp_path, reference, column_sharded=True, flat_partitions=False)


@pytest.mark.multiprocess
def test_accelerate_fsdp2_sharded_masks_equal_single_process_masks(tmp_path, reference):
    """The model sharded by accelerate's own FSDP2 preparation (``fsdp2_prepare_model``, what ``accelerator.prepare``
    runs under an FSDP2 config on GPUs; on CPU accelerate does not apply its FSDP plugin, so it is called directly)."""
    launch("fsdp2_score", tmp_path, world=WORLD, timeout=400, args=("accelerate",))
    check_sharded_run(tmp_path, reference, column_sharded=False, flat_partitions=False)


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
