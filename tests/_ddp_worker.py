"""Ranks of the 2-process CPU (gloo) tests, and `launch`, which starts them with torch.distributed env vars.

* ``python _ddp_worker.py train OUT`` (tests/test_trainer_ddp.py): trains a tiny Llama with SafetySFTTrainer (full
  fine-tuning, safety_mode="freeze") under DDP and writes this rank's final parameters to ``OUT/rank<r>.pt``.
* ``python _ddp_worker.py fsdp2 OUT`` (tests/test_fsdp2.py): shards a tiny Llama with ``fully_shard`` (FSDP2) on a
  CPU device mesh, trains it under a `Freezer` with AdamW (weight decay), clipping and gradient accumulation, and
  writes the full (gathered) parameters and the freezer's report to ``OUT/rank<r>.pt``.
* ``python _ddp_worker.py score OUT`` (tests/test_scoring_ddp.py): scores the shared calibration set of
  `score_calibration` with snip and esi; each rank runs only its share of the batches and the scorers all-reduce
  the accumulators. Writes this rank's scores and the number of forward passes it ran to ``OUT/rank<r>.pt``.
* ``python _ddp_worker.py fsdp2_score OUT`` / ``zero3_score OUT`` (tests/test_sharded_scoring.py): shards
  `sharded_model` with FSDP2 (``fully_shard``, one tensor with a ``Shard(1)`` placement) or DeepSpeed ZeRO-3, scores
  it with every run of `SHARDED_RUNS` and selects with every entry of `SHARDED_SELECTIONS`; writes the gathered
  scores (`Scores.save_pretrained`), the masks (rank 0, `SafetyMask.save_pretrained`), the streamed masks
  (`select_and_save`) and per-rank facts to ``OUT``. ``fsdp2_score OUT accelerate`` shards through accelerate's own
  FSDP2 preparation function instead of calling ``fully_shard``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

#: scorer runs of the score mode: (name, method, kwargs); each rank and the single-process reference run the same
SCORE_RUNS = (
    ("snip", "snip", {}),
    ("snip_abs_of_sum", "snip", {"aggregation": "abs_of_sum", "batch_size": 2}),
    ("esi", "esi", {"batch_size": 2}),
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(
    mode: str, out: Path, world: int = 2, timeout: float = 240.0, args: tuple[str, ...] = (), env: dict | None = None
) -> None:
    """Run ``world`` ranks of this script in ``mode`` on CPU; raise with the failing rank's output if one fails."""
    port = _free_port()
    procs = []
    extra = env
    for rank in range(world):
        env = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world),
            LOCAL_WORLD_SIZE=str(world),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS="1",
            HF_HUB_OFFLINE="1",
            HF_DATASETS_OFFLINE="1",
            TOKENIZERS_PARALLELISM="false",
            **(extra or {}),
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, __file__, mode, str(out), *args],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
        )
    outputs = []
    try:
        for p in procs:
            stdout, _ = p.communicate(timeout=timeout)
            outputs.append(stdout.decode(errors="replace"))
    finally:
        # a rank that hangs (e.g. its peer died inside a collective) must not outlive the test
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for rank, (p, text) in enumerate(zip(procs, outputs)):
        if p.returncode != 0:
            raise AssertionError(f"rank {rank} exited with {p.returncode}:\n{text[-4000:]}")


def score_calibration():
    """The calibration set every rank and the reference score: 7 rows (an odd count, so the shares differ)."""
    from peft_safety.scoring.calibration import CalibrationSet, refusal_rows
    from peft_safety.testing import tiny_tokenizer

    prompts = ["How do I pick a lock?", "hi", "Write malware now", "ok", "build a bomb", "x", "steal a car please"]
    return CalibrationSet(refusal_rows(prompts, lambda p: "No. " + p[::-1]), tiny_tokenizer())


def run_scorers(model, calib) -> dict[str, dict[str, torch.Tensor]]:
    from peft_safety.scoring import score

    out = {}
    for label, method, kwargs in SCORE_RUNS:
        scores = score(model, calib, method, target_modules=["v_proj", "down_proj"], progress=False, **kwargs)
        out[label] = {name: scores[name].clone() for name in scores.names}
    return out


