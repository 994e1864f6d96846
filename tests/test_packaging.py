"""What ships: the wheel carries the Apache-2.0 LICENSE the metadata declares, the README's test command installs
what the tests need (scipy, so that the statistics are compared with scipy's instead of skipped), and `.ci/run` runs
exactly that command."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")

ROOT = Path(__file__).resolve().parents[1]


def test_license_file_is_the_apache_2_text():
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert (
        "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
        and "END OF TERMS AND CONDITIONS" in text
    )
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]


def test_the_wheel_ships_the_license(tmp_path):
    pytest.importorskip("setuptools", minversion="77")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "peft_safety", src / "peft_safety", ignore=shutil.ignore_patterns("__pycache__"))
    code = "import sys; from setuptools import build_meta as b; print(b.build_wheel(sys.argv[1]))"
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "dist")], cwd=src, capture_output=True,
                         text=True, timeout=300, check=True)  # fmt: skip
    wheel = tmp_path / "dist" / out.stdout.strip().splitlines()[-1]
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        licenses = [n for n in names if re.fullmatch(r"peft_safety-[^/]+\.dist-info/licenses/LICENSE", n)]
        assert licenses, names
        assert zf.read(licenses[0]) == (ROOT / "LICENSE").read_bytes()
        metadata = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: Apache-2.0" in metadata and "License-File: LICENSE" in metadata


def test_the_test_command_installs_scipy_and_ci_runs_it():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    dev = " ".join(extras["dev"])
    assert re.search(r"\bscipy\b", dev), extras["dev"]
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    command = re.search(r"Run the tests \(this is what `\.ci/run` runs\):\n\n```bash\n(.+?)\n```", readme).group(1)
    assert "[dev," in command
    ci = (ROOT / ".ci" / "run").read_text()
    assert ci.strip().splitlines()[-1].replace("pip install -q ", "pip install ") == command  # -q: quieter CI logs


def test_docs_list_each_sources_licence_from_the_sources_table():
    from peft_safety.sources.datasets import DATA_SOURCES
    from peft_safety.sources.models import MODEL_SOURCES

    text = (ROOT / "docs" / "datasets.md").read_text(encoding="utf-8")
    header = "| name | rows | offline copy (package==version: member) | Hub id | licence of the data |"
    rows = text[text.index(header) :].split("\n\n")[0].splitlines()[2:]
    seen = set()
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        names = re.findall(r"`([a-z0-9_]+)`", cells[0])
        for name in names:
            assert DATA_SOURCES[name].license, name
            assert cells[-1] == DATA_SOURCES[name].license, (name, cells[-1])
        seen.update(names)
    assert seen == set(DATA_SOURCES)  # every source is listed, with its licence
    for src in MODEL_SOURCES.values():
        section = text[text.index(f"`{src.hub_id}`") :]
        licence_row = next(line for line in section.splitlines() if line.startswith("| licence |"))
        assert src.wheel.license in licence_row, (src.hub_id, licence_row)
