"""Post-hoc realignment against a naive reference: the restored set == the top-k drifted units by an explicit loop."""

from __future__ import annotations

import copy

import pytest
import torch

from peft_safety.mask import Neuron, SafetyMask
from peft_safety.testing import tiny_llama, tiny_tokenizer
from peft_safety.training.realign import RealignCallback, realign_, reference_snapshot

Q0 = "model.layers.0.self_attn.q_proj.weight"
V1 = "model.layers.1.self_attn.v_proj.weight"
DOWN0 = "model.layers.0.mlp.down_proj.weight"


def _pair(seed: int = 0):
    aligned = tiny_llama(seed=seed)
    tuned = copy.deepcopy(aligned)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return aligned, tuned


def _weight_mask(model, seed: int = 0) -> SafetyMask:
    gen = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    indices = {n: torch.randperm(params[n].numel(), generator=gen)[:40].sort().values for n in (Q0, V1, DOWN0)}
    return SafetyMask(indices, {n: tuple(params[n].shape) for n in (Q0, V1, DOWN0)})


def _naive_entries(tuned, aligned, mask, k):
    """Explicit loop: (drift, parameter order, flat index) sorted, first k."""
    t, a = dict(tuned.named_parameters()), dict(aligned.named_parameters())
    items = []
    for order, name in enumerate(mask.names):
        for i in mask[name].tolist():
            d = abs(float(t[name].detach().reshape(-1)[i]) - float(a[name].detach().reshape(-1)[i]))
            items.append((-d, order, i, name))
    items.sort()
    return {(name, i) for _, _, i, name in items[:k]}


@pytest.mark.parametrize("k", [0, 1, 17, 60, 120])
def test_entry_realign_restores_exactly_the_top_k_drifted_entries(k):
    aligned, tuned = _pair()
    mask = _weight_mask(aligned)
    before = {n: p.detach().clone() for n, p in tuned.named_parameters()}
    expected = _naive_entries(tuned, aligned, mask, k)
    report = realign_(tuned, aligned, mask, k=k)
    assert report.units_total == 120 and report.units_restored == k and report.entries_written == k
    ref = dict(aligned.named_parameters())
    for name, p in tuned.named_parameters():
        flat, old = p.detach().reshape(-1), before[name].reshape(-1)
        changed = {(name, i) for i in torch.nonzero(flat != old).flatten().tolist()}
        assert changed == {e for e in expected if e[0] == name}, name
        for _, i in changed:
            assert flat[i] == ref[name].detach().reshape(-1)[i]  # set to the reference's exact value
    assert report.drift_after <= report.drift_before


def test_fraction_counts_units_and_full_rewind():
    aligned, tuned = _pair(1)
    mask = _weight_mask(aligned, 1)
    assert realign_(copy.deepcopy(tuned), aligned, mask, fraction=0.25).units_restored == 30
    report = realign_(tuned, aligned, mask, fraction=1.0)
    assert report.drift_after == 0.0
    t, a = dict(tuned.named_parameters()), dict(aligned.named_parameters())
    for name, idx in mask:
        assert torch.equal(t[name].detach().reshape(-1)[idx.long()], a[name].detach().reshape(-1)[idx.long()])