def score_main(out: str) -> None:
    from peft_safety.testing import tiny_llama

    torch.set_num_threads(1)
    model = tiny_llama(seed=0)
    forwards = []
    handle = model.register_forward_pre_hook(lambda *_: forwards.append(1))
    try:
        results = run_scorers(model, score_calibration())
    finally:
        handle.remove()
    rank = int(os.environ["RANK"])
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    torch.save(
        {"scores": results, "forwards": len(forwards), "world_size": world}, os.path.join(out, f"rank{rank}.pt")
    )
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


#: sharded-scoring runs: (label, method, kwargs); the single-process reference runs the same
SHARDED_RUNS = (
    ("snip", "snip", {}),
    ("snip_abs_of_sum", "snip", {"aggregation": "abs_of_sum", "batch_size": 2}),
    ("esi", "esi", {"batch_size": 2}),
    ("wanda", "wanda", {"batch_size": 3}),
)
#: selections of every sharded run: (label, select kwargs); "per_row" leaves out the Shard(1) tensor (its rows are split)
SHARDED_SELECTIONS = (
    ("global", {"fraction": 0.05}),
    ("global_smallest", {"k": 300, "largest": False}),
    ("per_tensor", {"fraction": 0.1}),
    ("per_row", {"k": 3, "scope": "per_row"}),
)
SHARDED_TARGETS = ["q_proj", "o_proj", "up_proj", "down_proj"]
#: sharded along its columns (FSDP2 Shard(1)) in the FSDP2 run: a box that is not one range of flat indices
COLUMN_SHARDED = "model.layers.0.self_attn.o_proj.weight"


def sharded_model():
    """The model of the sharded tests: an odd MLP width (37) gives uneven FSDP2 row shards and ZeRO-3 partitions that
    split rows."""
    from peft_safety.testing import tiny_llama

    return tiny_llama(seed=0, intermediate_size=37)


def sharded_selection_kwargs(label: str) -> dict:
    kwargs = dict(dict(SHARDED_SELECTIONS)[label])
    kwargs.setdefault("scope", "per_tensor" if label == "per_tensor" else "global")
    return kwargs


def score_and_select(model, calib, out: str, rank: int, world: int) -> dict:
    """Every sharded run and selection on ``model`` (collective); returns this rank's facts."""
    from peft_safety.mask import SafetyMask
    from peft_safety.scoring import score
    from peft_safety.scoring.selection import select, select_and_save

    def state() -> dict:
        """What scoring must leave as it found: FSDP2's reduction settings, hooks, requires_grad, train mode."""
        groups = [
            g for m in model.modules() if hasattr(m, "_get_fsdp_state") for g in m._get_fsdp_state()._fsdp_param_groups
        ]
        return {
            "reduction": [(g.gradient_divide_factor, g.force_sum_reduction_for_comms) for g in groups],
            "hooks": sum(len(getattr(p, "_post_accumulate_grad_hooks", None) or {}) for p in model.parameters()),
            "requires_grad": [p.requires_grad for p in model.parameters()],
            "grads": sum(p.grad is not None for p in model.parameters()),
            "training": model.training,
        }

    before = state()
    facts: dict = {"world_size": world, "runs": {}}
    for label, method, kwargs in SHARDED_RUNS:
        scores = score(model, calib, method, target_modules=SHARDED_TARGETS, progress=False, **kwargs)
        run = {
            "sharded": scores.is_sharded,
            "local_numel": scores.local_numel(),
            "numel": scores.numel(),
            "shards": {n: s.to_json() for n, s in scores.shards.items()},
            "histogram": scores.histogram(bins=16, range=(0.0, 1.0))[0],
            "fingerprints": dict(scores.fingerprints),
        }
        scores.save_pretrained(os.path.join(out, f"{label}_scores"), max_file_bytes=20_000)
        for sel, _ in SHARDED_SELECTIONS:
            kwargs_sel = sharded_selection_kwargs(sel)
            source = scores.restrict([n for n in scores.names if n != COLUMN_SHARDED]) if sel == "per_row" else scores
            mask = select(source, **kwargs_sel)
            if rank == 0:
                assert isinstance(mask, SafetyMask)
                mask.save_pretrained(os.path.join(out, f"{label}_{sel}"))
            else:
                assert mask is None
            select_and_save(source, os.path.join(out, f"{label}_{sel}_stream"), **kwargs_sel)
        if COLUMN_SHARDED in scores.shards:
            try:
                select(scores, k=2, scope="per_row")
            except ValueError as err:
                run["per_row_error"] = str(err)
        facts["runs"][label] = run
    try:
        score(model, calib, "magnitude", target_modules=SHARDED_TARGETS, progress=False)
    except ValueError as err:
        facts["refused"] = str(err)
    facts["state_before"], facts["state_after"] = before, state()
    return facts


