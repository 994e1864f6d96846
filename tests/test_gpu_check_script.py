"""benchmarks/gpu_check.sh parses (bash -n), names a config file that exists for every case, and runs in dry mode."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def test_syntax():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_dry_run_lists_every_case_with_existing_configs():
    done = subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, check=True)
    lines = done.stdout.strip().splitlines()
    cases = [line.split()[0] for line in lines]
    assert cases == [
        "ddp-spa",
        "ddp-set",
        "fsdp2-spa",
        "fsdp2-set",
        "zero2-spa",
        "zero2-set",
        "zero3-spa",
        "zero3-set",
        "fsdp2-score",
        "zero3-score",
    ]
    for line in lines:
        case = line.split()[0]
        if case.endswith("-score"):
            # torchrun of the sharded-scoring worker on CUDA, then its one-process comparison on the same GPU
            kind = case.removesuffix("-score")
            assert f"tests/_ddp_worker.py {kind}_score " in line and " cuda && " in line, line
            assert line.rstrip().endswith(f"tests/_ddp_worker.py verify {line.split()[-3]} {kind} cuda"), line
            assert "torchrun --standalone --nproc_per_node" in line
            continue
        config = line.split("--config_file ")[1].split()[0]
        assert Path(config).is_file(), config
        assert ("freeze" in line) is case.endswith("-spa")
        assert "--verify" in line


def test_unknown_case_fails():
    done = subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True,
                          env={"CASES": "ddp-lora", "PATH": "/usr/bin:/bin"})  # fmt: skip
    assert done.returncode == 1 and "unknown case" in done.stdout
