"""Every published figure is traceable: cited result files exist and parse, and every generated table in README.md,
docs/ and benchmarks/README.md equals what ``benchmarks/tables.py`` renders from the committed JSON now."""

from __future__ import annotations

import glob
import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.fixture(scope="module")
def tables():
    path = ROOT / "benchmarks" / "tables.py"
    spec = importlib.util.spec_from_file_location("_published_tables", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def _cited_result_files(doc: Path) -> list[tuple[str, Path]]:
    """``results/....json`` references in a document, resolved against the document's folder and the repo root."""
    text = doc.read_text(encoding="utf-8")
    out = []
    for ref in sorted(set(re.findall(r"[\w./*-]*results/[\w.*+-]+\.json", text))):
        candidates = [doc.parent / ref, ROOT / ref, ROOT / "benchmarks" / ref, ROOT / "docs" / ref]
        out.append((ref, next((c for c in candidates if glob.glob(str(c))), candidates[0])))
    return out


def test_every_cited_result_file_exists_and_parses():
    cited = 0
    for doc in DOCS:
        for ref, path in _cited_result_files(doc):
            matches = glob.glob(str(path))
            assert matches, f"{doc.relative_to(ROOT)} cites {ref}, which is not committed"
            for match in matches:
                json.loads(Path(match).read_text(encoding="utf-8"))
            cited += 1
    assert cited >= 10


def test_table_sources_exist_with_provenance(tables):
    for name, sources in tables.SOURCES.items():
        for source in sources:
            data = json.loads((ROOT / source).read_text(encoding="utf-8"))
            if source.startswith("benchmarks/results/") and not Path(source).name.startswith("reproduce_"):
                prov = data.get("provenance")
                assert prov, f"{source} ({name}) has no provenance block"
                for key in ("command", "threads", "torch", "machine", "git_commit", "load_average_start"):
                    assert prov.get(key) is not None, (source, key)


def test_benchmark_results_keep_raw_timings(tables):
    raw = {
        "benchmarks/results/scoring.json": lambda d: [r["raw_s"] for r in d["results"].values()],
        "benchmarks/results/selection.json": lambda d: [d["timing"][k]["raw_s"] for k in ("ours", "naive")],
        "benchmarks/results/spa_training.json": lambda d: [r[k]["raw_s"] for r in d["rows"] for k in ("plain_step", "spa_step")],
        "benchmarks/results/set_adapter.json": lambda d: [r["step"]["raw_s"] for r in d["results"]],
        "benchmarks/results/masked_lora.json": lambda d: [r[k]["raw_s"] for r in d["results"] for k in ("plain_step", "masked_step")],
    }  # fmt: skip
    for source, get in raw.items():
        data = json.loads((ROOT / source).read_text(encoding="utf-8"))
        series = get(data)
        assert series and all(len(s) >= 3 for s in series), source


def test_generated_tables_match_the_result_files(tables):
    seen = set()
    for doc, (current, rendered, names) in tables.render_all().items():
        seen.update(names)
        if current != rendered:
            diff = [f"- {a}\n+ {b}" for a, b in zip(current.splitlines(), rendered.splitlines()) if a != b][:5]
            pytest.fail(f"{doc} is out of date with its JSON; run python benchmarks/tables.py\n" + "\n".join(diff))
    expected = {"readme_results", "main_job", "reproduce_set", "bench_summary", "bench_scoring", "mutation_check"}
    assert expected <= seen, f"missing generated blocks: {sorted(expected - seen)}"
    assert seen <= set(tables.TABLES)


def test_withdrawn_claims_stay_withdrawn():
    """Figures that no committed result backs must not come back into the docs."""
    withdrawn = {
        "0% -> 59% by the refusal-prefix judge": "the main job never judges benign prompts with the prefix judge",
        "ESI 0.64x and SNIP abs-of-sum 0.80x": "no committed scoring result; remeasured 1.07x-1.58x",
        "reference per-layer (L x N passes) 5.10x": "extrapolated, not measured",
        "17.5 min": "wall time not in the committed JSON",
    }
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for phrase, why in withdrawn.items():
            assert phrase not in text, f"{doc.relative_to(ROOT)} repeats a withdrawn figure ({why}): {phrase!r}"
