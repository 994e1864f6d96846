"""Several processes on a CPU-only machine (``torchrun``/``accelerate launch`` set ``WORLD_SIZE``): TRL's SFT script
with a mask joins them in one gloo group by adding ``--use_cpu true``, and refuses ``--use_cpu false``. Without
that, each process trained alone, all wrote one output folder, and the launcher exited 0."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from peft_safety.recipes.sft import with_use_cpu

pytest.importorskip("trl")

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("argv", "world", "accelerator", "expected"),
    [
        (["--x", "1"], 2, False, ["--x", "1", "--use_cpu", "true"]),
        (["--x", "1"], 1, False, ["--x", "1"]),  # one process: nothing to join
        (["--x", "1"], 2, True, ["--x", "1"]),  # a GPU machine: transformers picks the devices
        (["--use_cpu", "false"], 2, False, ["--use_cpu", "false"]),  # set by the user: refused after parsing
        (["--use_cpu=true"], 4, False, ["--use_cpu=true"]),
    ],
)
def test_use_cpu_is_added_only_for_several_cpu_processes(argv, world, accelerator, expected):
    assert with_use_cpu(argv, world, accelerator) == expected


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp_path: Path, extra: list[str]) -> list[subprocess.CompletedProcess]:
    """Two ranks of examples/sft_safety.py with the environment torchrun gives them (no --use_cpu on the line)."""
    tiny = tmp_path / "tiny"
    subprocess.run([sys.executable, str(ROOT / "examples" / "sft_safety.py"), "--make_tiny", str(tiny)], check=True,
                   capture_output=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    port = _free_port()
    argv = [sys.executable, str(ROOT / "examples" / "sft_safety.py"), "--model_name_or_path", str(tiny / "model"),
            "--dataset_name", str(tiny / "data.jsonl"), "--safety_mask", str(tiny / "mask"), "--safety_mode",
            "freeze", "--output_dir", str(tmp_path / "out"), "--max_steps", "2", "--max_length", "32",
            "--per_device_train_batch_size", "2", "--report_to", "none", "--save_strategy", "no", *extra]  # fmt: skip
    procs = []
    for rank in range(2):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}  # fmt: skip
        procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        out.append(subprocess.CompletedProcess(argv, p.returncode, stdout, stderr))
    return out


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_cpu_processes_form_one_group(tmp_path):
    runs = _launch(tmp_path, [])
    for r in runs:
        assert r.returncode == 0, r.stderr[-3000:]
    # only the world's process zero reports the save: two independent runs would both be process zero
    assert sum(r.stdout.count("saved to") for r in runs) == 1, [r.stdout for r in runs]
    assert any("adding --use_cpu true" in r.stderr for r in runs)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_use_cpu_false_with_several_cpu_processes_is_refused(tmp_path):
    runs = _launch(tmp_path, ["--use_cpu", "false"])
    for r in runs:
        assert r.returncode != 0
        assert "--use_cpu is false" in r.stderr, r.stderr[-2000:]
