"""The dependency rules of the package layout (``docs/architecture.md``), checked statically (AST) and in a fresh
interpreter.

Every ``import`` statement counts, function-level ones included; only ``if TYPE_CHECKING:`` blocks (type hints, never
executed) are skipped. The rules:

* the stages import each other only along the pipeline (`ALLOWED` below): ``mask`` imports no other stage;
  ``evaluation`` takes from ``scoring`` only the calibration data (templates, rendering, generation);
  nothing imports ``recipes`` or ``cli`` except ``cli``;
* there is no import cycle between modules;
* ``import peft_safety`` imports neither trl nor datasets and does not initialise CUDA.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "peft_safety"

#: base modules every stage may use
BASE = {
    "peft_safety._version",
    "peft_safety._io",
    "peft_safety._lazy",
    "peft_safety._files",
    "peft_safety._models",
    "peft_safety.errors",
    "peft_safety.vocab",
    "peft_safety.testing",
}
#: the calibration-data modules of ``scoring`` that later stages may read
CALIBRATION_DATA = {"peft_safety.scoring.calibration", "peft_safety.scoring.generation"}
#: stage -> the other stages (or single modules) it may import
ALLOWED: dict[str, set[str]] = {
    "mask": set(),
    "analysis": {"mask"},
    # the one loader of rows (sources.datasets: named offline sets, files, Hub ids) serves calibration and replay
    "scoring": {"mask", "analysis.probes", "sources.datasets"},
    "tuner": {"mask"},
    # utility-aware SET answers benign prompts with the model (greedy generation, as evaluation does) and drops the
    # answers a keyword judge calls refusals
    "training": {"mask", "tuner", "analysis", "sources.datasets", "scoring.generation", "evaluation.judges"},
    # post-hoc defenses: edits of a trained model (Antidote scores with Wanda)
    "posthoc": {"mask", "analysis", "scoring", "sources.datasets"},
    "evaluation": {"mask", *(m.removeprefix("peft_safety.") for m in CALIBRATION_DATA)},
    "sources": {"tuner"},  # loading a saved adapter needs the SAFETY type registered
    "recipes": {"mask", "analysis", "scoring", "tuner", "training", "posthoc", "evaluation", "sources"},
    "cli": {"mask", "analysis", "scoring", "tuner", "training", "posthoc", "evaluation", "sources", "recipes"},
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {_module_name(p): p for p in PKG.rglob("*.py")}


def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def _walk(node: ast.AST):
    for child in ast.iter_child_nodes(node):
        if _is_type_checking(child):
            continue
        yield child
        yield from _walk(child)


def _imports(path: Path) -> set[str]:
    """The peft_safety modules that ``path`` imports at run time (relative imports resolved; ``from pkg import mod``
    counts ``pkg.mod`` when that is a module)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in _walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: _imports(path) for name, path in MODULES.items()}


def _stage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ALLOWED else None


def _allowed(src: str, dst: str) -> bool:
    src_stage, dst_stage = _stage(src), _stage(dst)
    if dst in BASE or dst == "peft_safety" or src_stage is None:
        return dst_stage is None or src == "peft_safety"
    if dst_stage is None or dst_stage == src_stage:
        return True
    rel = dst.removeprefix("peft_safety.")
    return any(rel == a or rel.startswith(a + ".") for a in ALLOWED[src_stage])


def test_every_stage_is_known():
    top = {p.name.removesuffix(".py") for p in PKG.iterdir() if p.name != "__pycache__" and not p.name.startswith(".")}
    unknown = top - set(ALLOWED) - {m.split(".")[1] for m in BASE} - {"__init__", "py"}
    assert not unknown, f"new top-level modules {unknown}: put them in a stage folder or add them to the rules"


def test_imports_follow_the_stage_order():
    bad = [f"{src} imports {dst}" for src, dsts in GRAPH.items() for dst in sorted(dsts) if not _allowed(src, dst)]
    assert not bad, "imports against the stage order:\n" + "\n".join(bad)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    assert _cycles(GRAPH) == []


def test_the_cycle_check_finds_a_cycle():
    # the checker itself: a function-level import back into an earlier module is a cycle
    graph = {k: set(v) for k, v in GRAPH.items()}
    graph["peft_safety.mask.granularity"].add("peft_safety.mask.safety_mask")
    assert any({"peft_safety.mask.granularity", "peft_safety.mask.safety_mask"} <= set(c) for c in _cycles(graph))


def test_the_stage_rule_rejects_a_backward_import():
    assert not _allowed("peft_safety.mask.safety_mask", "peft_safety.scoring.scores")
    assert not _allowed("peft_safety.evaluation.report", "peft_safety.scoring.gradient")
    assert _allowed("peft_safety.evaluation.report", "peft_safety.scoring.generation")
    assert not _allowed("peft_safety.training.trainer", "peft_safety.recipes.sft")
    assert not _allowed("peft_safety.tuner.safety.model", "peft_safety.training.freeze")


def test_nothing_imports_the_cli_or_the_recipes():
    for src, dsts in GRAPH.items():
        if src.startswith("peft_safety.cli"):
            continue
        for dst in dsts:
            assert not dst.startswith("peft_safety.cli"), f"{src} imports {dst}"
            if not src.startswith("peft_safety.recipes"):
                assert not dst.startswith("peft_safety.recipes"), f"{src} imports {dst}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("peft_safety.mask")))
def test_mask_imports_no_third_party_beyond_torch_safetensors_hub(module):
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    for node in _walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom) and not getattr(node, "level", 0):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for name in names:
                root = name.split(".")[0]
                assert root in sys.stdlib_module_names or root in {
                    "torch",
                    "safetensors",
                    "huggingface_hub",
                    "peft_safety",
                }, f"{module} imports {name}"


def test_import_is_lean_and_registers_the_peft_type():
    code = (
        "import sys, peft_safety; from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING as m; "
        "assert 'SAFETY' in m, 'not registered'; "
        "heavy = [k for k in ('trl', 'datasets', 'matplotlib') if k in sys.modules]; "
        "assert not heavy, heavy; "
        "import torch; assert not torch.cuda.is_initialized()"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=120)
