"""Render the published tables of README.md, docs/ and benchmarks/README.md from the committed result files.

Every table (and the README's results paragraph) sits between markers that this script rewrites::

    <!-- table:NAME -->
    ...generated...
    <!-- /table -->

``NAME`` is a key of `TABLES`; each renderer reads only committed JSON (paths in `SOURCES`), so every published
figure can be traced to the file and the run that produced it. ``tests/test_published_numbers.py`` checks that each
cited result file exists and that every generated block equals what this script renders now.

```bash
python benchmarks/tables.py            # rewrite the blocks in place
python benchmarks/tables.py --check    # exit 1 (and name the blocks) if a document is out of date
```
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import statistics
import sys
import textwrap
from collections.abc import Callable
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCUMENTS = (
    "README.md",
    "benchmarks/README.md",
    *sorted(f"docs/{n}" for n in os.listdir(os.path.join(ROOT, "docs")) if n.endswith(".md")),
)
MARKER = re.compile(r"(<!-- table:([a-z0-9_]+) -->\n)(.*?)(<!-- /table -->)", re.DOTALL)

#: table name -> the committed result files it reads (relative to the repository root)
SOURCES: dict[str, tuple[str, ...]] = {
    "readme_results": ("docs/results/main_job.json",),
    "main_job": ("docs/results/main_job.json",),
    "main_job_timings": ("docs/results/main_job.json",),
    "reproduce_stability": ("benchmarks/results/reproduce_stability.json",),
    "reproduce_stability_pairs": ("benchmarks/results/reproduce_stability.json",),
    "reproduce_set": ("benchmarks/results/reproduce_set.json",),
    "reproduce_spa": ("benchmarks/results/reproduce_spa.json",),
    "reproduce_attack": ("benchmarks/results/reproduce_attack.json",),
    "bench_summary": (
        "benchmarks/results/selection.json",
        "benchmarks/results/scoring.json",
        "benchmarks/results/spa_training.json",
        "benchmarks/results/set_adapter.json",
        "benchmarks/results/masked_lora.json",
    ),
    "bench_scoring": ("benchmarks/results/scoring.json",),
    "bench_selection": ("benchmarks/results/selection.json",),
    "bench_selection_out_of_core": ("benchmarks/results/selection_out_of_core.json",),
    "memory_measured": ("benchmarks/results/memory.json",),
    "memory_projection": ("benchmarks/results/memory.json",),
    "bench_spa_training": ("benchmarks/results/spa_training.json",),
    "bench_set_adapter": ("benchmarks/results/set_adapter.json",),
    "bench_masked_lora": ("benchmarks/results/masked_lora.json",),
    "tuner_trade": ("benchmarks/results/masked_lora.json", "benchmarks/results/set_adapter.json"),
    "mutation_check": ("benchmarks/results/mutation_check.json",),
    "bench_defenses": ("benchmarks/results/defenses.json",),
    "preserve_full": (
        "benchmarks/results/preserve_full/preserve.json",
        "benchmarks/results/preserve_combined/preserve.json",
    ),
    "preserve_seeds": (
        "benchmarks/results/preserve_seeds/preserve.json",
        "benchmarks/results/preserve/preserve.json",
        "benchmarks/results/preserve_combined/preserve.json",
    ),
    "preserve_attempts": (
        "benchmarks/results/preserve_attempts/dense_20steps.partial.json",
        "benchmarks/results/preserve_attempts/sparse_20steps.partial.json",
    ),
    **dict.fromkeys(
        ("preserve_setup", "preserve_benign", "preserve_attack"), ("benchmarks/results/preserve/preserve.json",)
    ),
    **dict.fromkeys(
        ("preserve_verdict", "preserve_claims", "readme_preserve"),
        ("benchmarks/results/preserve_combined/preserve.json",),
    ),
}


def load(path: str) -> dict[str, Any]:
    with open(os.path.join(ROOT, path), encoding="utf-8") as fh:
        return json.load(fh)


def pct(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None else f"{100 * x:.{digits}f}%"


def num(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:,.{digits}f}"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def spread(stats: dict[str, Any], scale: float = 1.0, digits: int = 3, unit: str = "s") -> str:
    """``median (IQR lo-hi, n=repeats)`` of a `_bench.stats` block."""
    lo, hi = stats["iqr_s"]
    return (
        f"{scale * stats['median_s']:.{digits}f} {unit} (IQR {scale * lo:.{digits}f}-{scale * hi:.{digits}f}, "
        f"n={stats['repeats']})"
    )


def prov_line(data: dict[str, Any]) -> str:
    p = data.get("provenance") or {}
    if not p:
        return ""
    load_avg = p.get("load_average_start") or [None]
    commit = (p.get("git_commit") or "?")[:10]
    return (
        f"Run: `{p.get('command')}` at commit {commit}, torch {p.get('torch')}, {p.get('machine')}, "
        f"{p.get('threads')} thread(s), load average {load_avg[0]:.1f} at the start, {p.get('started')}.\n"
    )


# ----------------------------------------------------------------------------------------------------- main job
def readme_results() -> str:
    d = load("docs/results/main_job.json")
    rows = {r["stage"]: r for r in d["rows"]}
    base, set_, lora, spa = rows["baseline"], rows["SET"], rows["SET+LoRA"], rows["SET+SPA-LoRA"]
    minutes = d["timings"]["total"] / 60
    text = (
        f"On 2 CPU cores ({minutes:.1f} min of pipeline time, `docs/results.md`, `docs/results/main_job.json`; one "
        f"seed, {d['config']['n_eval']} prompts per set): a 1% ESI mask trained with SET for "
        f"{d['config']['set_steps']} steps takes refusal of held-out HarmBench prompts from "
        f"{pct(base['refusal_wei2024'])} to {pct(set_['refusal_wei2024'])} (Wei et al.'s keywords; attack success "
        f"{pct(base['attack_success_wei2024_min20'])} -> {pct(set_['attack_success_wei2024_min20'])}) with "
        f"multiple-choice accuracy {pct(base['mc_accuracy'])} -> {pct(set_['mc_accuracy'])}, at the cost of more "
        f"keyword-judged refusals of benign prompts ({pct(base['over_refusal_wei2024'])} -> "
        f"{pct(set_['over_refusal_wei2024'])} by the same keywords; the baseline's rate is keyword false positives on "
        f"chatty answers). {d['config']['spa_steps']} steps of benign LoRA fine-tuning then erode most of it, and "
        f"SPA-LoRA (the mask frozen exactly) keeps only a little more (refusal {pct(spa['refusal_wei2024'])} vs "
        f"{pct(lora['refusal_wei2024'])}, task perplexity {num(spa['task_ppl'])} vs {num(lora['task_ppl'])}): "
        "freezing the mask is a guarantee about those weights, not about the behaviour."
    )
    return textwrap.fill(text, width=118, break_on_hyphens=False) + "\n"


def main_job() -> str:
    d = load("docs/results/main_job.json")
    # the model-output judge's columns (rate [95% Wilson interval]), where the run measured them
    judged = [k for k in ("refusal_classifier", "over_refusal_classifier", "lookalike_over_refusal_classifier")
              if k in d["rows"][0]]  # fmt: skip
    names = {"refusal_classifier": "refusal", "over_refusal_classifier": "over-refusal",
             "lookalike_over_refusal_classifier": "look-alike over-refusal"}  # fmt: skip

    def ci(r: dict[str, Any], key: str) -> str:
        low, high = r.get(f"{key}_ci") or (None, None)
        return pct(r[key]) if low is None else f"{pct(r[key])} [{100 * low:.0f}-{100 * high:.0f}]"

    header = ["model", *(f"{names[k]} ({d['rows'][0].get('judge', 'classifier')})" for k in judged),
              "refusal (wei2024)", "ASR (wei2024, >=20 words)", "refusal (gcg_extended)", "refusal (prefix)",
              "over-refusal (wei2024)", "over-refusal (gcg_extended)", "benign ppl", "task ppl", "MC acc",
              "repetitive (harmful)"]  # fmt: skip
    rows = [
        [r["stage"], *(ci(r, k) for k in judged), pct(r["refusal_wei2024"]), pct(r["attack_success_wei2024_min20"]),
         pct(r["refusal_gcg_extended"]), pct(r["refusal_prefix"]), pct(r["over_refusal_wei2024"]),
         pct(r["over_refusal_gcg_extended"]), num(r["benign_ppl"]), num(r["task_ppl"]), pct(r["mc_accuracy"]),
         pct(r["repetition_harmful"])]
        for r in d["rows"]
    ]  # fmt: skip
    return table(header, rows)


def main_job_timings() -> str:
    t = load("docs/results/main_job.json")["timings"]
    rows = [
        ["baseline evaluation", num(t["eval_baseline"], 1)],
        ["ESI scoring + global selection", num(t["score_and_select"], 1)],
        ["benign answers for the SET mix", num(t["set_retain_answers"], 1)],
        ["SET training", num(t["set_train"], 1)],
        ["evaluation after SET", num(t["eval_set"], 1)],
        ["plain LoRA training / evaluation", f"{num(t['train_SET+LoRA'], 1)} / {num(t['eval_SET+LoRA'], 1)}"],
        ["SPA-LoRA training / evaluation", f"{num(t['train_SET+SPA-LoRA'], 1)} / {num(t['eval_SET+SPA-LoRA'], 1)}"],
        ["total", num(t["total"], 1)],
    ]
    return table(["stage", "seconds"], rows)


# ----------------------------------------------------------------------------------------------- reproduction
def _source_of(label: str) -> str:
    return label.split("/")[0]


def reproduce_stability() -> str:
    d = load("benchmarks/results/reproduce_stability.json")
    rows = []
    for scorer, r in d["scorers"].items():
        name = "snip (abs_of_sum)" if scorer == "snip" else scorer
        for stage in ("before_isolation", "after_isolation"):
            s = r[stage]
            dens = list(s["density"].values())
            density = pct(dens[0], 2) if max(dens) - min(dens) < 1e-6 else f"{pct(min(dens), 2)}-{pct(max(dens), 2)}"
            rows.append([name, stage.split("_")[0], f"{s['mean_iou']:.3f}", f"{s['min_iou']:.3f}",
                         f"{s['mean_iou_same_data_seeds']:.3f}", f"{s['mean_iou_across_data']:.3f}",
                         f"{s['core']:,} / {s['union']:,} ({s['core_fraction']:.3f})", density])  # fmt: skip
    header = ["scorer", "isolation", "mean IoU (all pairs)", "min IoU", "IoU, same source, other seed",
              "IoU, across sources", "core / union (core fraction)", "mask density"]  # fmt: skip
    return table(header, rows)


def reproduce_stability_pairs() -> str:
    d = load("benchmarks/results/reproduce_stability.json")
    short = {"uncensorbench_refusal": "U", "advbench+fixed": "A", "harmbench_val+fixed": "H"}
    order = [("U", "U"), ("A", "A"), ("H", "H"), ("A", "H"), ("U", "A"), ("U", "H")]
    rows = []
    for scorer, r in d["scorers"].items():
        for stage in ("before_isolation", "after_isolation"):
            s = r[stage]
            labels = [short.get(_source_of(x), _source_of(x)) for x in s["labels"]]
            groups: dict[tuple[str, str], list[float]] = {}
            for i, j in itertools.combinations(range(len(labels)), 2):
                key = tuple(sorted((labels[i], labels[j]), key="UAH".index))
                groups.setdefault(key, []).append(s["iou"][i][j])
            rows.append([scorer, stage.split("_")[0]] + [f"{statistics.mean(groups[k]):.3f}" if k in groups else "n/a"
                                                         for k in order])  # fmt: skip
    header = ["scorer", "isolation", "U-U (seeds)", "A-A (seeds)", "H-H (seeds)", "A-H", "U-A", "U-H"]
    return table(header, rows)


def _train_s(d: dict[str, Any], stage: str) -> str:
    value = d.get("timings", {}).get(f"train_{stage}")
    return "" if value is None else f"{value:.0f}"


def reproduce_set() -> str:
    d = load("benchmarks/results/reproduce_set.json")
    header = ["model", "refusal wei2024", "refusal gcg_extended", "refusal prefix", "over-refusal wei2024",
              "over-refusal gcg_extended", "benign ppl", "task ppl", "MC acc", "train s"]  # fmt: skip
    rows = [
        [r["stage"], pct(r["refusal_wei2024"]), pct(r["refusal_gcg_extended"]), pct(r["refusal_prefix"]),
         pct(r["over_refusal_wei2024"]), pct(r["over_refusal_gcg_extended"]), num(r["benign_ppl"]),
         num(r["task_ppl"]), pct(r["mc_accuracy"]), _train_s(d, r["stage"])]
        for r in d["rows"]
    ]  # fmt: skip
    return table(header, rows)


def reproduce_spa() -> str:
    d = load("benchmarks/results/reproduce_spa.json")
    header = ["model", "refusal wei2024", "refusal gcg_extended", "refusal prefix", "attack success wei2024_min20",
              "over-refusal wei2024", "benign ppl", "task ppl", "MC acc", "train s"]  # fmt: skip
    rows = [
        [r["stage"], pct(r["refusal_wei2024"]), pct(r["refusal_gcg_extended"]), pct(r["refusal_prefix"]),
         pct(r["attack_success_wei2024_min20"]), pct(r["over_refusal_wei2024"]), num(r["benign_ppl"]),
         num(r["task_ppl"]), pct(r["mc_accuracy"]), _train_s(d, r["stage"])]
        for r in d["rows"]
    ]  # fmt: skip
    return table(header, rows)


def reproduce_attack() -> str:
    d = load("benchmarks/results/reproduce_attack.json")
    header = ["model", "refusal wei2024", "refusal gcg_extended", "refusal prefix", "over-refusal wei2024",
              "benign ppl", "task ppl", "MC acc", "train s"]  # fmt: skip
    rows = [
        [r["stage"], pct(r["refusal_wei2024"]), pct(r["refusal_gcg_extended"]), pct(r["refusal_prefix"]),
         pct(r["over_refusal_wei2024"]), num(r["benign_ppl"]), num(r["task_ppl"]), pct(r["mc_accuracy"]),
         _train_s(d, r["stage"])]
        for r in d["rows"]
    ]  # fmt: skip
    out = table(header, rows)
    out += (
        f"\nRefusal drop (wei2024): plain LoRA {100 * d['refusal_drop_plain_lora']:.1f} points, SPA-LoRA "
        f"{100 * d['refusal_drop_spa_lora']:.1f} points; share of the degradation SPA prevented: "
        f"{pct(d['fraction_of_degradation_prevented'], 0)}.\n"
    )
    return out


# ------------------------------------------------------------------------------------------------- benchmarks
def bench_summary() -> str:
    sel, sc = load("benchmarks/results/selection.json"), load("benchmarks/results/scoring.json")
    spa, st, ml = (load(f"benchmarks/results/{n}.json") for n in ("spa_training", "set_adapter", "masked_lora"))
    r = sc["results"]
    spa_rows = {row["mask"]: row for row in spa["rows"]}
    set_rows = {row["variant"]: row for row in st["results"]}
    ml_rows = {row["granularity"]: row for row in ml["results"]}
    rows = [
        ["`selection.py`", "global top-1%: ours (radix threshold, chunked) vs `torch.cat` + `torch.topk`",
         f"{sel['config']['numel']:,} scores in {sel['config']['tensors']} tensors: ours "
         f"{sel['timing']['ours']['median_s']:.3f} s, naive {sel['timing']['naive']['median_s']:.3f} s (median of "
         f"{sel['timing']['ours']['repeats']}; naive/ours {sel['time_ratio_naive_over_ours']:.2f}x); peak extra "
         f"memory {sel['ours']['peak_extra_bytes'] / 2**20:.1f} vs {sel['naive']['peak_extra_bytes'] / 2**20:.1f} MiB; "
         f"same selection: {sel['same_selection']}", "`results/selection.json`"],
        ["`scoring.py`", "plain forward+backward vs our snip/esi vs the reference loops (medians, same process)",
         f"{sc['config']['num_hidden_layers']}-layer Llama ({sc['config']['params'] / 1e6:.1f}M params), "
         f"{sc['config']['rows']} rows, batch {sc['config']['batch_size']}: ESI "
         f"{r['ours_esi']['ratio_vs_plain']:.2f}x and SNIP abs-of-sum {r['ours_abs_of_sum']['ratio_vs_plain']:.2f}x plain "
         f"fwd+bwd; per-sample SNIP {r['ours_sum_of_abs']['ratio_vs_plain']:.2f}x (reference per-sample loop "
         f"{r['reference_per_sample']['ratio_vs_plain']:.2f}x, per-layer loop measured "
         f"{r['reference_per_layer']['ratio_vs_plain']:.2f}x)", "`results/scoring.json`"],
        ["`spa_training.py`", "SPA full fine-tuning step and Freezer memory vs plain full fine-tuning",
         f"weight mask {spa_rows['weight']['ratio']:.2f}x plain (Freezer work "
         f"{1000 * spa_rows['weight']['freezer_work_s']:.1f} ms/step, extra memory "
         f"{pct(spa_rows['weight']['extra_memory_fraction'])} of the weights), neuron mask "
         f"{spa_rows['neuron']['ratio']:.2f}x ({1000 * spa_rows['neuron']['freezer_work_s']:.2f} ms, "
         f"{pct(spa_rows['neuron']['extra_memory_fraction'])}); frozen entries bit-identical: "
         f"{all(x['exact'] for x in spa['rows'])}", "`results/spa_training.json`"],
        ["`set_adapter.py`", "SET adapter vs frozen base, the previous dense half-precision pass, dense masked "
         "gradient, dense merged copy",
         "SET step " + ", ".join(f"{r['model']} {r['dtype']} {r['ratio_wall']['set']['median']:.2f}x"
                                 for r in st["runs"]) + " the frozen step (matmul FLOPs "
         + ", ".join(f"{r['flops_vs_frozen']['set']:.2f}x" for r in st["runs"]) + "); optimizer+gradient state "
         f"{set_rows['set']['state_MiB']:.1f} MiB vs {set_rows['dense_mask']['state_MiB']:.0f} MiB for a dense "
         "gradient mask", "`results/set_adapter.json`"],
        ["`masked_lora.py`", "masked LoRA (SPA) step vs plain LoRA: default and dense weight-mask paths, other "
         "granularities, density sweep",
         "1% weight masks, default path: " + ", ".join(f"{r['model']} {r['dtype']} {r['ratio_wall']['default']['median']:.2f}x"
                                                      for r in ml["runs"]) + " plain LoRA (dense path "
         + ", ".join(f"{r['ratio_wall']['dense']['median']:.2f}x" for r in ml["runs"]) + "); "
         + ", ".join(f"{g} {ml_rows[g]['ratio_wall']['masked']['median']:.2f}x" for g in ml_rows),
         "`results/masked_lora.json`"],
    ]  # fmt: skip
    return table(["benchmark", "compares", "result (medians; details below)", "JSON"], rows)


def bench_scoring() -> str:
    d = load("benchmarks/results/scoring.json")
    rows = [
        [f"`{name}`", spread(r), f"{r['min_s']:.3f}-{r['max_s']:.3f} s", f"{r['ratio_vs_plain']:.2f}x"]
        for name, r in d["results"].items()
    ]
    c = d["config"]
    head = (
        f"{c['model_class']} ({c['params']:,} parameters, {c['num_hidden_layers']} layers), {c['rows']} rows of up "
        f"to {c['max_length']} tokens ({c['tokens']:,} tokens), batch {c['batch_size']}; {c['repeats']} rounds after "
        f"{c['warmup_rounds']} warm-up round, methods interleaved with rotating order.\n\n"
    )
    verdicts = []
    for key, label in (("ours_esi", "ESI"), ("ours_abs_of_sum", "batched SNIP (abs_of_sum)")):
        ratio = d["results"][key]["ratio_vs_plain"]
        verdicts.append(f"{label} {ratio:.2f}x ({'within' if ratio <= 1.15 else 'above'} the target)")
    target = "Against the 1.15x plain forward+backward target: " + ", ".join(verdicts) + "."
    if "reference_per_sample" in d["results"]:
        per_sample = d["results"]["ours_sum_of_abs"]["ratio_vs_reference_per_sample"]
        target += (
            f" The exact per-sample SNIP takes {per_sample:.2f}x the reference per-sample loop "
            f"({'slower' if per_sample > 1 else 'faster'}; not profiled)."
        )
    target += "\n"
    return (
        head
        + table(["method", "median (IQR)", "min-max", "x plain fwd+bwd"], rows)
        + "\n"
        + target
        + "\n"
        + prov_line(d)
    )


def bench_selection() -> str:
    d = load("benchmarks/results/selection.json")
    c = d["config"]
    rows = []
    for key, label in (("ours", "ours (radix, chunked)"), ("naive", "naive cat + topk")):
        mem = d[key]["peak_extra_bytes"]
        rows.append([label, spread(d["timing"][key]), f"{mem / 2**20:.1f} MiB",
                     f"{mem / c['largest_tensor_bytes']:.2f}"])  # fmt: skip
    head = (
        f"{c['numel']:,} fp32 scores in {c['tensors']} tensors (largest {c['largest_tensor_bytes'] / 2**20:.1f} MiB), "
        f"k = {c['k']:,}; time: both methods in one process, interleaved; memory: one fresh subprocess per method. "
        f"Same selection: {d['same_selection']}.\n\n"
    )
    return (
        head
        + table(["method", "time, median (IQR)", "peak extra memory", "x largest tensor"], rows)
        + "\n"
        + prov_line(d)
    )


def bench_selection_out_of_core() -> str:
    d = load("benchmarks/results/selection_out_of_core.json")
    c = d["config"]
    largest = c["largest_tensor_bytes"]
    rows = []
    for kind, label in (("read", "one read pass"), ("select", "select (default: one-read buffer)"),
                        ("histogram", "select (two-pass histogram, forced)")):  # fmt: skip
        times = [r["time_s"] for r in d["runs"][kind]]
        peak = d["peak_extra_bytes"][kind]
        cpu = d.get("median_cpu_s", {}).get(kind)
        rows.append([label, f"{d['median_s'][kind]:.2f} s ({min(times):.2f}-{max(times):.2f}, n={len(times)})",
                     f"{d['median_s'][kind] / d['median_s']['read']:.2f}", "n/a" if cpu is None else f"{cpu:.2f} s",
                     f"{peak / 2**20:,.0f} MiB", f"{peak / largest:.2f}"])  # fmt: skip
    head = (
        f"{c['numel']:,} fp32 scores ({c['score_bytes'] / 2**30:.2f} GiB) in {c['tensors']} tensors and {c['files']} "
        f"files, largest tensor {largest / 2**20:,.0f} MiB; global top {c['fraction']:g} (k = {c['k']:,}). Every pass "
        f"reads the disk (pages evicted before each run and once read); runs alternate, fresh process each. "
        f"Same mask as in-memory `select`: {d['same_as_in_memory']}.\n\n"
    )
    header = ["run", "time, median (min-max)", "x read pass", "CPU time, median", "peak extra memory",
              "x largest tensor"]  # fmt: skip
    return head + table(header, rows) + "\n" + prov_line(d)


def memory_measured() -> str:
    d = load("benchmarks/results/memory.json")
    c = d["config"]
    rows = []
    for r in d["measured"]:
        state = 4 * r["local_scored"]
        rows.append([r["model"], f"`{r['method']}`", str(r["world"]), str(r["rank"]), f"{r['local_scored']:,}",
                     f"{r['local_weight_bytes'] / 2**20:,.1f}", f"{r['score_peak_extra_bytes'] / 2**20:,.1f}",
                     f"{state / 2**20:,.1f}", f"{(r['score_peak_extra_bytes'] - state) / 2**20:,.1f}",
                     f"{r['select_peak_extra_bytes'] / 2**20:,.1f}"])  # fmt: skip
    head = (
        f"{c['rows']} calibration rows of at most {c['max_length']} tokens, batch {c['batch_size']}, "
        f"{c['threads']} thread(s); sharded runs: FSDP2 `fully_shard` over {c['world']} CPU processes (gloo). Peak "
        "extra memory of each phase in a fresh process (VmHWM after - VmRSS before; MiB).\n\n"
    )
    header = ["model", "scorer", "ranks", "rank", "scored entries held", "weights held", "score: peak extra",
              "of which fp32 state (4 B/entry)", "rest", "select 1%: peak extra"]  # fmt: skip
    lines = []
    for m, v in d["projection"]["coefficients"].items():
        rest = ", ".join(f"{v2 / 2**20:,.0f} MiB with {w} rank(s)" for w, v2 in v["rest_bytes_by_world"].items())
        lines.append(f"* `{m}` on {v['model']}: the rest of the scoring peak is {rest}; selection "
                     f"{v['select_bytes_per_local_entry']:.3f} bytes per entry held.")  # fmt: skip
    return head + table(header, rows) + "\n" + "\n".join(lines) + "\n\n" + prov_line(d)


def memory_projection() -> str:
    d = load("benchmarks/results/memory.json")
    p = d["projection"]
    rows = []
    for name, m in p["models"].items():
        g = m["per_rank_gib"]
        rows.append([f"Llama-2 {name}", f"{m['parameters'] / 1e9:.1f} B", f"{g['weights']:.1f}",
                     f"{g['layer_working_set']:.1f}", f"{g['fp32_state']:.1f}", f"{g['activations']:.1f}",
                     f"**{g['scoring_total']:.1f}**", f"{g['selection_extra']:.2f}", "yes" if m["fits"] else "no",
                     f"{m['unsharded_gib']:.0f}"])  # fmt: skip
    esi = p["coefficients"]["esi"]
    head = (
        f"ESI, bf16 weights, {p['world']} ranks of {p['gpu_gib']} GB, {p['tokens_per_batch']} tokens per batch, "
        f"activation checkpointing; fp32 state at {esi['state_bytes_per_entry']} bytes per scored entry, selection at "
        f"the measured {esi['select_bytes_per_local_entry']:.3f} bytes per entry ({esi['model']}, table above). GiB "
        "per rank.\n\n"
    )
    header = ["model", "parameters", "weights", "FSDP2 layer working set", "fp32 state", "activations (est.)",
              "scoring", "+ select 1%", f"fits {p['world']} x {p['gpu_gib']} GB", "one device, unsharded"]  # fmt: skip
    return head + table(header, rows) + "\n" + prov_line(d)


def bench_spa_training() -> str:
    d = load("benchmarks/results/spa_training.json")
    rows = [
        [r["mask"], f"{r['frozen_entries']:,}", spread(r["plain_step"]), spread(r["spa_step"]), f"{r['ratio']:.3f}",
         f"{1000 * r['freezer_work_s']:.3f}", pct(r["extra_memory_fraction"], 2), str(r["exact"])]
        for r in d["rows"]
    ]  # fmt: skip
    head = (
        f"Llama config {d['config']}, {d['steps']} timed steps (interleaved, alternating order), density "
        f"{d['density']}.\n\n"
    )
    header = ["mask", "frozen entries", "plain step", "SPA step", "ratio", "Freezer ms/step", "extra memory / W",
              "exact"]  # fmt: skip
    return head + table(header, rows) + "\n" + prov_line(d)


def _paired(block: dict[str, Any], name: str, kind: str = "wall", digits: int = 2) -> str:
    """``median [IQR]`` of the per-round ratios of ``name`` in a `_bench.paired_rounds` block."""
    r = block[f"ratio_{kind}"][name]
    return f"{r['median']:.{digits}f} [{r['iqr'][0]:.{digits}f}-{r['iqr'][1]:.{digits}f}]"


def _threads_line(d: dict[str, Any]) -> str:
    env = d.get("environment") or {}
    rounds = d["args"].get("rounds")
    return (
        f"Ratios: median [interquartile range] over {rounds} rounds of the per-round ratio (one step of every variant "
        f"per round, order rotating), wall-clock and process CPU time; {env.get('torch_threads')} torch threads, "
        f"OMP_WAIT_POLICY={env.get('omp_wait_policy')}, niceness {env.get('niceness')}.\n\n"
    )


def bench_set_adapter() -> str:
    d = load("benchmarks/results/set_adapter.json")
    variants = [v for v in d["runs"][0]["wall"] if v != "frozen"]
    rows = [
        [r["model"], r["dtype"], spread(r["wall"]["frozen"]), spread(r["wall"]["set"]), _paired(r, "set", digits=3),
         _paired(r, "set", "cpu", digits=3), *[_paired(r, v) for v in variants if v != "set"],
         f"{r['flops_vs_frozen']['set']:.2f} / " + " / ".join(f"{r['flops_vs_frozen'][v]:.2f}" for v in variants
                                                               if v != "set"),
         f"<= {r['target_max']}"]
        for r in d["runs"]
    ]  # fmt: skip
    others = [v for v in variants if v != "set"]
    header = ["model", "dtype", "frozen step", "SET step", "SET x frozen (wall)", "SET x frozen (CPU)",
              *[f"{v} x frozen" for v in others], "matmul FLOPs x frozen (SET / " + " / ".join(others) + ")",
              "target"]  # fmt: skip
    memory = [
        [r["variant"], f"{r['params']:,}", f"{r['trainable']:,}", f"{r['state_MiB']:.2f}", f"{r['peak_rss_MiB']:.0f}"]
        for r in d["results"]
    ]  # fmt: skip
    first = d["runs"][0]
    return (
        _threads_line(d)
        + table(header, rows)
        + f"\nMemory ({first['model']}, fp32, each variant in its own process):\n\n"
        + table(["variant", "params", "trainable", "state MiB", "peak RSS MiB"], memory)
        + "\n"
        + prov_line(d)
    )


def bench_masked_lora() -> str:
    d = load("benchmarks/results/masked_lora.json")
    rows = [
        [r["model"], r["dtype"], spread(r["wall"]["plain"]), spread(r["wall"]["default"]), _paired(r, "default"),
         _paired(r, "default", "cpu"), _paired(r, "dense"), _paired(r, "dense", "cpu"), f"<= {r['target_max']}"]
        for r in d["runs"]
    ]  # fmt: skip
    header = ["model", "dtype", "plain LoRA step", "default step", "default x plain (wall)", "default x plain (CPU)",
              "dense x plain (wall)", "dense x plain (CPU)", "target"]  # fmt: skip
    out = _threads_line(d) + table(header, rows)
    if d.get("results"):
        other = [
            [r["granularity"], r["model"], _paired(r, "masked"), _paired(r, "masked", "cpu"), f"<= {r['target_max']}"]
            for r in d["results"]
        ]  # fmt: skip
        out += "\n" + table(["mask", "model (fp32)", "masked x plain (wall)", "masked x plain (CPU)", "target"], other)
    if d.get("sweep"):
        sweep = [
            [pct(s["density"], 0), _paired(s, "sparse"), _paired(s, "sparse", "cpu"), _paired(s, "dense"),
             _paired(s, "dense", "cpu")]
            for s in d["sweep"]
        ]  # fmt: skip
        out += "\n" + table(
            ["weight-mask density", "sparse x plain (wall)", "sparse x plain (CPU)", "dense x plain (wall)",
             "dense x plain (CPU)"], sweep)  # fmt: skip
    return out + "\n" + prov_line(d)


def tuner_trade() -> str:
    """The exactness / speed trade of the weight-mask paths (docs/tuner.md), from the two tuner benchmarks."""
    ml, st = load("benchmarks/results/masked_lora.json"), load("benchmarks/results/set_adapter.json")
    columns = [f"{r['model']} {r['dtype']}" for r in ml["runs"]]
    set_runs = {f"{r['model']} {r['dtype']}": r for r in st["runs"]}
    rows = [
        ['masked LoRA, `entries_method="auto"` (default; `"sparse"` on CPU)', "within fp32 rounding (bounded)",
         "bit-exact", "plain LoRA step", *[_paired(r, "default") for r in ml["runs"]]],
        ['masked LoRA, `entries_method="dense"` (opt-in)', "bit-exact", "bit-exact", "plain LoRA step",
         *[_paired(r, "dense") for r in ml["runs"]]],
        ["SET (fold on fp32, sparse pass on bf16)", "bit-exact (the unmasked entries)", "bit-exact (the unmasked entries)",
         "frozen step", *[_paired(set_runs[c], "set", digits=3) if c in set_runs else "n/a" for c in columns]],
    ]  # fmt: skip
    header = ["path", "training forward on the frozen entries", "merged weights", "x", *columns]
    return table(header, rows) + "\n" + prov_line(ml) + prov_line(st)


# ------------------------------------------------------------------------------------------------ mutation check
def bench_defenses() -> str:
    d = load("benchmarks/results/defenses.json")
    rows = []
    for section in d["training"]:
        for r in section["rows"]:
            note = ""
            if r["arm"] == "lisa":
                note = f"alignment steps {r['alignment_ratio']:.2f}x, task steps {r['task_ratio']:.2f}x"
            rows.append([section["model"], r["arm"], spread(r["step"]), f"{r['ratio']:.2f}x", note])
    first = d["training"][0]
    head = (
        f"Time per optimizer step through `SafetySFTTrainer` (LoRA r=16 on q_proj/v_proj, batch {first['batch_size']}, "
        f"{first['steps_per_run'] - 1} timed steps per run x {first['rounds']} rounds, arms interleaved with rotating "
        f"order; max length: " + ", ".join(f"{s['model']} {s['max_length']}" for s in d["training"]) + " tokens).\n\n"
    )
    training = table(["model", "arm", "step, median (IQR)", "x plain LoRA", "note"], rows)
    post = d["posthoc"]
    prows = [
        [f"`{r['function']}`", r["what"], spread(r["time"]),
         ", ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}" for k, v in r["result"].items())]
        for r in post["rows"]
    ]  # fmt: skip
    setup = ", ".join(f"{k.removesuffix('_s').replace('_', ' ')} {v:.0f} s" for k, v in post["setup_s"].items())
    posthoc = (
        f"\nPost-hoc defenses on {post['model']} after a SET alignment and a LoRA fine-tune (setup, timed once: "
        f"{setup}):\n\n" + table(["function", "on", "wall time, median (IQR)", "what it did"], prows)
    )
    return head + training + posthoc + "\n" + prov_line(d)


def mutation_check() -> str:
    d = load("benchmarks/results/mutation_check.json")
    s = d["summary"]
    rows = []
    for m in d["mutations"]:
        caught_by = ", ".join(f"`{t.split('::')[-1]}`" for t in m["failed_tests"]) or "-"
        rows.append([f"`{m['name']}`", f"`{m['path'].split('/')[-1]}`", m["breakage"], m["status"], caught_by])
    head = (
        f"{s['caught']} caught, {s['survived']} survived, {s['timeout']} timed out, {s['stale']} stale, of "
        f"{s['total']} mutations ({sum(m['seconds'] for m in d['mutations']) / 60:.0f} min of targeted test runs).\n\n"
    )
    return head + table(["mutation", "module", "breakage", "status", "failing tests"], rows) + "\n" + prov_line(d)


# ------------------------------------------------------------------------------------------- preservation (issue 13)
PRESERVE = "benchmarks/results/preserve/preserve.json"
#: the main run pooled with the extra seeds and the full fine-tuning arms (``preserve.py --combine``)
PRESERVE_COMBINED = "benchmarks/results/preserve_combined/preserve.json"
ARM_LABELS = {
    "aligned": "aligned model (no fine-tuning)",
    "lora": "plain LoRA",
    "spa_esi": "SPA-LoRA, ESI 1% mask",
    "spa_random": "SPA-LoRA, random 1% mask",
    "spa_consensus": "SPA-LoRA, consensus mask",
    "sppft": "SPPFT (safety layers frozen)",
    "rsn_tune": "RSN-Tune (safety neurons frozen)",
    "replay": "LoRA + safety replay",
    "realign": "LoRA + post-hoc realignment",
    "full": "full fine-tuning",
    "spa_full": "SPA full fine-tuning, ESI mask",
}


def _pooled_sources(d: dict[str, Any]) -> str:
    """``main run + preserve_seeds + preserve_full``: the runs a pooled file was built from."""
    names = [os.path.basename(os.path.dirname(s["path"])) for s in d["combined_from"]]
    return " + ".join(f"`{n}`" for n in names)


def _ci(x: dict[str, Any] | None) -> str:
    """``46% [36-56]``: a rate with its 95% interval, in percent."""
    if not x or x.get("rate") is None:
        return "n/a"
    return f"{100 * x['rate']:.0f}% [{100 * x['low']:.0f}-{100 * x['high']:.0f}]"


def _p(row: dict[str, Any], against: str, key: str = "refusal/classifier") -> str:
    test = (row.get(against) or {}).get(key)
    if not test:
        return "-"
    p = test["p_value"]
    return f"{p:.2g}" if p >= 0.001 else "<0.001"


def _preserve_rows(section: str, path: str = PRESERVE) -> list[list[str]]:
    d = load(path)
    out = []
    for r in ([d["aligned"]] if section == "benign" else []) + d[section]:
        labels = r["harmful_labels"]
        loss = r["task_loss_ci"]
        out.append([
            ARM_LABELS.get(r["arm"], r["arm"]), "-" if r["arm"] == "aligned" else str(r["seed"]),
            _ci(r["refusal/classifier"]), f"{labels['refusal']}/{labels['compliant']}/{labels['non_answer']}",
            _ci(r["refusal/wei2024"]), _ci(r["attack_success/classifier_compliant"]),
            _ci(r["over_refusal/classifier"]), _ci(r["over_refusal_lookalike/classifier"]),
            f"{r['task_loss']:.3f} [{loss['low']:.3f}-{loss['high']:.3f}]", pct(r["mc_accuracy"], 0),
            _p(r, "vs_aligned"), _p(r, "vs_lora"), _p(r, "vs_lora", "task_loss"),
            "-" if "train_seconds" not in r else f"{r['train_seconds']:.0f}",
        ])  # fmt: skip
    return out


_PRESERVE_HEADER = [
    "arm", "seed", "refusal, classifier [95% CI]", "harmful: refusal/compliant/non-answer",
    "refusal, wei2024 keywords", "attack success (compliant)", "over-refusal, chat_pairs",
    "over-refusal, look-alikes", "task loss [95% CI]", "ARC-Easy", "p vs aligned (refusal)", "p vs LoRA (refusal)",
    "p vs LoRA (task loss)", "train s",
]  # fmt: skip


def preserve_setup() -> str:
    d = load(PRESERVE)
    c, n, j, m = d["config"], d["data"], d["judge"]["validation"], d["masks"]
    total = sum(d["timings"].values())
    evals = [r["eval_seconds"] for r in [d["aligned"], *d["benign"], *d["attack"]]]
    trains = [r["train_seconds"] for r in [*d["benign"], *d["attack"]]]
    lines = [
        f"* Model: `{c['model']}` (fp32, greedy decoding, {c['max_new_tokens']} new tokens, chat template).",
        f"* Benign fine-tuning: {n['n_task_train']} rows of `{c['task_sources']}` (multi-sentence answers), "
        f"{c['steps']} steps at batch {c['batch_size']}, {c['max_length']} tokens, LoRA r={c['lora_r']} "
        f"(alpha {2 * c['lora_r']}, all linear layers), lr {c['lr']} constant; seeds {c['seeds']} for "
        f"{', '.join(f'`{a}`' for a in c['multi_seed_arms'].split(','))}, seed {c['seeds'].split(',')[0]} for the "
        f"other arms; replay ratio {c['replay_ratio']}, realignment of the {pct(c['realign_fraction'], 0)} most-drifted "
        "ESI entries.",
        f"* Attack: {n['n_attack']} harmful (prompt, compliant answer) pairs, {c['attack_steps']} steps, arms "
        f"{', '.join(f'`{a}`' for a in c['attack_arms'].split(','))}.",
        f"* Evaluation: {n['n_harmful']} held-out HarmBench prompts, {n['n_benign']} `chat_pairs` and "
        f"{n['n_lookalike']} `benign_lookalike` prompts, {n['n_task_eval']} held-out task rows (mean NLL per answer "
        f"token), {n['n_mc']} ARC-Easy rows.",
        f"* Classifier judge on {j['n']} held-out labelled responses (topics never trained on): accuracy "
        f"{pct(j['accuracy'])}, Cohen's kappa {j['kappa']:.3f}. Its refusal rate counts non-answers as refusals; "
        "attack success counts compliant answers only.",
        f"* Masks (identification: {n['n_ident']} refusal rows): ESI {m['esi']['numel']:,} entries; random "
        f"{m['random']['numel']:,}; consensus of {m['consensus']['n_resamples']} bootstrap resamples at agreement "
        f"{c['consensus_agreement']}: {m['consensus']['numel']:,} entries (IoU with the ESI mask "
        f"{m['consensus']['iou_with_esi']:.3f}); SPPFT layers {m['sppft']['range'][0]}-{m['sppft']['range'][1]} "
        f"({m['sppft']['how']}); RSN-Tune {m['rsn_tune']['numel']:,} entries.",
        f"* Wall time {total / 60:.0f} min in all (the sum of the stage timings"
        + (f", over {1 + len(d['provenance']['sittings'])} sittings joined by `--resume`, each rebuilding the judge "
           "and masks" if d["provenance"].get("sittings") else "")
        + f"): evaluation {min(evals):.0f}-{max(evals):.0f} s per model, training {min(trains):.0f}-"
        f"{max(trains):.0f} s per arm; the script's estimate was {d['estimate_seconds']['total'] / 60:.0f} min.",
    ]  # fmt: skip
    return "\n".join(lines) + "\n\n" + prov_line(d)


def preserve_benign() -> str:
    return table(_PRESERVE_HEADER, _preserve_rows("benign"))


def preserve_attack() -> str:
    return table(_PRESERVE_HEADER, _preserve_rows("attack"))


def _mean_refusal(rows: list[dict[str, Any]], key: str = "refusal/classifier") -> float:
    return statistics.mean(r[key]["rate"] for r in rows)


def _by_arm(section: str, path: str = PRESERVE) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in load(path)[section]:
        out.setdefault(r["arm"], []).append(r)
    return out


def preserve_verdict() -> str:
    d = load(PRESERVE_COMBINED)
    rows = []
    for arm, v in d["verdict"].items():
        runs = _by_arm("benign", PRESERVE_COMBINED)[arm]
        ps = [(r.get("vs_lora") or {}).get("refusal/classifier", {}).get("p_value") for r in runs]
        sig = "-" if arm == "lora" else f"{sum(p is not None and p < 0.05 for p in ps)} of {len(ps)}"
        meets = (
            "reference" if v["meets_default_criterion"] is None else ("yes" if v["meets_default_criterion"] else "no")
        )
        rows.append([ARM_LABELS.get(arm, arm), str(v["seeds"]), pct(v["refusal"]), f"{-100 * v['refusal_drop']:+.1f}",
                     num(v["task_gain"], 3), "-" if v["share_of_lora_gain"] is None else pct(v["share_of_lora_gain"], 0),
                     sig, meets])  # fmt: skip
    base = d["aligned"]["refusal/classifier"]["rate"]
    winners = [ARM_LABELS.get(a, a) for a, v in d["verdict"].items() if v["meets_default_criterion"]]
    head = (
        f"All runs pooled ({_pooled_sources(d)}); mean over seeds; refusal by the classifier judge (aligned model: "
        f"{pct(base)}); task gain = drop of the held-out task loss from the aligned model's; criterion for the default "
        "recipe: refusal no more than 5 points below the aligned model's and >= 90% of plain LoRA's task gain.\n\n"
    )
    header = ["arm", "seeds", "refusal", "change vs aligned (points)", "task gain (nats/token)",
              "share of LoRA's gain", "seeds with p < 0.05 vs LoRA (McNemar)", "meets the criterion"]  # fmt: skip
    tail = (
        f"\n**Arms that meet the criterion: {', '.join(winners)}.** Mean over its seeds; see below for the spread.\n"
        if winners
        else "\n**No arm meets the criterion**: none keeps refusal within 5 points of the aligned model while reaching "
        "90% of plain LoRA's task gain, so there is no default recipe.\n"
    )
    return head + table(header, rows) + tail


def _drop(rows: list[dict[str, Any]], base: float) -> float:
    """Mean refusal change (points, negative = refusal lost) of ``rows`` against the aligned rate ``base``."""
    return 100 * (_mean_refusal(rows) - base)


def _sig_vs_lora(rows: list[dict[str, Any]]) -> tuple[int, int]:
    ps = [(r.get("vs_lora") or {}).get("refusal/classifier", {}).get("p_value") for r in rows]
    return sum(p is not None and p < 0.05 for p in ps), len(ps)


def _harmful_flags(row: dict[str, Any]) -> list[bool]:
    """Per-prompt classifier refusal of one run, read back from its committed JSONL generations."""
    path = os.path.join(ROOT, row["generations"])
    with open(path, encoding="utf-8") as fh:
        records = [json.loads(line) for line in fh if line.strip()]
    return [r["verdicts"]["classifier"]["refused"] for r in records if r["set"] == "harmful"]


def _keeps(arm: str, section: str, threshold: float, lora_drop: float, base: float) -> tuple[str, str]:
    rows = _by_arm(section, PRESERVE_COMBINED)[arm]
    drop = _drop(rows, base)
    k, n = _sig_vs_lora(rows)
    measured = (
        f"refusal {pct(base, 0)} -> {pct(_mean_refusal(rows), 0)} ({drop:+.1f} points; plain LoRA {lora_drop:+.1f}); "
        f"p < 0.05 vs plain LoRA in {k} of {n} seed(s)"
    )
    if -lora_drop <= threshold:
        return measured, f"not tested: plain LoRA itself stays within {threshold:g} points"
    if -drop <= threshold:
        return measured, "reproduces"
    if drop > lora_drop and 2 * k > n:
        return measured, f"partly: keeps more than plain LoRA, but not within {threshold:g} points"
    return measured, "does not reproduce"


def preserve_claims() -> str:
    d = load(PRESERVE_COMBINED)
    from peft_safety.evaluation.stats import mcnemar_exact

    base = d["aligned"]["refusal/classifier"]["rate"]
    benign = _by_arm("benign", PRESERVE_COMBINED)
    lora_drop = _drop(benign["lora"], base)
    rows = []
    claims = [("spa_esi", "SPA (ESI mask frozen) keeps safety within 1 point through benign fine-tuning",
               "ESI (Qi et al. 2026)", 1.0),
              ("rsn_tune", "RSN-Tune (safety neurons frozen) keeps safety through fine-tuning",
               "SN-Tune (Zhao et al. 2025)", 5.0),
              ("sppft", "SPPFT (safety layers frozen) keeps safety through fine-tuning",
               "Safety Layers (Li et al. 2024)", 5.0)]  # fmt: skip
    for arm, claim, paper, threshold in claims:
        if arm in benign:
            rows.append([claim, paper, *_keeps(arm, "benign", threshold, lora_drop, base)])
    if "spa_esi" in benign and "spa_random" in benign:
        tests, esi_ahead = [], 0
        for esi in benign["spa_esi"]:
            rnd = next((r for r in benign["spa_random"] if r["seed"] == esi["seed"]), None)
            if rnd is not None:
                esi_flags, rnd_flags = _harmful_flags(esi), _harmful_flags(rnd)
                tests.append(mcnemar_exact(esi_flags, rnd_flags).p_value)
                esi_ahead += sum(esi_flags) > sum(rnd_flags)
        diff = 100 * (_mean_refusal(benign["spa_esi"]) - _mean_refusal(benign["spa_random"]))
        significant = sum(p < 0.05 for p in tests)
        n = len(tests)
        verdict = (
            "reproduces" if diff > 0 and 2 * significant > n
            else f"does not reproduce: the random mask kept more refusal in {n - esi_ahead} of {n} seed(s)"
            if diff <= 0 and 2 * esi_ahead < n
            else "not shown: no significant difference" if significant == 0
            else "not shown: mixed across seeds"
        )  # fmt: skip
        rows.append(["the identified mask matters: freezing the ESI mask keeps more than a random mask of the same "
                     "size", "ESI (Qi et al. 2026)",
                     f"ESI {pct(_mean_refusal(benign['spa_esi']), 0)} vs random "
                     f"{pct(_mean_refusal(benign['spa_random']), 0)} ({diff:+.1f} points); exact McNemar p per seed "
                     + ", ".join(f"{p:.2g}" for p in tests), verdict])  # fmt: skip
    freezing = [a for a in ("spa_esi", "spa_random", "spa_consensus", "sppft", "rsn_tune") if a in benign]
    if freezing:
        kept = [a for a in freezing if -_drop(benign[a], base) <= 5.0]
        best = max(freezing, key=lambda a: _mean_refusal(benign[a]))
        rows.append([
            "constraining a parameter region is not enough to keep safety", "Li et al. 2026; Wei et al. 2024",
            f"best freezing arm: {ARM_LABELS[best]}, {_drop(benign[best], base):+.1f} points (plain LoRA "
            f"{lora_drop:+.1f})",
            ("not tested: plain LoRA itself stays within 5 points" if -lora_drop <= 5.0
             else "supported: no freezing arm stays within 5 points" if not kept
             else f"contradicted: {', '.join(ARM_LABELS[a] for a in kept)} stay within 5 points"),
        ])  # fmt: skip
    attack = _by_arm("attack", PRESERVE_COMBINED)
    if "lora" in attack and "spa_esi" in attack:
        a_lora, a_spa = _drop(attack["lora"], base), _drop(attack["spa_esi"], base)
        prevented = None if a_lora >= 0 else 1 - a_spa / a_lora
        rows.append([
            "freezing the safety-critical weights does not stop a harmful fine-tuning attack", "Wei et al. 2024",
            f"attack: refusal change plain LoRA {a_lora:+.1f} points, SPA-LoRA (ESI) {a_spa:+.1f} points",
            ("not tested: the attack did not lower refusal" if a_lora > -5.0
             else "reproduces" if prevented is not None and prevented < 0.5 else "does not reproduce"),
        ])  # fmt: skip
    return table(["claim", "paper", "measured here (classifier judge)", "verdict"], rows)


PRESERVE_FULL = "benchmarks/results/preserve_full/preserve.json"


def _identical_to_other_runs(path: str) -> str:
    """What ``--combine`` verified of the run in ``path`` against the other pooled runs (it refuses to pool runs whose
    settings, judge, masks, aligned generations or shared runs differ)."""
    pooled = load(PRESERVE_COMBINED)
    mine = load(path)
    keys = {f"{sec} {r['arm']} seed {r['seed']}" for sec in ("benign", "attack") for r in mine[sec]}
    shared = [k for k in pooled["checks"]["shared_runs_identical"] if k in keys]
    return (
        "`preserve.py --combine` checked that its aligned model's generations, its masks"
        + (f" and its shared runs ({', '.join(shared)})" if shared else "")
        + " are identical to the other runs'"
    )


def preserve_full() -> str:
    """The full fine-tuning arms (a separate run: plain LoRA seed 0 again as the reference), and whether the rows
    this run shares with the main run came out identical."""
    d = load(PRESERVE_FULL)
    c = d["config"]
    base = d["aligned"]["refusal/classifier"]["rate"]
    head = (
        f"Full fine-tuning updates every weight: {c['steps']} steps at lr {c['full_lr']} constant (LoRA: "
        f"{c['lr']}), batch {c['batch_size']}, {c['max_length']} tokens, seed {c['seeds']}, AdamW without weight "
        'decay; SPA full fine-tuning freezes the ESI 1% mask\'s entries (`safety_mode="freeze"`). A separate run '
        f"({sum(d['timings'].values()) / 60:.0f} min of stage time) with plain LoRA (seed {c['seeds']}) again as the "
        f"reference; {_identical_to_other_runs(PRESERVE_FULL)}.\n\n"
    )
    verdict = []
    for arm in ("full", "spa_full"):
        v = d["verdict"].get(arm)
        if v:
            verdict.append(
                f"* {ARM_LABELS[arm]}: refusal {pct(v['refusal'], 0)} ({-100 * v['refusal_drop']:+.1f} points from "
                f"{pct(base, 0)}), {pct(v['share_of_lora_gain'], 0)} of LoRA's task gain; meets the criterion: "
                + ("yes" if v["meets_default_criterion"] else "no")
                + "."
            )
    moved = [r.get("masked_entries_moved") for r in d["benign"] if r["arm"] == "spa_full"]
    tail = (
        "\n"
        + "\n".join(verdict)
        + (
            f"\n* Masked entries of the SPA full fine-tuned model that differ from the aligned model: {moved[0]}.\n"
            if moved
            else "\n"
        )
    )
    return head + table(_PRESERVE_HEADER, _preserve_rows("benign", PRESERVE_FULL)) + tail + "\n" + prov_line(d)


PRESERVE_SEEDS = "benchmarks/results/preserve_seeds/preserve.json"


def preserve_seeds() -> str:
    """Plain LoRA, replay and realignment over every seed of the pooled runs (seed 0 from the main run, seeds 1-2 from
    the extra-seeds run), each against plain LoRA of the same seed."""
    main, extra = load(PRESERVE), load(PRESERVE_SEEDS)
    pooled = _by_arm("benign", PRESERVE_COMBINED)
    runs = {arm: {r["seed"]: r for r in pooled[arm]} for arm in ("lora", "replay", "realign") if arm in pooled}
    rows = []
    for arm in ("lora", "replay", "realign"):
        if arm not in runs:
            continue
        for seed, r in sorted(runs[arm].items()):
            lab = r["harmful_labels"]
            rows.append([ARM_LABELS[arm], str(seed), _ci(r["refusal/classifier"]), str(lab["refusal"]),
                         str(lab["compliant"]), _ci(r["refusal/wei2024"]), _ci(r["over_refusal_lookalike/classifier"]),
                         f"{r['task_loss']:.3f}", _p(r, "vs_lora"), _p(r, "vs_lora", "refusal/wei2024")])  # fmt: skip
        mean = statistics.mean
        rs = list(runs[arm].values())
        rows.append([f"**{ARM_LABELS[arm]}, mean**", "-", pct(mean(r["refusal/classifier"]["rate"] for r in rs), 1),
                     num(mean(r["harmful_labels"]["refusal"] for r in rs), 1),
                     num(mean(r["harmful_labels"]["compliant"] for r in rs), 1),
                     pct(mean(r["refusal/wei2024"]["rate"] for r in rs), 1),
                     pct(mean(r["over_refusal_lookalike/classifier"]["rate"] for r in rs), 1),
                     f"{mean(r['task_loss'] for r in rs):.3f}", "", ""])  # fmt: skip
    extra_seeds = sorted({r["seed"] for r in extra["benign"]})
    head = (
        f"Seed 0 from the main run, seeds {', '.join(map(str, extra_seeds))} from a second run "
        f"({sum(extra['timings'].values()) / 60:.0f} min of stage time) with the same settings; "
        + _identical_to_other_runs(PRESERVE_SEEDS) + "."
        + " Aligned model: classifier refusal " + pct(main["aligned"]["refusal/classifier"]["rate"], 0)
        + f", {main['aligned']['harmful_labels']['refusal']} explicit refusals, keyword refusal "
        + pct(main["aligned"]["refusal/wei2024"]["rate"], 0) + ", look-alike over-refusal "
        + pct(main["aligned"]["over_refusal_lookalike/classifier"]["rate"], 0) + ".\n\n"
    )  # fmt: skip
    header = ["arm", "seed", "refusal, classifier [95% CI]", "explicit refusals (of 100)", "compliant (of 100)",
              "refusal, wei2024 keywords", "over-refusal, look-alikes", "task loss", "p vs LoRA (classifier)",
              "p vs LoRA (wei2024)"]  # fmt: skip
    return head + table(header, rows) + "\n" + prov_line(extra)


def readme_preserve() -> str:
    d = load(PRESERVE_COMBINED)
    base = d["aligned"]["refusal/classifier"]["rate"]
    benign, attack = _by_arm("benign", PRESERVE_COMBINED), _by_arm("attack", PRESERVE_COMBINED)
    minutes = [s["stage_seconds"] / 60 for s in d["combined_from"]]

    def arm(name: str, rows: dict[str, list[dict[str, Any]]]) -> str:
        v = d["verdict"].get(name) if rows is benign else None
        share = (
            ""
            if not v or v["share_of_lora_gain"] is None
            else f", {pct(v['share_of_lora_gain'], 0)} of LoRA's task gain"
        )
        seeds = len(rows[name])
        return f"{ARM_LABELS[name]} {pct(_mean_refusal(rows[name]), 0)}{share}" + (
            f" ({seeds} seeds)" if seeds > 1 else ""
        )

    others = [a for a in benign if a != "lora"]
    best = max(others, key=lambda a: _mean_refusal(benign[a]))
    winners = [ARM_LABELS[a] for a, v in d["verdict"].items() if v["meets_default_criterion"]]
    text = (
        f"On the aligned Qwen2.5-Coder-0.5B-Instruct (reduced protocol on 2 CPU cores: {minutes[0]:.0f} min for the "
        f"main run, {sum(minutes[1:]):.0f} min more for extra seeds and full fine-tuning; `docs/results.md`, "
        f"`{PRESERVE_COMBINED}`; {d['data']['n_harmful']} held-out HarmBench "
        f"prompts, classifier judge), the aligned model refuses {pct(base, 0)}. After {d['config']['steps']} steps "
        f"of benign fine-tuning: {arm('lora', benign)}; " + "; ".join(arm(a, benign) for a in others) + ". "
        + (f"The arm that keeps the most refusal is {ARM_LABELS[best]}"
           + (", the control, not an identified mask. " if best == "spa_random" else ". "))
        + (f"Arms meeting the default-recipe criterion (refusal no more than 5 points below the aligned model's, >= 90% "
            f"of LoRA's task gain): "
           f"{', '.join(winners)}. " if winners else
           "No arm keeps refusal within 5 points of the aligned model while reaching 90% of plain LoRA's task gain. ")
        + ("Under a harmful fine-tuning attack: " + "; ".join(arm(a, attack) for a in attack) + "." if attack else "")
    )  # fmt: skip
    return textwrap.fill(text, width=118, break_on_hyphens=False) + "\n"


def preserve_attempts() -> str:
    rows = []
    for name in ("dense_20steps", "sparse_20steps"):
        d = load(f"benchmarks/results/preserve_attempts/{name}.partial.json")
        lora = [r["train_seconds"] for r in d["benign"] if r["arm"] == "lora"]
        spa = [r["train_seconds"] for r in d["benign"] if r["arm"] == "spa_esi"]
        rows.append([f"`{name}.partial.json`", str(d["config"]["steps"]), d["config"].get("spa_entries_method") or "dense",
                     f"{statistics.mean(lora):.0f} (n={len(lora)})", f"{statistics.mean(spa):.0f} (n={len(spa)})",
                     f"{statistics.mean(spa) / statistics.mean(lora):.1f}x"])  # fmt: skip
    return table(["stopped attempt", "steps", "masked-LoRA forward", "plain LoRA train s", "SPA-LoRA (ESI) train s",
                  "ratio"], rows)  # fmt: skip


TABLES: dict[str, Callable[[], str]] = {
    "readme_results": readme_results,
    "main_job": main_job,
    "main_job_timings": main_job_timings,
    "reproduce_stability": reproduce_stability,
    "reproduce_stability_pairs": reproduce_stability_pairs,
    "reproduce_set": reproduce_set,
    "reproduce_spa": reproduce_spa,
    "reproduce_attack": reproduce_attack,
    "bench_summary": bench_summary,
    "bench_scoring": bench_scoring,
    "bench_selection": bench_selection,
    "bench_selection_out_of_core": bench_selection_out_of_core,
    "memory_measured": memory_measured,
    "memory_projection": memory_projection,
    "bench_spa_training": bench_spa_training,
    "bench_set_adapter": bench_set_adapter,
    "bench_masked_lora": bench_masked_lora,
    "tuner_trade": tuner_trade,
    "mutation_check": mutation_check,
    "bench_defenses": bench_defenses,
    "preserve_setup": preserve_setup,
    "preserve_benign": preserve_benign,
    "preserve_verdict": preserve_verdict,
    "preserve_claims": preserve_claims,
    "preserve_attack": preserve_attack,
    "readme_preserve": readme_preserve,
    "preserve_attempts": preserve_attempts,
    "preserve_full": preserve_full,
    "preserve_seeds": preserve_seeds,
}


def render_document(text: str, where: str) -> tuple[str, list[str]]:
    """``text`` with every marked block re-rendered, and the names of the blocks it holds."""
    names: list[str] = []

    def sub(match: re.Match) -> str:
        name = match.group(2)
        if name not in TABLES:
            raise ValueError(f"{where}: unknown table {name!r}; known: {sorted(TABLES)}.")
        names.append(name)
        return match.group(1) + TABLES[name]() + match.group(4)

    return MARKER.sub(sub, text), names


def render_all() -> dict[str, tuple[str, str, list[str]]]:
    """``{document: (current text, rendered text, table names)}`` for every document in `DOCUMENTS`."""
    out = {}
    for doc in DOCUMENTS:
        path = os.path.join(ROOT, doc)
        if not os.path.exists(path):
            continue
        with open(path, encoding="utf-8") as fh:
            current = fh.read()
        rendered, names = render_document(current, doc)
        out[doc] = (current, rendered, names)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="only check; exit 1 if a document is out of date")
    args = parser.parse_args(argv)
    stale = []
    for doc, (current, rendered, names) in render_all().items():
        if current == rendered:
            if names:
                print(f"{doc}: {len(names)} table(s) up to date")
            continue
        stale.append(doc)
        if not args.check:
            from peft_safety._io import atomic_write_text

            atomic_write_text(os.path.join(ROOT, doc), rendered)
            print(f"{doc}: rewrote {len(names)} table(s)")
    if args.check and stale:
        print(f"out of date: {', '.join(stale)}; run python benchmarks/tables.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
