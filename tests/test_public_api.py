"""The public surface: the top level is one list (``peft_safety._EXPORTS``), documented in ``docs/api.md``; every name
that left it stays importable from its stage package; the docs import only what exists.

Each lazily exporting ``__init__.py`` (a ``_EXPORTS`` or ``_LAZY`` table resolved by ``__getattr__``) also has a
``TYPE_CHECKING`` block for type checkers: the tests below keep the two equal, so they cannot drift apart.
"""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "peft_safety"

#: what a user meets first; anything else is imported from its stage. A new top-level name needs a reason.
MAX_TOP_LEVEL = 24

#: the names that left the top level -> where they live now (the CHANGELOG lists the same moves)
MOVED: dict[str, str] = {
    **dict.fromkeys(["SafetyFileError"], "peft_safety.errors"),
    **dict.fromkeys(
        [
            "Granularity",
            "Head",
            "Layer",
            "MaskSummary",
            "Neuron",
            "Weight",
            "fingerprint_tensor",
            "fingerprints_of",
            "granularity_from_dict",
            "write_card",
        ],
        "peft_safety.mask",
    ),
    **dict.fromkeys(
        [
            "SafetyNeuronResult",
            "Targets",
            "angle_gap",
            "attention_geometry",
            "build_refusal_set",
            "build_utility_set",
            "detect_safety_neurons",
            "isolate",
            "locate_safety_layers",
            "over_rejection_probe",
            "query_to_kv_rows",
            "refusal_rows",
            "resolve_targets",
            "rsn_tune_mask",
            "safety_layer_mask",
            "utility_rows",
        ],
        "peft_safety.scoring",
    ),
    **dict.fromkeys(["mask_model_card", "push_mask_to_hub"], "peft_safety.mask.hub"),
    **dict.fromkeys(["bootstrap_masks", "consensus", "consensus_mask"], "peft_safety.scoring.consensus"),
    **dict.fromkeys(
        [
            "LayerDistribution",
            "StabilityReport",
            "iou_matrix",
            "layer_distribution",
            "mask_drift",
            "noised",
            "overlap_report",
            "plot_angle_gap",
            "plot_iou_matrix",
            "plot_layer_heatmap",
            "restored_from",
            "rewind_",
            "scaled",
            "stability",
            "zeroed",
        ],
        "peft_safety.analysis",
    ),
    **dict.fromkeys(
        ["SafetyLayer", "SafetyLinear", "SafetyPeftType", "check_adapter_folder", "check_masked_lora_model"],
        "peft_safety.tuner",
    ),
    **dict.fromkeys(
        [
            "Booster",
            "FreezeReport",
            "FreezeViolationError",
            "Freezer",
            "Lisa",
            "RealignCallback",
            "RealignReport",
            "RefusalEvalCallback",
            "SafetyDriftCallback",
            "mix_replay",
            "realign_",
            "reference_snapshot",
        ],
        "peft_safety.training",
    ),
    **dict.fromkeys(
        ["AlignmentDelta", "SafeLoraReport", "add_safety_vector", "antidote", "safe_lora_project"],
        "peft_safety.posthoc",
    ),
    **dict.fromkeys(
        [
            "ClassifierJudge",
            "EvalReport",
            "KeywordJudge",
            "ModelJudge",
            "RefusalEvaluator",
            "Verdict",
            "bootstrap_ci",
            "generate_responses",
            "mcnemar_exact",
            "multiple_choice_accuracy",
            "paired_bootstrap",
            "perplexity",
            "refusal_evaluator",
            "train_classifier_judge",
        ],
        "peft_safety.evaluation",
    ),
    **dict.fromkeys(
        ["DATA_SOURCES", "MODEL_SOURCES", "assert_disjoint", "deduplicate", "load_default_model", "resolve_model"],
        "peft_safety.sources",
    ),
    **dict.fromkeys(["MainJobConfig", "MainJobResult", "run_main_job"], "peft_safety.recipes"),
}

