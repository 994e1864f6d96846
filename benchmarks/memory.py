"""Memory of scoring and selection, per parameter and per rank: measured on the tiny and the embedded model, in one
process and sharded over 2 processes (FSDP2 ``fully_shard``, gloo, CPU), then projected to 7B and 70B models on
8 x 80 GB.

Every measurement runs in a fresh process (a rank of a 2-process group for the sharded runs): the model is loaded
(and sharded), then the kernel's peak-RSS counter is reset (``/proc/self/clear_refs``) and one phase runs; the phase's
**peak extra memory** is ``VmHWM`` after it minus ``VmRSS`` before it (``MALLOC_MMAP_THRESHOLD_=65536`` so that freed
buffers leave the process at once). Phases: ``score`` (`peft_safety.score`, the scorer's whole pass) and ``select``
(`select`, global 1%). Recorded next to them: the model's weight bytes and this rank's part of them, the number of
scored entries and this rank's part (the fp32 accumulators/scores are 4 bytes each), and the calibration tokens.

The projection (``projection`` in the JSON, the table in ``docs/memory.md``) applies the per-rank model of
``docs/memory.md`` to the published Llama-2 7B and 70B shapes: the fp32 state at 4 bytes per scored entry a rank
holds (one accumulator, by construction; the measured peaks minus it leave the activations and buffers, which do
not shrink with the shard), and the selection's peak extra bytes per scored entry a rank holds, measured on the
largest model. ``--reproject`` recomputes the projection from the measurements already in ``--out``.

```bash
python benchmarks/memory.py                 # tiny + smollm2-135m, one process and 2-process FSDP2 (minutes)
python benchmarks/memory.py --small         # tiny only (tests)
python benchmarks/tables.py                 # refresh docs/memory.md from the JSON
```
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "memory.json")
METHODS = {"esi": {}, "snip": {"aggregation": "abs_of_sum"}, "wanda": {}}

#: published shapes (Llama 2, Touvron et al. 2023; the Hugging Face configs of meta-llama/Llama-2-{7b,70b}-hf)
LLAMA2 = {
    "7B": {"hidden": 4096, "intermediate": 11008, "layers": 32, "heads": 32, "kv_heads": 32, "vocab": 32000},
    "70B": {"hidden": 8192, "intermediate": 28672, "layers": 80, "heads": 64, "kv_heads": 8, "vocab": 32000},
}


# --------------------------------------------------------------------------------------------------------- measuring
def _status() -> dict[str, int]:
    with open("/proc/self/status") as f:
        text = f.read()
    return {key: int(re.search(rf"{key}:\s+(\d+)", text).group(1)) * 1024 for key in ("VmHWM", "VmRSS")}


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _phase(fn):
    """(result, peak extra bytes, seconds) of ``fn()``."""
    before = _status()["VmRSS"]
    reset = _reset_peak()
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    return out, (_status()["VmHWM"] - before) if reset else None, seconds


def _model(name: str):
    if name == "tiny":
        from peft_safety.testing import tiny_llama, tiny_tokenizer

        return tiny_llama(
            seed=0, num_hidden_layers=4, hidden_size=256, intermediate_size=512, head_dim=32
        ), tiny_tokenizer()
    from peft_safety.sources.models import load_model

    return load_model(name)


def _calibration(tokenizer, rows: int, max_length: int):
    from peft_safety.scoring.calibration import CalibrationSet, refusal_rows

    prompts = [f"Explain step {i} of making something dangerous, in detail please." for i in range(rows)]
    return CalibrationSet(
        refusal_rows(prompts, "I cannot help with that request, it could cause harm to people."), tokenizer,
        max_length=max_length,
    )  # fmt: skip


def worker(args: argparse.Namespace) -> dict:
    """One (model, method) in this process; with ``--sharded`` this process is one rank of an FSDP2 group."""
    from peft_safety.scoring import score
    from peft_safety.scoring.selection import select

    torch.set_num_threads(args.threads)
    model, tokenizer = _model(args.model)
    with torch.no_grad():  # fault every weight page in (loaders may map the checkpoint lazily): part of the baseline
        for p in model.parameters():
            p.sum()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    rank, world = 0, 1
    if args.sharded:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        torch.distributed.init_process_group("gloo")
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        mesh = init_device_mesh("cpu", (world,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    local_weight_bytes = sum(
        (p.to_local() if hasattr(p, "to_local") else p).numel() * p.element_size() for p in model.parameters()
    )
    calib = _calibration(tokenizer, args.rows, args.max_length)
    kwargs = {**METHODS[args.method], "batch_size": args.batch_size}
    scores, score_peak, score_s = _phase(lambda: score(model, calib, args.method, progress=False, **kwargs))
    mask, select_peak, select_s = _phase(lambda: select(scores, fraction=0.01))
    result = {
        "model": args.model,
        "method": args.method,
        "kwargs": kwargs,
        "world": world,
        "rank": rank,
        "parameters": sum(p.numel() for p in model.parameters()),
        "weight_bytes": weight_bytes,
        "local_weight_bytes": local_weight_bytes,
        "scored": scores.numel(),
        "local_scored": scores.local_numel(),
        "calibration_rows": len(calib),
        "calibration_tokens": int(sum(len(calib.collate([i])["input_ids"][0]) for i in range(len(calib)))),
        "score_peak_extra_bytes": score_peak,
        "select_peak_extra_bytes": select_peak,
        "score_s": score_s,
        "select_s": select_s,
        "mask_units": len(mask) if mask is not None else None,
    }
    if args.sharded:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return result


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(model: str, method: str, args: argparse.Namespace, world: int) -> list[dict]:
    """The worker in fresh processes (``world`` ranks of a gloo group when ``world > 1``); their results."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--model", model, "--method", method, "--rows",
           str(args.rows), "--batch-size", str(args.batch_size), "--max-length", str(args.max_length), "--threads",
           str(args.threads)] + (["--sharded"] if world > 1 else [])  # fmt: skip
    port = _free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(args.threads))
        if world > 1:
            env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for p in procs:
        out, err = p.communicate(timeout=3600)
        if p.returncode != 0:
            raise RuntimeError(f"{model} {method} world={world} failed:\n{err[-4000:]}")
        results.append(json.loads(next(ln for ln in out.splitlines() if ln.startswith("RESULT "))[7:]))
    return results


