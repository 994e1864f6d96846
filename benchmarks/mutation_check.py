"""Mutation check: break the core modules on purpose, one named breakage at a time, and see whether a test fails.

Each mutation replaces one exact piece of source text (it must occur exactly once, else the mutation is reported as
``stale`` and the run fails: the code moved and the list needs updating) in a **copy** of the package: the working
tree is copied once to a temporary directory, each mutated file is written there, the targeted tests run there (a
subprocess, ``PYTHONPATH`` = the copy, a timeout), and the file is put back before the next mutation. The working
tree itself is never edited. The unmutated copy runs the same tests first; a mutation counts as ``caught`` only if
those pass and the mutated run fails.

Results go to ``benchmarks/results/mutation_check.json`` (each mutation: module, breakage, tests, status, failing
tests, seconds, plus provenance); ``benchmarks/tables.py`` renders the table in ``docs/testing.md`` from it.

```bash
python benchmarks/mutation_check.py                      # every mutation (~15-30 min on 2 shared cores)
python benchmarks/mutation_check.py --only neuron-vo-square,layer-count-compliances
python benchmarks/mutation_check.py --list               # names, modules and targeted tests
```

Status: ``caught`` (a targeted test failed), ``survived`` (all passed: add a test), ``timeout`` (counted as caught
by mutation-testing convention, listed separately), ``stale`` (the source text was not found).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench

ROOT = _bench.REPO_ROOT
DEFAULT_OUT = os.path.join(ROOT, "benchmarks", "results", "mutation_check.json")


@dataclass
class Mutation:
    """One named breakage: replace ``find`` (exactly one occurrence) by ``replace`` in ``path``."""

    name: str = field(metadata={"help": "short id"})
    path: str = field(metadata={"help": "file, relative to the repository root"})
    breakage: str = field(metadata={"help": "what the mutation breaks, in words"})
    find: str = field(metadata={"help": "exact source text"})
    replace: str = field(metadata={"help": "replacement text"})
    tests: list[str] = field(metadata={"help": "pytest node ids / -k expressions that must catch it"})


NEURON = "peft_safety/scoring/neuron.py"
LAYER = "peft_safety/scoring/layer.py"
GRADIENT = "peft_safety/scoring/gradient.py"
ACTIVATION = "peft_safety/scoring/activation.py"
SELECTION = "peft_safety/scoring/selection.py"
DISTRIBUTED = "peft_safety/scoring/distributed.py"
SCORE_FILES = "peft_safety/scoring/score_files.py"
FREEZE = "peft_safety/training/freeze.py"
JUDGES = "peft_safety/evaluation/judges.py"
LORA = "peft_safety/tuner/safety_lora/variant.py"
SET_LAYER = "peft_safety/tuner/safety/layer.py"
REFUSAL = "peft_safety/evaluation/refusal.py"

T_NEURON_ATTN = "tests/test_scoring_neuron.py::test_kv_scores_are_group_sums_of_query_space_scores"
T_NEURON_FFN = "tests/test_scoring_neuron.py::test_ffn_scores_equal_hand_computation_with_padding"
T_NEURON_SUPPORT = "tests/test_scoring_neuron.py::test_per_sample_topk_and_support_semantics"
T_PROBE = "tests/test_scoring_layer.py::test_probe_restores_weights_exactly_and_is_deterministic"
T_REF_SCORERS = "tests/test_reference_scorers.py"
T_GRADIENT = "tests/test_scoring_gradient.py::test_snip_and_esi_closed_form"
T_WANDA = "tests/test_scoring_activation.py"
T_SELECTION = "tests/test_selection.py"
T_SHARDED = "tests/test_sharded_selection.py"
T_FREEZE = ["tests/test_reference_freeze.py", "tests/test_freeze.py::test_gradients_masked_before_clipping"]
T_JUDGES = ["tests/test_reference_evaluation.py::test_keyword_judges_against_hand_counts", "tests/test_evaluation.py"]
T_EVAL = ["tests/test_reference_evaluation.py", "tests/test_evaluation.py"]

T_LORA_EXACT = [
    "tests/tuner/test_safety_lora.py::test_default_path_is_dense_and_bit_exact",
    "tests/tuner/test_safety_lora.py::test_effective_update_and_merge_exact_per_dtype",
]
T_LORA_GRAD = ["tests/tuner/test_safety_lora.py::test_dense_masked_delta_backward_passes_gradcheck"]
T_SET_FORWARD = ["tests/tuner/test_safety.py::test_forward_matches_dense_reference"]

MUTATIONS: list[Mutation] = [
    # ---- tuner layers: masked LoRA (SPA) and SET sparse deltas
    Mutation(
        "lora-dense-mask-dropped", LORA, "masked LoRA's dense delta keeps the masked entries (plain LoRA)",
        "delta = (weight_b @ weight_a) * scaling\n    return delta.reshape(-1).index_fill(0, idx, 0).view_as(delta)",
        "delta = (weight_b @ weight_a) * scaling\n    return delta",
        T_LORA_EXACT,
    ),
    Mutation(
        "lora-dense-grad-mask-dropped", LORA, "masked LoRA's backward forgets to zero the masked entries of dL/dM",
        "grad_m = grad_m.reshape(-1).index_fill(0, idx, 0).view_as(grad_m) * scaling",
        "grad_m = grad_m * scaling",
        T_LORA_GRAD,
    ),
    Mutation(
        "lora-dense-scaling-dropped", LORA, "masked LoRA's delta ignores the LoRA scaling (alpha / r)",
        "delta = (weight_b @ weight_a) * scaling", "delta = weight_b @ weight_a",
        T_LORA_EXACT,
    ),
    Mutation(
        "set-scatter-misplaced", SET_LAYER, "SET adds each delta at the wrong entry (indices reversed)",
        "flat.index_add_(0, idx, values.to(flat.dtype))", "flat.index_add_(0, idx.flip(0), values.to(flat.dtype))",
        T_SET_FORWARD,
    ),
    Mutation(
        "set-delta-sign-flipped", SET_LAYER, "SET subtracts its deltas instead of adding them",
        "flat.index_add_(0, idx, values.to(flat.dtype))", "flat.index_add_(0, idx, -values.to(flat.dtype))",
        T_SET_FORWARD,
    ),
    # ---- safety neurons
    Mutation(
        "neuron-vo-square", NEURON, "v/o statistic |out| -> out^2",
        "output.abs(), torch.zeros((), device=output.device)", "output.square(), torch.zeros((), device=output.device)",
        [T_NEURON_ATTN],
    ),
    Mutation(
        "neuron-gqa-floordiv", NEURON, "GQA: query dim -> kv row by index // g (SN-Tune's bug)",
        "kv_rows = query_to_kv_rows(torch.arange(heads * dim), heads, kv_heads, dim).to(query.device)",
        "kv_rows = (torch.arange(heads * dim) // (heads // kv_heads)).to(query.device)",
        [T_NEURON_ATTN],
    ),
    Mutation(
        "neuron-k-uses-vo", NEURON, "k rows scored with the v/o statistic (swapped statistics)",
        'src = qk if role == "k" else vo', 'src = vo if role == "k" else qk',
        [T_NEURON_ATTN],
    ),
    Mutation(
        "neuron-vo-padding", NEURON, "padding positions counted in the v/o statistic",
        "vo = torch.where(valid[:, None, :, None], output.abs()",
        "vo = torch.where(torch.ones_like(valid)[:, None, :, None], output.abs()",
        [T_NEURON_ATTN],
    ),
    Mutation(
        "neuron-ffn-signed", NEURON, "FFN statistic sums signed activations (abs dropped)",
        "act = torch.where(valid[..., None], hidden.abs(), torch.zeros((), device=hidden.device)).sum(1)",
        "act = torch.where(valid[..., None], hidden, torch.zeros((), device=hidden.device)).sum(1)",
        [T_NEURON_FFN],
    ),
    Mutation(
        "neuron-support-off-by-one", NEURON, "support threshold off by one (> instead of >=)",
        "units = (sup >= need).nonzero().reshape(-1)", "units = (sup > need).nonzero().reshape(-1)",
        [T_NEURON_SUPPORT],
    ),
    # ---- safety layers (over-rejection probe)
    Mutation(
        "layer-count-compliances", LAYER, "over-rejection probe counts non-refusals instead of refusals",
        "refused.append(bool(verdict))", "refused.append(not verdict)",
        [T_PROBE],
    ),
    Mutation(
        "layer-range-drops-last", LAYER, "probe scales layers [i, j) instead of the inclusive [i, j]",
        "context = scaled(model, _probe_mask(model, first, last), alpha)",
        "context = scaled(model, _probe_mask(model, first, max(first, last - 1)), alpha)",
        [T_PROBE],
    ),
    # ---- gradient scorers (SNIP, ESI and ESI's judge objective)
    Mutation(
        "esi-guard-ignored", GRADIENT, "judge objective ignores the guard (J from the soft inputs, not the guard)",
        "objective = -logits[0, -1, self.safe_id].float()", "objective = -soft.float().sum() + 0 * logits.sum()",
        [T_REF_SCORERS],
    ),
    Mutation(
        "esi-transfer-unnormalised", GRADIENT, "vocabulary transfer weights not normalised (1 instead of 1/|pieces|)",
        "vals.append(1.0 / len(pieces))", "vals.append(1.0)",
        [T_REF_SCORERS],
    ),
    Mutation(
        "esi-surrogate-sign", GRADIENT, "surrogate sign flipped (L = +sum g_T p)",
        "total = total - (g_target.detach() * p).sum()", "total = total + (g_target.detach() * p).sum()",
        [T_REF_SCORERS],
    ),
    Mutation(
        "esi-std-dropped", GRADIENT, "ESI without the std(W) factor",
        "values[name] = _esi_std_(grad.abs_(), weights[name], targets[name], shards.get(name))",
        "values[name] = grad.abs_()",
        [T_GRADIENT],
    ),
    Mutation(
        "esi-population-std", DISTRIBUTED, "std(W) with correction=0 instead of the unbiased std",
        "(m2 / (counts - 1).clamp_min(1)).sqrt()", "(m2 / counts.clamp_min(1)).sqrt()",
        [T_GRADIENT],
    ),
    Mutation(
        "esi-one-std-for-all-experts", GRADIENT, "fused MoE experts share one std(W) instead of one per expert",
        'group = numel // full[0] if getattr(info, "expert_dim", None) == 0 and len(full) >= 2 else numel',
        "group = numel",
        ["tests/test_scoring_moe.py::test_esi_fused_experts_use_one_std_per_expert"],
    ),
    Mutation(
        "snip-sum-of-abs-is-abs-of-sum", GRADIENT, "per-sample SNIP folds signed gradients (abs after the sum)",
        "            acc.add_(grad.abs())\n", "            acc.add_(grad)\n",
        [T_GRADIENT],
    ),
    Mutation(
        "snip-weight-term-dropped", GRADIENT, "SNIP without |W|",
        "values[name] = grad.mul_(weight.abs().float())", "values[name] = grad",
        [T_GRADIENT],
    ),
    # ---- Wanda
    Mutation(
        "wanda-sqrt-dropped", ACTIVATION, "Wanda uses the mean of x^2, not its square root",
        "norm = acc.div_(len(calib)).sqrt_()", "norm = acc.div_(len(calib))",
        [T_WANDA],
    ),
    Mutation(
        "wanda-prompt-tokens-count", ACTIVATION, "Wanda counts prompt tokens too (response mask dropped)",
        'state["mask"] = (labels != -100) if real', 'state["mask"] = (labels != -12345) if real',
        [T_WANDA],
    ),
    Mutation(
        "wanda-sample-count", ACTIVATION, "Wanda normalises by a wrong sample count (off by one)",
        "norm = acc.div_(len(calib)).sqrt_()", "norm = acc.div_(len(calib) + 1).sqrt_()",
        [T_WANDA],
    ),
    # ---- selection
    Mutation(
        "select-ties-last", SELECTION, "ties at the threshold taken from the end instead of the first in order",
        "take = eq[:ties_left]", "take = eq[eq.numel() - ties_left :] if ties_left < eq.numel() else eq",
        [T_SELECTION],
    ),
    Mutation(
        "select-threshold-inclusive", SELECTION, "entries equal to the k-th value all selected (>= instead of >)",
        "keep = c > threshold if largest else c < threshold", "keep = c >= threshold if largest else c < threshold",
        [T_SELECTION],
    ),
    Mutation(
        "select-round-down", SELECTION, "fraction -> count rounds down instead of half up",
        "return min(n, math.floor(fraction * n + 0.5))", "return min(n, math.floor(fraction * n))",
        [T_SELECTION],
    ),
    Mutation(
        "select-exclude-ignored", SELECTION, "exclude= mask ignored",
        "idx = idx[~torch.isin(idx, drop)]", "idx = idx",
        [T_SELECTION],
    ),
    Mutation(
        "shard-offset-dropped", DISTRIBUTED, "a contiguous shard's flat indices not offset by its start",
        "            return local + start\n", "            return local\n",
        [T_SHARDED],
    ),
    Mutation(
        "shard-box-offset-dropped", DISTRIBUTED, "a box shard's coordinates not offset (column-sharded tensors)",
        "            out += (coord + o) * stride", "            out += coord * stride",
        [T_SHARDED],
    ),
    Mutation(
        "sharded-replicas-counted", DISTRIBUTED, "HSDP replica shards counted as if they were distinct entries",
        "        return self.shard.numel if self.shard.counted else 0", "        return self.shard.numel",
        [T_SHARDED],
    ),
    Mutation(
        "sharded-ties-by-higher-index", DISTRIBUTED, "ties at the threshold split by the higher flat index first",
        "                    wins = keep & (d < digit)", "                    wins = keep & (d > digit)",
        [T_SHARDED],
    ),
    Mutation(
        "stream-ties-latest", DISTRIBUTED, "the one-read buffer keeps the latest entries equal to the k-th value",
        "ties = _nonzero(v == kth)[: keep - above.numel()]", "ties = _nonzero(v == kth).flip(0)[: keep - above.numel()]",
        ["tests/test_score_files.py"],
    ),
    Mutation(
        "score-files-read-offset", SCORE_FILES, "chunks of a score file read from the wrong offset",
        "offset, done = loc.begin + 4 * start, 0", "offset, done = loc.begin + 4 * (start // 2), 0",
        ["tests/test_score_files.py"],
    ),
    Mutation(
        "select-per-row-flipped", SELECTION, "per-row selection picks the lowest scores",
        "order = torch.sort(sub + 0.0, dim=1, descending=largest, stable=True).indices[:, :k]",
        "order = torch.sort(sub + 0.0, dim=1, descending=not largest, stable=True).indices[:, :k]",
        [T_SELECTION],
    ),
    # ---- freezing (SPA)
    Mutation(
        "freeze-no-grad-mask", FREEZE, "gradient hook does not zero the frozen gradients (mask dropped)",
        "                    if param.grad is not None:\n                        entry.fill_zero_(_local(param.grad))",
        "                    if param.grad is not None:\n                        pass",
        T_FREEZE,
    ),
    Mutation(
        "freeze-no-restore", FREEZE, "frozen entries not written back after the optimizer step",
        "            entry.write_(_local(entry.param), entry.saved)\n", "            pass\n",
        T_FREEZE,
    ),
    Mutation(
        "freeze-cols-axis", FREEZE, "column masks zeroed along rows (axis swap)",
        'self._view(t).index_fill_(1 if self.kind == "cols" else 0, self.index, 0)',
        "self._view(t).index_fill_(0, self.index, 0)",
        T_FREEZE,
    ),
    Mutation(
        "freeze-train-only-not-inverted", FREEZE, "train_only freezes the mask instead of its complement",
        'frozen = ~dense if mode == "train_only" else dense', "frozen = dense",
        T_FREEZE,
    ),
    # ---- judges and refusal counting
    Mutation(
        "judge-inverted", JUDGES, "keyword judge says refusal when no keyword matches",
        "refused = hit is not None", "refused = hit is None",
        T_JUDGES,
    ),
    Mutation(
        "judge-min-words-off-by-one", JUDGES, "length rule off by one (<= instead of <)",
        "short = count_words(response) < self.min_words", "short = count_words(response) <= self.min_words",
        T_JUDGES,
    ),
    Mutation(
        "judge-prefix-anywhere", JUDGES, "prefix judge matches anywhere in the response",
        "return next((k for k, f in zip(self.keywords, self._folded) if text.startswith(f)), None)",
        "return next((k for k, f in zip(self.keywords, self._folded) if f in text), None)",
        T_JUDGES,
    ),
    Mutation(
        "judge-case-ignored", JUDGES, "case-sensitive presets matched case-insensitively",
        "text = response if self.case_sensitive else response.lower()", "text = response.lower()",
        T_JUDGES,
    ),
    Mutation(
        "refusal-counts-compliances", REFUSAL, "summary counts compliances as refusals",
        "refused = sum(1 for v in verdicts if v.refused is True)",
        "refused = sum(1 for v in verdicts if v.refused is False)",
        T_EVAL,
    ),
    Mutation(
        "refusal-errors-as-compliance", REFUSAL, "undecided verdicts (judge errors) counted as compliances",
        "complied = sum(1 for v in verdicts if v.refused is False)",
        "complied = sum(1 for v in verdicts if v.refused is not True)",
        T_EVAL,
    ),
    Mutation(
        "refusal-over-refusal-from-harmful", REFUSAL, "over-refusal rate read from the harmful set",
        'metrics[f"over_refusal_rate/{name}"] = _rate(summary.refusal_rate)',
        'metrics[f"over_refusal_rate/{name}"] = _rate(summaries[name].refusal_rate)',
        T_EVAL,
    ),
]  # fmt: skip


def _copy_tree(dst: str) -> None:
    ignore = shutil.ignore_patterns(".git", "__pycache__", "*.pyc", ".pytest_cache", "outputs", "*.egg-info", ".venv")
    for item in ("peft_safety", "tests", "benchmarks", "examples", "docs", "pyproject.toml", "README.md"):
        src = os.path.join(ROOT, item)
        if os.path.isdir(src):
            shutil.copytree(src, os.path.join(dst, item), ignore=ignore)
        elif os.path.exists(src):
            shutil.copy2(src, os.path.join(dst, item))


def _pytest(copy: str, tests: list[str], timeout: float) -> tuple[str, list[str], float, str]:
    env = dict(os.environ, PYTHONPATH=copy, PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "--no-header", *tests]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return "timeout", [], time.perf_counter() - start, ""
    seconds = time.perf_counter() - start
    out = proc.stdout + proc.stderr
    failed = sorted(set(re.findall(r"^(?:FAILED|ERROR) (\S+)", out, flags=re.MULTILINE)))
    return ("passed" if proc.returncode == 0 else "failed"), failed, seconds, out[-3000:]


def run(mutations: list[Mutation], timeout: float, verbose: bool) -> list[dict]:
    results = []
    with tempfile.TemporaryDirectory(prefix="mutation_check_") as copy:
        _copy_tree(copy)
        baseline: dict[tuple[str, ...], str] = {}
        for m in mutations:
            key = tuple(m.tests)
            if key not in baseline:
                status, failed, seconds, out = _pytest(copy, m.tests, timeout)
                baseline[key] = status
                print(f"[baseline] {' '.join(m.tests)}: {status} ({seconds:.0f} s)", flush=True)
                if status != "passed" and verbose:
                    print(out)
            path = os.path.join(copy, m.path)
            with open(path, encoding="utf-8") as fh:
                original = fh.read()
            row = {**asdict(m), "status": None, "failed_tests": [], "seconds": 0.0}
            count = original.count(m.find)
            if count != 1:
                row["status"] = "stale"
                row["detail"] = f"source text found {count} times (expected once)"
            elif baseline[key] != "passed":
                row["status"] = "baseline_failed"
            else:
                mutated = original.replace(m.find, m.replace)
                try:
                    compile(mutated, path, "exec")
                    with open(path, "w", encoding="utf-8") as fh:
                        fh.write(mutated)
                    status, failed, seconds, out = _pytest(copy, m.tests, timeout)
                finally:
                    with open(path, "w", encoding="utf-8") as fh:
                        fh.write(original)
                row["status"] = {"failed": "caught", "passed": "survived", "timeout": "timeout"}[status]
                row["failed_tests"] = failed
                row["seconds"] = round(seconds, 1)
                if verbose and status == "passed":
                    print(out)
            print(f"{row['status']:>9}  {m.name:38s} {row['seconds']:6.1f} s  {', '.join(row['failed_tests'])}",
                  flush=True)  # fmt: skip
            results.append(row)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default="", help="comma-separated mutation names (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per pytest run")
    parser.add_argument("--out", default=DEFAULT_OUT, help="JSON results file")
    parser.add_argument("--verbose", action="store_true", help="print pytest output of survivors")
    args = parser.parse_args(argv)
    chosen = MUTATIONS
    if args.only:
        names = [n for n in args.only.split(",") if n]
        unknown = sorted(set(names) - {m.name for m in MUTATIONS})
        if unknown:
            parser.error(f"--only: unknown mutations {unknown}; see --list")
        chosen = [m for m in MUTATIONS if m.name in names]
    if args.list:
        for m in chosen:
            print(f"{m.name:38s} {m.path:36s} {m.breakage}  [{' '.join(m.tests)}]")
        return 0
    prov = _bench.provenance(threads=1)
    started = time.perf_counter()
    results = run(chosen, args.timeout, args.verbose)
    if args.only and os.path.exists(args.out):  # a partial run updates its rows in the existing file
        import json

        with open(args.out, encoding="utf-8") as fh:
            previous = json.load(fh)
        merged = {r["name"]: r for r in previous.get("mutations", [])}
        merged.update({r["name"]: r for r in results})
        order = [m.name for m in MUTATIONS]
        results = [merged[n] for n in order if n in merged]
    counts = {s: sum(r["status"] == s for r in results) for s in ("caught", "survived", "timeout", "stale")}
    payload = {
        "benchmark": "mutation_check",
        "summary": {**counts, "total": len(results), "wall_s": round(time.perf_counter() - started, 1)},
        "mutations": results,
        "provenance": _bench.finish(prov),
    }
    _bench.write_json(args.out, payload)
    print(f"caught {counts['caught']}, survived {counts['survived']}, timeout {counts['timeout']}, "
          f"stale {counts['stale']} of {len(results)} -> {args.out}")  # fmt: skip
    bad = counts["survived"] + counts["stale"] + sum(r["status"] == "baseline_failed" for r in results)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