#: the files whose ``from peft_safety import ...`` lines and ``peft_safety.x.y`` references a user reads (not the
#: CHANGELOG: it names what used to exist)
DOC_FILES = sorted(
    [ROOT / "README.md", *(ROOT / "docs").rglob("*.md"), *(ROOT / "examples").rglob("*.py")],
)
#: docstrings and comments in the package and the benchmarks are read too (their import lines are examples)
SOURCE_FILES = sorted([*PKG.rglob("*.py"), *(ROOT / "benchmarks").rglob("*.py")])


def _module_of_relative(init: Path, node: ast.ImportFrom) -> str:
    package = ".".join(init.relative_to(ROOT).parent.parts)
    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _lazy_inits() -> dict[Path, tuple[dict[str, str], dict[str, str]]]:
    """``__init__.py`` -> (its lazy table, the name -> module of its ``TYPE_CHECKING`` imports)."""
    found = {}
    for init in sorted(PKG.rglob("__init__.py")):
        tree = ast.parse(init.read_text(encoding="utf-8"))
        table: dict[str, str] | None = None
        typed: dict[str, str] = {}
        for node in tree.body:
            target = getattr(node, "target", None) or (getattr(node, "targets", None) or [None])[0]
            if isinstance(target, ast.Name) and target.id in {"_EXPORTS", "_LAZY"}:
                table = ast.literal_eval(node.value)
            if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
                for sub in node.body:
                    if isinstance(sub, ast.ImportFrom):
                        module = _module_of_relative(init, sub) if sub.level else sub.module
                        typed.update({a.asname or a.name: module for a in sub.names})
        if table is not None:
            found[init] = (table, typed)
    return found


LAZY_INITS = _lazy_inits()


def test_the_lazy_tables_are_found():
    # the checker itself: the top level and the stages that resolve names lazily
    names = {str(p.relative_to(ROOT)) for p in LAZY_INITS}
    assert {"peft_safety/__init__.py", "peft_safety/training/__init__.py", "peft_safety/scoring/__init__.py"} <= names


@pytest.mark.parametrize("init", sorted(LAZY_INITS), ids=lambda p: str(p.relative_to(ROOT)))
def test_lazy_table_and_type_checking_block_agree(init):
    table, typed = LAZY_INITS[init]
    for name, module in table.items():
        assert name in typed, f"{init.relative_to(ROOT)}: {name!r} is in the lazy table but not in TYPE_CHECKING"
        # the TYPE_CHECKING import may name the package that re-exports it, or the module itself
        assert module == typed[name] or module.startswith(typed[name] + "."), (
            f"{init.relative_to(ROOT)}: {name!r} resolves from {module} but TYPE_CHECKING imports it from "
            f"{typed[name]}"
        )
    package = importlib.import_module(".".join(init.relative_to(ROOT).parent.parts))
    extra = {n for n in typed if n not in table and n not in vars(package)}
    assert not extra, f"{init.relative_to(ROOT)}: TYPE_CHECKING imports {sorted(extra)} that the module never exports"
    assert set(table) <= set(package.__all__)