# -------------------------------------------------------------------------------------------------------- projecting
def llama_params(c: dict) -> dict[str, int]:
    """Parameter counts of a Llama-2 shape: every weight, the scored linear weights (q/k/v/o, gate/up/down; no
    embeddings, norms or lm_head), and the largest decoder layer."""
    h, f, n, v = c["hidden"], c["intermediate"], c["layers"], c["vocab"]
    kv = h * c["kv_heads"] // c["heads"]
    layer_linear = h * h * 2 + h * kv * 2 + 3 * h * f
    layer = layer_linear + 2 * h
    return {"total": n * layer + 2 * v * h + h, "scored": n * layer_linear, "layer": layer, "embedding": v * h}


#: bytes of scoring state per scored entry a rank holds: one fp32 accumulator, turned into the score in place
STATE_BYTES = 4


def coefficients(measured: list[dict]) -> dict[str, dict]:
    """Per method, on the largest measured model: the fp32 state (`STATE_BYTES` per entry held, by construction),
    the rest of each run's scoring peak (``peak - 4 * entries held``: activations, autograd and FSDP2 buffers, which
    do not shrink with the shard), and the selection's peak extra bytes per entry held (sharded runs)."""
    biggest = max(r["parameters"] for r in measured)
    out = {}
    for method in sorted({r["method"] for r in measured}):
        rows = [r for r in measured if r["method"] == method and r["parameters"] == biggest]
        rest = {w: max(r["score_peak_extra_bytes"] - STATE_BYTES * r["local_scored"] for r in rows if r["world"] == w)
                for w in sorted({r["world"] for r in rows})}  # fmt: skip
        sharded = [r for r in rows if r["world"] > 1] or rows
        out[method] = {
            "model": rows[0]["model"],
            "state_bytes_per_entry": STATE_BYTES,
            "rest_bytes_by_world": {str(w): v for w, v in rest.items()},
            "select_bytes_per_local_entry": max(r["select_peak_extra_bytes"] / r["local_scored"] for r in sharded),
        }
    return out