def test_neuron_realign_matches_a_per_row_loop():
    aligned, tuned = _pair(2)
    params = dict(aligned.named_parameters())
    # a weight mask (rows of q_proj) and a column-neuron mask (down_proj inputs)
    weight = _weight_mask(aligned, 2).restrict([Q0])
    neuron = SafetyMask({DOWN0: [1, 5, 9, 30]}, {DOWN0: tuple(params[DOWN0].shape)}, granularity=Neuron(axis=1))
    t, a = dict(tuned.named_parameters()), dict(aligned.named_parameters())
    # naive: per (parameter, neuron), L2 norm of the drift over its masked entries
    units = []
    cols_q = params[Q0].shape[1]
    rows = {}
    for i in weight[Q0].tolist():
        rows.setdefault(i // cols_q, []).append(i)
    down_cols = {c: [r * params[DOWN0].shape[1] + c for r in range(params[DOWN0].shape[0])] for c in [1, 5, 9, 30]}
    for order, (name, groups) in enumerate([(Q0, rows), (DOWN0, down_cols)]):
        for unit, flat in sorted(groups.items()):
            d = (t[name].detach().reshape(-1)[flat] - a[name].detach().reshape(-1)[flat]).float().norm().item()
            units.append((-d, order, unit, name, flat))
    units.sort()
    k = 5
    expected = {(name, i) for _, _, _, name, flat in units[:k] for i in flat}
    before = {n: p.detach().clone() for n, p in tuned.named_parameters()}
    # the two masks combined: consensus order is Q0 then DOWN0 (model order)
    shapes = {Q0: tuple(params[Q0].shape), DOWN0: tuple(params[DOWN0].shape)}
    both = SafetyMask({Q0: weight[Q0], DOWN0: neuron[DOWN0]}, shapes, granularity={Q0: weight.granularity_of(Q0),
                      DOWN0: Neuron(axis=1)})  # fmt: skip
    report = realign_(tuned, aligned, both, k=k, by="neuron")
    assert report.units_total == len(units) and report.units_restored == k
    for name, p in tuned.named_parameters():
        changed = {
            (name, i) for i in torch.nonzero(p.detach().reshape(-1) != before[name].reshape(-1)).flatten().tolist()
        }
        assert changed == {e for e in expected if e[0] == name}, name


def test_reference_snapshot_and_state_dict_reference():
    aligned, tuned = _pair(3)
    mask = _weight_mask(aligned, 3)
    snap = reference_snapshot(aligned, mask)
    assert set(snap) == set(mask.names)
    a, b = copy.deepcopy(tuned), copy.deepcopy(tuned)
    realign_(a, snap, mask, k=10)
    realign_(b, aligned.state_dict(), mask, k=10)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_lora_model_needs_merge_and_realigns_the_merged_weights():
    from peft import LoraConfig, get_peft_model

    aligned, _ = _pair(4)
    mask = _weight_mask(aligned, 4)
    model = get_peft_model(copy.deepcopy(aligned), LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                                             init_lora_weights=False))  # fmt: skip
    with pytest.raises(ValueError, match="merge_lora=True"):
        realign_(model, aligned, mask, k=5)
    # reference for the expectation: merge a copy explicitly, then the naive top-k on the merged weights
    merged = copy.deepcopy(model).merge_and_unload()
    expected = _naive_entries(merged, aligned, mask, 25)
    report = realign_(model, aligned, mask, k=25, merge_lora=True)
    assert report.merged_lora
    final = model.merge_and_unload()  # already merged: unload only
    ref, m = dict(aligned.named_parameters()), dict(merged.named_parameters())
    for name, p in final.named_parameters():
        diff = {
            (name, i) for i in torch.nonzero(p.detach().reshape(-1) != m[name].detach().reshape(-1)).flatten().tolist()
        }
        assert diff == {e for e in expected if e[0] == name}, name
        for _, i in diff:
            assert p.detach().reshape(-1)[i] == ref[name].detach().reshape(-1)[i]


def test_errors():
    aligned, tuned = _pair(5)
    mask = _weight_mask(aligned, 5)
    with pytest.raises(ValueError, match="exactly one of fraction"):
        realign_(tuned, aligned, mask)
    with pytest.raises(ValueError, match=r"by='row' is not valid\. Available: 'entry', 'neuron'"):
        realign_(tuned, aligned, mask, k=1, by="row")
    with pytest.raises(ValueError, match="exceeds the 120 units"):
        realign_(tuned, aligned, mask, k=121)
    with pytest.raises(ValueError, match="reference has no parameter"):
        realign_(tuned, {}, mask, k=1)
    with pytest.raises(TypeError, match="reference must be"):
        realign_(tuned, 3, mask, k=1)


def test_callback_realigns_at_the_end_of_training(tmp_path):
    pytest.importorskip("trl")
    from datasets import Dataset

    from peft_safety.training.config import SafetySFTConfig
    from peft_safety.training.trainer import SafetySFTTrainer

    model = tiny_llama(seed=0)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    mask = _weight_mask(model, 6)
    callback = RealignCallback(mask, fraction=0.5)
    rows = [{"prompt": f"Question {i}?", "completion": f" Answer {i}."} for i in range(8)]
    args = SafetySFTConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                           max_length=32, report_to=[], use_cpu=True, save_strategy="no", bf16=False)  # fmt: skip
    trainer = SafetySFTTrainer(model, args=args, train_dataset=Dataset.from_list(rows),
                               processing_class=tiny_tokenizer(), callbacks=[callback])  # fmt: skip
    trainer.train()
    assert len(callback.reports) == 1 and callback.reports[0].units_restored == 60
    params = dict(trainer.model.named_parameters())
    restored = sum(
        int((params[n].detach().reshape(-1)[idx.long()] == initial[n].reshape(-1)[idx.long()]).sum())
        for n, idx in mask
    )
    assert restored == 60  # the other masked entries moved (training changes every entry with lr 1e-2)
    unmasked_moved = any(not torch.equal(params[n].detach(), initial[n]) for n in params if n not in mask.names)
    assert unmasked_moved


def test_callback_every_n_steps_refuses_lora():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(seed=0), LoraConfig(r=2, target_modules=["q_proj"]))
    mask = _weight_mask(tiny_llama(seed=0), 7)
    cb = RealignCallback(mask, fraction=0.1, every_n_steps=2)
    with pytest.raises(ValueError, match="cannot realign a LoRA model during training"):
        cb.on_train_begin(None, None, None, model=model)
