"""The dependency rules of the package layout, checked statically (AST) and in a fresh interpreter.

* ``peft_safety.mask`` imports only torch, safetensors and the standard library (tests/test_mask.py);
* ``peft_safety.scoring`` never imports the tuner, the training code, the Hub helpers or the CLI;
* ``peft_safety.tuner`` and ``peft_safety.training`` consume masks and never compute scores;
* nothing outside ``peft_safety.cli`` imports ``peft_safety.cli``;
* ``import peft_safety`` imports neither trl nor datasets and does not initialise CUDA.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "peft_safety"
STDLIB = set(sys.stdlib_module_names)


def _imports(path: Path, module_level_only: bool = False) -> set[str]:
    """Absolute dotted names of the modules ``path`` imports (relative imports resolved)."""
    package = ".".join(path.relative_to(PKG.parent).parent.parts)
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if not node.level:
                found.add(node.module)
                continue
            base = package.split(".")
            base = base[: len(base) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
            if node.module is None:
                found.update(f"{target}.{alias.name}" for alias in node.names)
            else:
                found.add(target)
    return found


def _files(sub: str) -> list[Path]:
    root = PKG / sub
    return sorted(root.rglob("*.py")) if root.is_dir() else [root.with_suffix(".py")]


@pytest.mark.parametrize(
    "sub, forbidden",
    [
        ("scoring", ("peft_safety.tuner", "peft_safety.training", "peft_safety.hub", "peft_safety.cli")),
        ("tuner", ("peft_safety.scoring", "peft_safety.training", "peft_safety.cli")),
        ("training", ("peft_safety.scoring", "peft_safety.cli")),
        ("mask", ("peft_safety.cli",)),
    ],
)
def test_layer_boundaries(sub, forbidden):
    for path in _files(sub):
        for name in _imports(path):
            assert not name.startswith(forbidden), f"{sub}/{path.name} imports {name}"


def test_nothing_imports_the_cli():
    for path in PKG.rglob("*.py"):
        if "cli" in path.relative_to(PKG).parts:
            continue
        for name in _imports(path):
            assert not name.startswith("peft_safety.cli"), f"{path} imports {name}"


def test_import_is_lean_and_registers_the_peft_type():
    code = (
        "import sys, peft_safety; from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING as m; "
        "assert 'SAFETY' in m, 'not registered'; "
        "heavy = [k for k in ('trl', 'datasets', 'matplotlib') if k in sys.modules]; assert not heavy, heavy; "
        "import torch; assert not torch.cuda.is_initialized()"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=120)


def test_every_public_name_resolves():
    import peft_safety

    assert peft_safety.__all__ == sorted(peft_safety.__all__)
    for name in peft_safety.__all__:
        assert getattr(peft_safety, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'SafetyMsk'"):
        peft_safety.SafetyMsk  # noqa: B018