def project(measured: list[dict], world: int = 8, gpu_gib: int = 80, tokens: int = 1024) -> dict:
    """Per-rank memory of ESI scoring and 1% selection for Llama-2 7B and 70B over ``world`` GPUs (bf16 weights),
    from the model of docs/memory.md: exact arithmetic for the weights and the fp32 state, the selection coefficient
    measured on the largest model (`coefficients`), and stated estimates for FSDP2's working set and the
    activations."""
    coef = coefficients(measured)
    esi = coef["esi"]
    out = {"world": world, "gpu_gib": gpu_gib, "tokens_per_batch": tokens, "coefficients": coef, "models": {}}
    gib = 2**30
    for name, c in LLAMA2.items():
        p = llama_params(c)
        weights = 2 * p["total"] / world  # bf16, sharded
        working = 2 * 2 * p["layer"] + 4 * p["layer"]  # current + prefetched layer unsharded (bf16), one fp32 grad
        state = STATE_BYTES * p["scored"] / world  # the fp32 accumulators, which become the scores
        acts = 2 * tokens * c["hidden"] * (c["layers"] + 16) + 4 * tokens * c["vocab"]  # checkpointed + logits
        sel = esi["select_bytes_per_local_entry"] * p["scored"] / world
        score_total = weights + working + state + acts
        out["models"][name] = {
            "parameters": p["total"],
            "scored": p["scored"],
            "per_rank_gib": {
                "weights": weights / gib,
                "layer_working_set": working / gib,
                "fp32_state": state / gib,
                "activations": acts / gib,
                "scoring_total": score_total / gib,
                "selection_extra": sel / gib,
            },
            "fits": bool(score_total + sel < gpu_gib * gib * 0.9),
            "unsharded_gib": (2 * p["total"] + STATE_BYTES * p["scored"] + working + acts) / gib,
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="tiny,smollm2-135m")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=160)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--world", type=int, default=2, help="ranks of the sharded runs")
    parser.add_argument("--small", action="store_true", help="tiny model only")
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--sharded", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--reproject", action="store_true", help="recompute the projection of --out's measurements")
    args = parser.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(args)))
        return 0
    if args.reproject:
        with open(args.out, encoding="utf-8") as fh:
            result = json.load(fh)
        result["projection"] = project(result["measured"])
        result["projection_command"] = " ".join(["python", *sys.argv])
        _bench.write_json(args.out, result)
        print(f"-> {args.out}")
        return 0
    if args.small:
        args.models = "tiny"
    prov = _bench.provenance(args.threads)
    measured = []
    for model in args.models.split(","):
        for method in args.methods.split(","):
            for world in (1, args.world):
                for r in run(model, method, args, world):
                    measured.append(r)
                    per = r["score_peak_extra_bytes"] / r["local_scored"]
                    print(f"{model:14s} {method:6s} world={world} rank={r['rank']}  local scored "
                          f"{r['local_scored']:>12,}  score peak extra {r['score_peak_extra_bytes'] / 2**20:9.1f} MiB "
                          f"({per:5.2f} B/entry)  select {r['select_peak_extra_bytes'] / 2**20:7.1f} MiB")  # fmt: skip
    result = {
        "benchmark": "memory",
        "config": {
            k: getattr(args, k) for k in ("models", "methods", "rows", "batch_size", "max_length", "threads", "world")
        },
        "measured": measured,
        "projection": project(measured),
    }
    result["provenance"] = _bench.finish(prov)
    _bench.write_json(args.out, result)
    for name, m in result["projection"]["models"].items():
        per = m["per_rank_gib"]
        print(f"Llama-2 {name}: {per['scoring_total']:.1f} GiB per rank to score + {per['selection_extra']:.1f} GiB to "
              f"select on {result['projection']['world']} ranks (unsharded: {m['unsharded_gib']:.0f} GiB)")  # fmt: skip
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