def test_top_level_is_one_small_list():
    import peft_safety

    assert peft_safety.__all__ == sorted([*peft_safety._EXPORTS, "__version__"])
    assert len(peft_safety.__all__) <= MAX_TOP_LEVEL, sorted(peft_safety.__all__)
    assert dir(peft_safety) == peft_safety.__all__
    for name in peft_safety.__all__:
        assert getattr(peft_safety, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'SafetyMsk'"):
        peft_safety.SafetyMsk  # noqa: B018


def test_top_level_names_are_the_stage_objects():
    import peft_safety

    for name, module in peft_safety._EXPORTS.items():
        assert getattr(peft_safety, name) is getattr(importlib.import_module(module), name), name


@pytest.mark.parametrize("name", sorted(MOVED))
def test_a_name_that_left_the_top_level_lives_in_its_stage(name):
    import peft_safety

    assert name not in peft_safety.__all__
    with pytest.raises(AttributeError):
        getattr(peft_safety, name)
    module = importlib.import_module(MOVED[name])
    assert getattr(module, name) is not None
    if hasattr(module, "__all__"):
        assert name in module.__all__, f"{MOVED[name]}.__all__ lacks {name!r}"


def _api_page_names() -> list[str]:
    text = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    section = text.split("\n## Top level\n", 1)[1].split("\n## ", 1)[0]
    return [m.group(1) for m in re.finditer(r"^\| `([A-Za-z_]\w*)` \|", section, re.MULTILINE)]


def test_api_page_lists_exactly_the_top_level():
    import peft_safety

    listed = _api_page_names()
    assert len(listed) == len(set(listed)), "docs/api.md lists a name twice"
    assert sorted(listed) == peft_safety.__all__, (
        f"docs/api.md's top-level table and peft_safety.__all__ differ: only in the page "
        f"{sorted(set(listed) - set(peft_safety.__all__))}, only in the package "
        f"{sorted(set(peft_safety.__all__) - set(listed))}"
    )


_FROM_IMPORT = re.compile(r"from (peft_safety(?:\.\w+)*) import (\([^)]*\)|[^\n`]*)")


def _from_imports(text: str) -> list[tuple[str, list[str]]]:
    found = []
    for m in _FROM_IMPORT.finditer(text):
        body = m.group(2).strip().strip("()")
        body = re.sub(r"#[^\n]*", "", body)  # comments inside a parenthesized list or after the names
        names = [re.match(r"\s*([A-Za-z_]\w*)?", part).group(1) for part in body.replace("\n", " ").split(",")]
        found.append((m.group(1), [n for n in names if n]))
    return found


def test_the_import_scanner_reads_a_parenthesized_list():
    # the scanner itself: multi-line lists, comments and aliases
    text = (
        "from peft_safety import (SafetyMask,  # noun\n    score as s)\nfrom peft_safety.mask import Weight\n"
        "prose: `from peft_safety.analysis import stability`. More prose, `select`"
    )
    assert _from_imports(text) == [
        ("peft_safety", ["SafetyMask", "score"]),
        ("peft_safety.mask", ["Weight"]),
        ("peft_safety.analysis", ["stability"]),
    ]


@pytest.mark.parametrize("path", DOC_FILES + SOURCE_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_documented_imports_resolve(path):
    """Every ``from peft_safety[.stage] import X`` a user can read names something that exists; from the top level,
    only the names of docs/api.md, so a name that left the top level cannot linger in an example."""
    import peft_safety

    bad = []
    for module_name, names in _from_imports(path.read_text(encoding="utf-8")):
        if module_name == "peft_safety":
            bad += [
                f"from peft_safety import {n} (not a top-level name)" for n in names if n not in peft_safety.__all__
            ]
            continue
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            bad.append(f"from {module_name} import ...: {exc}")
            continue
        for n in names:
            if not hasattr(module, n):
                try:
                    importlib.import_module(f"{module_name}.{n}")
                except ImportError:
                    bad.append(f"from {module_name} import {n}")
    assert not bad, f"{path.relative_to(ROOT)}:\n" + "\n".join(bad)


_DOTTED = re.compile(r"`(peft_safety(?:\.[A-Za-z_]\w*)+)")


def _resolve(dotted: str) -> bool:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_dotted_references_in_docs_resolve(path):
    """``peft_safety.x.y`` in backticks names a module, or an attribute of one (``peft_safety.antidote`` after it
    moved to ``peft_safety.posthoc`` fails here)."""
    text = path.read_text(encoding="utf-8")
    bad = sorted({d for d in _DOTTED.findall(text) if not _resolve(d)})
    assert not bad, f"{path.relative_to(ROOT)} names what does not exist: {bad}"
