"""The grid: its order, one process's shared pieces, and one (arm, p, seed) run written to its own files.

Every run writes ``<out>/runs/<id>.json`` (settings, data and judge digests, mask digests, what training did, the
per-prompt safe flags and labels of every judge, style markers, per-row task correctness, timings) and
``<out>/runs/<id>.jsonl`` (every answer with every judge's verdict). A run whose JSON exists is skipped, after its
digests are checked against this process's: a finished run made with other settings, data or judge stops the grid
with an error (start a new ``--out`` or restore the settings), so runs pooled later are comparable by construction.
The JSON is written last and atomically: an interrupted run leaves no JSON and is run again.
"""

from __future__ import annotations

import gc
import json
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from .arms import ARMS, ARTIFACTS, PLANNED, ArmContext
from .config import HFTConfig, arm_settings_of, p_values, seed_list, settings_digest, settings_of, split

FORMAT = "peft_safety.hft.run/1"


@dataclass(frozen=True)
class RunSpec:
    arm: str
    p: float | None
    seed: int | None

    @property
    def id(self) -> str:
        if self.p is None:
            return self.arm
        return f"{self.arm}_p{self.p:g}_seed{self.seed}"


#: the arms whose first-seed runs come first (the comparison everything else is read against)
PRIORITY = ("lora", "replay", "spa_esi")


def plan(cfg: HFTConfig) -> tuple[list[RunSpec], list[str]]:
    """The runs of the grid in the order they run, and the named arms not available yet.

    Order: the aligned model; for each p (in ``--p`` order) and each seed, plain LoRA, replay and SPA-ESI first, then
    the other arms; single-seed arms only at the first seed; at p = 0 only ``--p0_arms``.
    """
    wanted = split(cfg.arms) or list(ARMS)
    unknown = [a for a in wanted if a not in ARMS and a not in PLANNED]
    if unknown:
        from peft_safety.vocab import did_you_mean

        raise ValueError(f"Unknown arms {unknown}{did_you_mean(unknown[0], [*ARMS, *PLANNED])}; registered: "
                         f"{list(ARMS)}.")  # fmt: skip
    missing = [a for a in wanted if a in PLANNED and a not in ARMS]
    arms = [a for a in wanted if a in ARMS]
    order = [a for a in PRIORITY if a in arms] + [a for a in arms if a not in PRIORITY]
    single = set(split(cfg.single_seed_arms))
    p0 = set(split(cfg.p0_arms))
    if 0.0 in p_values(cfg):
        missing += [a for a in p0 if a not in ARMS and a not in missing]
    runs = [RunSpec(a, None, None) for a in order if not ARMS[a].trains]
    seeds = seed_list(cfg)
    for p in p_values(cfg):
        for i, seed in enumerate(seeds):
            for a in order:
                if not ARMS[a].trains or (p == 0 and a not in p0) or (i > 0 and a in single):
                    continue
                runs.append(RunSpec(a, p, seed))
    return runs, sorted(set(missing))


def _load_model(cfg: HFTConfig) -> tuple[Any, Any]:
    if cfg.model == "tiny":
        from peft_safety.testing import tiny_llama, tiny_tokenizer

        return tiny_llama(seed=0, num_hidden_layers=4), tiny_tokenizer()
    from peft_safety.sources.models import load_model

    return load_model(cfg.model)