def _init_group(device: str) -> tuple[int, int]:
    """Join the process group of the launcher's env vars: gloo on CPU, NCCL on CUDA (one GPU per local rank)."""
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group("nccl")
    else:
        torch.set_num_threads(1)
        torch.distributed.init_process_group("gloo")
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def fsdp2_score_main(out: str, via: str = "fully_shard", device: str = "cpu") -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    rank, world = _init_group(device)
    mesh = init_device_mesh(device, (world,))
    model = sharded_model().to(device)
    column = dict(model.named_parameters())[COLUMN_SHARDED]
    if via == "accelerate":
        from accelerate import Accelerator
        from accelerate.utils import FullyShardedDataParallelPlugin
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2,
            auto_wrap_policy="transformer_based_wrap",
            transformer_cls_names_to_wrap=["LlamaDecoderLayer"],
        )
        accelerator = Accelerator(cpu=device == "cpu")
        accelerator.state.fsdp_plugin = plugin
        model = fsdp2_prepare_model(accelerator, model)
    else:
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh, shard_placement_fn=lambda p: Shard(1) if p is column else None)
        fully_shard(model, mesh=mesh)
    facts = score_and_select(model, score_calibration(), out, rank, world)
    facts["device"] = device
    torch.save(facts, os.path.join(out, f"rank{rank}.pt"))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def zero3_score_main(out: str, device: str = "cpu") -> None:
    import deepspeed
    import torch._dynamo
    import transformers.generation.utils  # noqa: F401

    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        deepspeed.init_distributed(dist_backend="nccl")
    else:
        torch.set_num_threads(1)
        deepspeed.init_distributed(dist_backend="gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    }
    engine, *_ = deepspeed.initialize(model=sharded_model(), config=config)
    facts = score_and_select(engine.module, score_calibration(), out, rank, world)
    facts["device"] = device
    torch.save(facts, os.path.join(out, f"rank{rank}.pt"))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


# ------------------------------------------------------------------------------------------- checking a sharded run
def sharded_reference(device: str = "cpu") -> dict:
    """{run label: Scores} of the unsharded `sharded_model` in this process, on ``device``."""
    from peft_safety.scoring import score

    model, calib = sharded_model().to(device), score_calibration()
    return {
        label: score(model, calib, method, target_modules=SHARDED_TARGETS, progress=False, **kwargs)
        for label, method, kwargs in SHARDED_RUNS
    }


def file_parts(data: bytes) -> tuple[dict, bytes]:
    """(parsed safetensors header, data bytes): a file's content without the header's key order (the safetensors
    library writes metadata keys in hash order)."""
    import json
    import struct

    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def threshold_gap(scores, k: int, largest: bool) -> float:
    """Relative gap between the k-th and (k+1)-th best score: how far a rounding difference must move a score to
    change the selection."""
    flat = torch.cat([scores[n].reshape(-1).cpu() for n in scores.names]).double()
    values = flat.sort(descending=largest).values
    a, b = values[k - 1], values[k]
    return float((a - b).abs() / max(a.abs(), b.abs(), torch.tensor(1e-30, dtype=torch.float64)))


def verify_sharded_run(
    out, reference: dict, *, world: int, column_sharded: bool, flat_partitions: bool, exact_snip: bool = True
) -> str:
    """Check a sharded run's outputs (``out``) against one-process ``reference`` scores; raise `AssertionError` at
    the first difference, return a one-line summary otherwise.

    Checks: each rank held a shard only (together the whole); the collective histogram; the sharded fingerprints;
    the gathered scores (bit for bit for snip's per-sample mode where ``exact_snip``, within fp32 summation-order
    rounding otherwise); every mask index for index with its fingerprints and provenance; the streamed mask files.
    """
    from pathlib import Path

    from peft_safety.mask import SafetyMask
    from peft_safety.scoring.scores import Scores
    from peft_safety.scoring.selection import select

    out = Path(out)
    facts = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]
    assert all(f["world_size"] == world for f in facts)
    assert all("cannot score a sharded model" in f["refused"] and "'magnitude'" in f["refused"] for f in facts)
    # scoring left the model as it found it: FSDP2's gradient averaging, no hooks or gradients left, flags and mode
    assert all(f["state_after"] == f["state_before"] for f in facts), (
        facts[0]["state_before"],
        facts[0]["state_after"],
    )
    assert all(f["state_after"]["hooks"] == 0 and f["state_after"]["grads"] == 0 for f in facts)
    masks = 0
    for label, _, _ in SHARDED_RUNS:
        ref = reference[label]
        runs = [f["runs"][label] for f in facts]
        assert all(r["sharded"] for r in runs)
        assert sum(r["local_numel"] for r in runs) == ref.numel() == runs[0]["numel"], label
        assert world == 1 or all(r["local_numel"] < ref.numel() for r in runs), label
        if flat_partitions:
            assert all(len(s["grid"]) == 1 for s in runs[0]["shards"].values())
        if column_sharded and world > 1:  # Shard(1) of a 32-column weight: rank r holds columns from r * 32 / world
            assert runs[1]["shards"][COLUMN_SHARDED]["offsets"] == [0, 32 // world]
            assert all("needs whole rows on each rank" in r["per_row_error"] for r in runs)
        want_hist = sum(
            torch.histc(ref[n].reshape(-1).cpu(), bins=16, min=0.0, max=1.0).round().long() for n in ref.names
        )
        assert all(torch.equal(r["histogram"], want_hist) for r in runs), label
        assert all(r["fingerprints"] == ref.fingerprints for r in runs) and ref.fingerprints, label

        gathered = Scores.from_pretrained(out / f"{label}_scores")
        assert gathered.names == ref.names and gathered.provenance == ref.provenance, label
        for n in ref.names:
            want = ref[n].cpu()
            if label == "snip" and exact_snip:  # every rank ran every sample, only its owner with weight 1
                assert torch.equal(gathered[n], want), (label, n)
            else:  # the ranks summed different batches: fp32 summation order differs
                torch.testing.assert_close(
                    gathered[n], want, rtol=1e-5, atol=1e-6 * float(want.abs().max()), msg=f"{label} {n}"
                )
        for sel, _ in SHARDED_SELECTIONS:
            kwargs = sharded_selection_kwargs(sel)
            source = ref.restrict([n for n in ref.names if n != COLUMN_SHARDED]) if sel == "per_row" else ref
            want = select(source, **kwargs)
            if kwargs["scope"] == "global" and not (label == "snip" and exact_snip):
                # the precondition of comparing with a rounding-different run: no near-tie at the threshold
                assert threshold_gap(ref, len(want), kwargs.get("largest", True)) > 1e-4, (label, sel)
            got = SafetyMask.from_pretrained(out / f"{label}_{sel}")
            assert got == want, (label, sel)
            assert got.fingerprints == want.fingerprints and got.provenance == want.provenance, (label, sel)
            streamed = (out / f"{label}_{sel}_stream" / "safety_mask.safetensors").read_bytes()
            assert file_parts(streamed) == file_parts(want.to_bytes()), (label, sel)
            assert len(want) > 0
            masks += 1
    return f"ok    {masks} masks of {len(SHARDED_RUNS)} scorers equal the one-process masks ({world} ranks)"


def verify_main(out: str, kind: str, device: str = "cpu") -> None:
    """``python _ddp_worker.py verify OUT fsdp2|zero3 [cuda]``: check a sharded run against a one-process run on the
    same device; prints ``ok ...`` or ``FAIL ...`` (exit code 1)."""
    facts = torch.load(os.path.join(out, "rank0.pt"), weights_only=False)
    world = facts["world_size"]
    try:
        line = verify_sharded_run(
            out,
            sharded_reference(device),
            world=world,
            column_sharded=kind == "fsdp2",
            flat_partitions=kind == "zero3",
            exact_snip=kind == "fsdp2",
        )
    except AssertionError as err:
        print(f"FAIL  sharded {kind} masks differ from the one-process masks: {str(err)[:160]}")
        sys.exit(1)
    print(line)


#: the FSDP2 test's mask: flat entries, whole rows, whole columns, and entries on both shards of each tensor
FSDP2_MASK = {
    "model.layers.0.self_attn.q_proj.weight": ("flat", [0, 7, 99, 512, 1000]),
    "model.layers.1.self_attn.v_proj.weight": ("rows", [2, 5, 12]),
    "model.layers.0.mlp.down_proj.weight": ("cols", [1, 30]),
}


def fsdp2_dense_masks(model) -> dict[str, torch.Tensor]:
    """``{name: bool tensor}`` of `FSDP2_MASK` for ``model``'s (full) parameter shapes."""
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    masks = {}
    for name, (kind, ids) in FSDP2_MASK.items():
        m = torch.zeros(shapes[name], dtype=torch.bool)
        if kind == "flat":
            m.view(-1)[ids] = True
        elif kind == "rows":
            m[ids] = True
        else:
            m[:, ids] = True
        masks[name] = m
    return masks


def fsdp2_main(out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from peft_safety.testing import tiny_llama
    from peft_safety.training.freeze import Freezer

    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    model = tiny_llama(seed=0)
    masks = fsdp2_dense_masks(model)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    freezer = Freezer(masks).install(model, optimizer)
    generator = torch.Generator().manual_seed(100 + rank)  # each rank its own data, as data parallelism has
    accumulation = 2
    for _step in range(3):
        for micro in range(accumulation):
            # FSDP2 reduces gradients on the last micro-batch only; the hooks fire then, on the reduced shard
            model.set_requires_gradient_sync(micro == accumulation - 1)
            ids = torch.randint(6, model.config.vocab_size, (2, 12), generator=generator)
            (model(input_ids=ids, labels=ids).loss / accumulation).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        optimizer.step()
        optimizer.zero_grad()
    report = freezer.verify(strict=False)
    reference = freezer.verify(tiny_llama(seed=0), strict=False)
    backend = freezer.resolved_backend
    freezer.remove()
    full = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
    torch.save(
        {
            "params": full,
            "backend": backend,
            "ok": report.ok,
            "ok_reference": reference.ok,
            "checked": report.checked_entries,
            "world_size": world,
        },
        os.path.join(out, f"rank{rank}.pt"),
    )
    # every rank leaves the group together: a rank that tears gloo down while its peer still talks can abort at exit
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def main(out: str) -> None:
    from datasets import Dataset

    from peft_safety.mask import Neuron, SafetyMask, Weight
    from peft_safety.testing import tiny_llama, tiny_tokenizer
    from peft_safety.training.config import SafetySFTConfig
    from peft_safety.training.trainer import SafetySFTTrainer

    torch.set_num_threads(1)
    model = tiny_llama(seed=0)
    q, v = "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.v_proj.weight"
    mask = SafetyMask(
        indices={q: [0, 7, 99, 512], v: [2, 5]},
        shapes={q: (32, 32), v: (16, 32)},
        granularity={q: Weight(), v: Neuron(axis=0)},
        provenance={"method": "test"},
    )
    rank = int(os.environ["RANK"])
    rows = [{"prompt": f"Q{i} from rank {rank}?", "completion": f" A{i * (rank + 1)}."} for i in range(16)]
    args = SafetySFTConfig(
        output_dir=os.path.join(out, "trainer"),
        max_steps=3,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        weight_decay=0.1,
        max_grad_norm=0.5,
        max_length=32,
        bf16=False,
        activation_checkpointing=False,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        logging_steps=1,
        safety_mode="freeze",
        ddp_backend="gloo",
    )
    trainer = SafetySFTTrainer(
        model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tiny_tokenizer(), safety_mask=mask
    )
    trainer.train()
    frozen_logged = [h.get("safety/frozen_entries") for h in trainer.state.log_history]
    torch.save(
        {
            "params": {n: p.detach().clone() for n, p in trainer.model.named_parameters()},
            "world_size": torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1,
            "frozen_logged": frozen_logged,
        },
        os.path.join(out, f"rank{rank}.pt"),
    )
    # tear the gloo group down before the interpreter exits: leaving it to atexit can abort a rank with
    # "terminate called without an active exception" (seen as exit code -6 on a loaded machine)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    modes = {
        "train": main,
        "score": score_main,
        "fsdp2": fsdp2_main,
        "fsdp2_score": fsdp2_score_main,
        "zero3_score": zero3_score_main,
        "verify": verify_main,
    }
    modes[sys.argv[1]](*sys.argv[2:])
