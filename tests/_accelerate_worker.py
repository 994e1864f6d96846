"""One rank of ``accelerate launch --config_file examples/accelerate/<cfg>.yaml tests/_accelerate_worker.py OUT MODE
[DEVICE]``: trains a tiny Llama with `SafetySFTTrainer` and writes this rank's full (gathered) parameters to
``OUT/rank<r>.pt``. ``python tests/_accelerate_worker.py --verify OUT MODE`` then checks the guarantee on every rank's
file and prints one line (used by tests/test_accelerate_launch.py and benchmarks/gpu_check.sh).

MODE: ``freeze`` (SPA, full fine-tuning: the mask's entries must stay), ``train_only`` (SET adapter, merged at the end:
only the mask's entries may move), ``train_only_full`` (train_only in the full weights, through the Freezer).
DEVICE: ``cpu`` (default; ``use_cpu=True``, gloo) or ``gpu`` (bf16 where supported).
"""

from __future__ import annotations

import glob
import os
import sys

import torch


def mask_for(model):
    from peft_safety.mask import Neuron, SafetyMask, Weight, fingerprint_tensor

    q, v, down = ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.v_proj.weight",
                  "model.layers.0.mlp.down_proj.weight")  # fmt: skip
    p = dict(model.named_parameters())
    return SafetyMask(
        indices={q: [0, 3, 33, 100, 500, 1000], v: [1, 4], down: [2, 17]},
        shapes={n: tuple(p[n].shape) for n in (q, v, down)},
        granularity={q: Weight(), v: Neuron(axis=0), down: Neuron(axis=1)},
        fingerprints={n: fingerprint_tensor(p[n]) for n in (q, v, down)},
        provenance={"method": "test"},
    )


def _collect(model, merge: bool) -> dict[str, torch.Tensor]:
    if merge and hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    out = {}
    for name, p in model.named_parameters():
        t = p.detach()
        if hasattr(t, "full_tensor"):  # FSDP2: a DTensor shard; gather the whole tensor
            t = t.full_tensor()
        out[name] = t.float().cpu().clone()
    return out


def full_params(trainer, merge: bool) -> dict[str, torch.Tensor]:
    """Every parameter in full on this rank (DDP: as is; FSDP2: DTensor gathered; ZeRO-3: gathered partitions)."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if trainer.is_deepspeed_enabled and trainer.accelerator.state.deepspeed_plugin.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            return _collect(model, merge)
    return _collect(model, merge)


def main(out: str, mode: str, device: str = "cpu") -> None:
    from datasets import Dataset

    from peft_safety.testing import tiny_llama, tiny_tokenizer
    from peft_safety.training.config import SafetySFTConfig
    from peft_safety.training.trainer import SafetySFTTrainer

    torch.manual_seed(0)
    model = tiny_llama(seed=0)
    rows = [{"prompt": f"What is {i} plus {i}?", "completion": f" It is {2 * i}."} for i in range(16)]
    args = SafetySFTConfig(
        f"{out}/run", max_steps=3, per_device_train_batch_size=2, learning_rate=1e-2, weight_decay=0.1,
        max_grad_norm=0.5, max_length=48, activation_checkpointing=False, logging_steps=1, save_strategy="no",
        report_to="none", use_cpu=device == "cpu", seed=0,
        safety_mode="train_only" if mode.startswith("train_only") else mode,
        safety_train_only_full_weights=mode == "train_only_full",
    )  # fmt: skip
    trainer = SafetySFTTrainer(model, args=args, train_dataset=Dataset.from_list(rows),
                               processing_class=tiny_tokenizer(), safety_mask=mask_for(model))  # fmt: skip
    trainer.train()  # raises FreezeViolationError if the trainer's own end-of-training check fails
    state = trainer.accelerator.state
    torch.save(
        {"rank": state.process_index, "world_size": state.num_processes, "distributed_type": str(state.distributed_type),
         "mechanism": "+".join(c.name for c in trainer.protections), "params": full_params(trainer, merge=mode == "train_only")},
        f"{out}/rank{state.process_index}.pt",
    )  # fmt: skip


def check(results: list[dict], mode: str) -> tuple[int, int]:
    """Raise AssertionError unless every rank agrees and the guarantee holds against the weights before training;
    returns (entries that had to stay and did, entries that had to move and did)."""
    from peft_safety.testing import tiny_llama

    before = {n: p.detach() for n, p in tiny_llama(seed=0).named_parameters()}
    mask = mask_for(tiny_llama(seed=0))
    kept_total = moved_total = 0
    for r in results:
        params = r["params"]
        assert set(params) == set(before), sorted(set(params) ^ set(before))[:5]
        for name, now in params.items():
            assert torch.equal(now, results[0]["params"][name]), f"{name}: ranks disagree"
            old = before[name]
            if name in mask.shapes:
                inside = mask.to_dense(name)
                kept, moved = (inside, ~inside) if mode == "freeze" else (~inside, inside)
                assert torch.equal(now[kept], old[kept]), f"rank {r['rank']} {name}: entries that must stay moved"
                assert not torch.equal(now[moved], old[moved]), f"rank {r['rank']} {name}: trainable entries stayed"
                kept_total += int(kept.sum())
                moved_total += int((now[moved] != old[moved]).sum())
            elif mode == "freeze":
                assert not torch.equal(now, old), f"{name} did not train"
            else:
                assert torch.equal(now, old), f"{name}: outside the mask, yet changed in train_only mode"
    return kept_total, moved_total


def verify(out: str, mode: str) -> int:
    files = sorted(glob.glob(os.path.join(out, "rank*.pt")))
    if not files:
        print(f"FAIL  no rank files in {out}")
        return 1
    results = [torch.load(f) for f in files]
    try:
        kept, moved = check(results, "train_only" if mode.startswith("train_only") else mode)
    except AssertionError as err:
        print(f"FAIL  {results[0]['distributed_type']} x{len(results)}: {err}")
        return 1
    print(f"ok    {results[0]['distributed_type']} x{len(results)} ({results[0]['mechanism']}): {kept} entries kept "
          f"bit-identical, {moved} moved, ranks identical")  # fmt: skip
    return 0


if __name__ == "__main__":
    if sys.argv[1] == "--verify":
        sys.exit(verify(sys.argv[2], sys.argv[3]))
    main(*sys.argv[1:4])