class Session:
    """One process's shared pieces: the aligned model, the data, the judges, the masks (built on first use)."""

    def __init__(self, cfg: HFTConfig) -> None:
        from benchmarks import _bench

        from .data import HFTData
        from .evaluate import Evaluator, build_judges, marker_rates

        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.runs_dir = self.out / "runs"
        self.work = Path(cfg.work_dir) if cfg.work_dir else Path(tempfile.mkdtemp(prefix="hft-"))
        self.provenance = _bench.provenance(torch.get_num_threads())
        t = time.perf_counter()
        self.base, self.tok = _load_model(cfg)
        self.base.eval()
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.data = HFTData(cfg)
        self.judges, self.judge_info = build_judges(cfg, self.data, self.work)
        self.evaluate = Evaluator(cfg, self.tok, self.data, self.judges)
        self.settings_digest = settings_digest(cfg)
        self.data_digest = self.data.digest()
        from benchmarks._shared import sha256_json

        self.judge_digest = sha256_json(self.judge_info)
        self.setup_seconds = round(time.perf_counter() - t, 1)
        self.setup_cpu_seconds = round(time.process_time(), 1)
        self.probe = self._aligned_probe()
        self.train_markers = marker_rates([r["response"] for r in self.data.task_pool])
        self._masks: dict[str, Any] = {}
        self.mask_info: dict[str, Any] = {}
        self._artifacts: dict[str, Any] = {}
        self.artifact_seconds: dict[str, float] = {}

    def _aligned_probe(self) -> str:
        """sha256 of the aligned model's greedy answers to 4 HarmBench prompts (8 tokens): every run of a pooled grid
        must have seen the same aligned model with the same numerics (threads, versions)."""
        from benchmarks._shared import sha256_json
        from peft_safety.scoring.generation import generate_with_stats

        texts, _ = generate_with_stats(self.base, self.tok, [r["prompt"] for r in self.data.harmbench[:4]],
                                       max_new_tokens=8, batch_size=4, progress=False)  # fmt: skip
        return sha256_json(texts)

    def mask(self, name: str) -> Any:
        if name not in self._masks:
            from benchmarks._shared import build_masks

            masks, info = build_masks(self.base, self.tok, self.data.ident, self.data.chat, {name},
                                      density=self.cfg.density, max_length=self.cfg.max_length, batch_size=8,
                                      progress=self.cfg.progress)  # fmt: skip
            digest = info[name]["digest"]
            for previous in self.finished():
                known = previous.get("masks", {}).get(name)
                if known is not None and known["digest"] != digest:
                    raise RuntimeError(f"The rebuilt {name} mask differs from the one of {previous['id']} in "
                                       f"{self.runs_dir}; start a new --out.")  # fmt: skip
            self._masks[name], self.mask_info[name] = masks[name], info[name]
        return self._masks[name]

    def artifact(self, name: str) -> Any:
        """The shared artifact ``name`` (Booster's hardened model, the alignment direction), built on first use; its
        digest must equal the one recorded by every finished run that used it (same as the masks)."""
        if name not in self._artifacts:
            ctx = ArmContext(self.cfg, self.base, self.tok, self.data, 0.0, 0, [], self.mask,
                             self.work / f"artifact-{name}", self.artifact)  # fmt: skip
            t = time.perf_counter()
            built = ARTIFACTS[name](ctx)
            self.artifact_seconds[name] = round(time.perf_counter() - t, 1)
            digest = built["info"]["digest"]
            for previous in self.finished():
                known = previous.get("artifacts", {}).get(name)
                if known is not None and known["digest"] != digest:
                    raise RuntimeError(f"The rebuilt {name} artifact differs from the one of {previous['id']} in "
                                       f"{self.runs_dir}; start a new --out.")  # fmt: skip
            self._artifacts[name] = built
        return self._artifacts[name]

    def finished(self) -> list[dict[str, Any]]:
        if not self.runs_dir.is_dir():
            return []
        return [json.loads(p.read_text(encoding="utf-8")) for p in sorted(self.runs_dir.glob("*.json"))]

    def check_finished(self, run: dict[str, Any], path: Path) -> None:
        """A finished run must come from the same settings (the common ones and its arm's own), data and judge; its
        JSONL must be intact."""
        from peft_safety.sources.offline import sha256_file

        if run.get("format") != FORMAT:
            raise RuntimeError(f"{path} is not a run file of this protocol ({run.get('format')!r}).")
        arm = run.get("arm")
        mine_settings = {**settings_of(self.cfg), **arm_settings_of(self.cfg, arm)}
        theirs = {**run.get("settings", {}), **run.get("arm_settings", {})}
        for key, mine in (("settings_digest", settings_digest(self.cfg, arm)), ("data_digest", self.data_digest),
                          ("judge_digest", self.judge_digest)):  # fmt: skip
            if run.get(key) != mine:
                what = key.split("_")[0]
                differ = ""
                if what == "settings":
                    differ = f" (differing: {sorted(k for k, v in mine_settings.items() if theirs.get(k) != v)})"
                raise RuntimeError(f"{path} was run with other {what}{differ} than this process; resume with the "
                                   "same settings and code, or write to another --out.")  # fmt: skip
        jsonl = path.with_suffix(".jsonl")
        if not jsonl.is_file() or sha256_file(jsonl) != run["eval"]["generations_sha256"]:
            raise RuntimeError(f"{jsonl} is missing or differs from the digest in {path.name}; delete both to rerun.")

    def run(self, spec: RunSpec) -> dict[str, Any] | None:
        """Run ``spec`` unless its files exist (then check them and return None)."""
        from benchmarks import _bench, _shared
        from peft_safety._io import atomic_write_text

        path = self.runs_dir / f"{spec.id}.json"
        if path.is_file():
            self.check_finished(json.loads(path.read_text(encoding="utf-8")), path)
            return None
        arm = ARMS[spec.arm]
        rows = self.data.train_rows(spec.p, spec.seed) if arm.trains else []
        work = self.work / spec.id
        curve_arms = split(self.cfg.curve_arms)
        cfg = self.cfg if not curve_arms or spec.arm in curve_arms else replace(self.cfg, curve_every=0)
        ctx = ArmContext(cfg, self.base, self.tok, self.data, spec.p if spec.p is not None else 0.0,
                         spec.seed if spec.seed is not None else 0, rows, self.mask, work, self.artifact)  # fmt: skip
        t, c = time.perf_counter(), time.process_time()
        prov = _bench.provenance(torch.get_num_threads())
        model, info = arm.build(ctx)
        train_seconds = round(time.perf_counter() - t, 1)
        train_cpu = round(time.process_time() - c, 1)
        t, c = time.perf_counter(), time.process_time()
        result = self.evaluate(model, self.runs_dir / f"{spec.id}.jsonl")
        # CPU seconds of this process (all threads): on a shared machine wall time measures the neighbours too
        result["cpu_seconds"] = {"train": train_cpu, "eval": round(time.process_time() - c, 1)}
        result["wall_seconds"] = {"train": train_seconds, "eval": round(time.perf_counter() - t, 1)}
        if model is not self.base:
            del model
            gc.collect()
        planned = {
            "task": sum(r["kind"] == "task" for r in rows),
            "harmful": sum(r["kind"] == "harmful" for r in rows),
        }
        payload = {
            "format": FORMAT, "id": spec.id, "arm": spec.arm, "p": spec.p, "seed": spec.seed,
            "description": arm.description, "preset": self.cfg.preset,
            "grid": {k: getattr(self.cfg, k) for k in ("arms", "p", "seeds", "single_seed_arms", "p0_arms")},
            "data": self.data.summary(), "judges": self.judge_info,
            "train_set_markers": self.train_markers, "setup_seconds": self.setup_seconds,
            "setup_cpu_seconds": self.setup_cpu_seconds,
            "settings_digest": settings_digest(self.cfg, spec.arm), "common_settings_digest": self.settings_digest,
            "data_digest": self.data_digest, "judge_digest": self.judge_digest, "aligned_probe": self.probe,
            "settings": settings_of(self.cfg), "arm_settings": arm_settings_of(self.cfg, spec.arm),
            "masks": {m: self.mask_info[m] for m in arm.masks},
            "artifacts": {a: {**self._artifacts[a]["info"], "build_seconds": self.artifact_seconds[a]}
                          for a in arm.artifacts},
            "train": {**info, "rows_planned": planned, "seconds": train_seconds},
            "eval": result, "provenance": _bench.finish(prov), "environment": _shared.environment(),
        }  # fmt: skip
        atomic_write_text(path, json.dumps(payload, indent=1, default=str) + "\n")
        return payload


