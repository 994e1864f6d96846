"""README.md and docs/quickstart.md run top to bottom, offline, as a newcomer would paste them.

Every ```python block of a page runs in order in one fresh interpreter (``HF_HUB_OFFLINE=1``: no Hub), on the embedded
model, in an empty folder. Only sizes are shrunk so that the run takes a minute, not an hour: each substitution below
must match the page (a page edit that removes it fails the test instead of silently running the long version).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: (page, [(text, smaller text), ...]): step counts, row counts and generation length
PAGES = {
    "README.md": [
        ('load_rows("uncensorbench_refusal", n=64)', 'load_rows("uncensorbench_refusal", n=4)'),
        ('load_rows("chat_pairs", n=256)', 'load_rows("chat_pairs", n=8)'),
        (
            'SafetySFTConfig("out",',
            'SafetySFTConfig("out", max_steps=2, per_device_train_batch_size=2, max_length=64,',
        ),
    ],
    "docs/quickstart.md": [
        ('load_rows("uncensorbench_refusal", n=64)', 'load_rows("uncensorbench_refusal", n=4)'),
        ("max_steps=100,", "max_steps=2, per_device_train_batch_size=2, max_length=64,"),
        ('load_rows("chat_pairs", n=256)', 'load_rows("chat_pairs", n=8)'),
        ("max_steps=1000,", "max_steps=2, per_device_train_batch_size=2, max_length=64,"),
        ('load_rows("harmbench_test", n=64)', 'load_rows("harmbench_test", n=2)'),
        ('load_rows("chat_pairs", n=64)', 'load_rows("chat_pairs", n=2)'),
        ('out_dir="eval")', 'out_dir="eval", max_new_tokens=4)'),
    ],
}


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def script_of(page: str) -> tuple[str, int]:
    text = (ROOT / page).read_text(encoding="utf-8")
    for old, new in PAGES[page]:
        assert old in text, f"{page} no longer contains {old!r}: update the test's size substitutions"
        text = text.replace(old, new)
    blocks = python_blocks(text)
    parts = [f"{code}\nprint('BLOCK {i} DONE', flush=True)\n" for i, code in enumerate(blocks)]
    return "\n".join(parts), len(blocks)


def test_every_python_block_is_found():
    for page in PAGES:
        script, n = script_of(page)
        assert n >= 3, page
        compile(script, page, "exec")  # each block is valid Python once the sizes are shrunk


@pytest.mark.slow
@pytest.mark.parametrize("page", sorted(PAGES))
def test_page_runs_top_to_bottom_offline(page, tmp_path):
    script, n = script_of(page)
    (tmp_path / "page.py").write_text(script, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_DISABLED": "true"}  # fmt: skip
    run = subprocess.run([sys.executable, "page.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=3600)  # fmt: skip
    done = re.findall(r"BLOCK (\d+) DONE", run.stdout)
    assert run.returncode == 0 and len(done) == n, f"{page}: {len(done)} of {n} blocks ran\n{run.stderr[-4000:]}"