def run_grid(cfg: HFTConfig) -> list[str]:
    """Run every planned run that has no files yet (at most ``max_runs`` new ones); return the ids run."""
    runs, missing = plan(cfg)
    if missing:
        print(f"Arms of the protocol not available in the library yet (skipped): {', '.join(missing)}", flush=True)
    session = Session(cfg)
    print(f"Setup {session.setup_seconds:.0f} s; {len(runs)} runs planned; out {session.runs_dir}", flush=True)
    done: list[str] = []
    for spec in runs:
        if cfg.max_runs and len(done) >= cfg.max_runs:
            break
        t = time.perf_counter()
        payload = session.run(spec)
        if payload is None:
            continue
        done.append(spec.id)
        safe = payload["eval"]["sets"]["harmbench"]["safe"][cfg.primary_judge]
        rate = sum(bool(x) for x in safe if x is not None) / max(1, sum(x is not None for x in safe))
        acc = sum(payload["eval"]["task_correct"]) / len(payload["eval"]["task_correct"])
        print(f"[{time.strftime('%H:%M:%S')}] {spec.id}: {time.perf_counter() - t:.0f} s, HarmBench safe "
              f"({cfg.primary_judge}) {100 * rate:.0f}%, task accuracy {100 * acc:.1f}%", flush=True)  # fmt: skip
    return done
