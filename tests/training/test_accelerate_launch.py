"""`accelerate launch` with 2 CPU processes through `SafetySFTTrainer` (DDP, gloo), with the repository's accelerate
config file examples/accelerate/ddp_cpu.yaml. The mask's guarantee holds on every rank, and the ranks agree.

FSDP2 through accelerate cannot run on CPU: accelerate 1.15 applies its FSDP plugin only to accelerator process groups
(on CPU the run silently becomes plain multi-CPU data parallel), so the FSDP2 path through accelerate and the trainer
is in benchmarks/gpu_check.sh; the Freezer on FSDP2 (`fully_shard`) itself is tested on CPU in tests/training/test_fsdp2.py.

Each case starts two Python processes that import torch, transformers and trl: ~30-60 s on a 2-core machine, so these
tests are marked ``slow`` (run with ``-m slow``) as well as ``multiprocess``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests" / "_accelerate_worker.py"


def _launch(config: str, out: Path, mode: str) -> list[dict]:
    accelerate = shutil.which("accelerate")
    if accelerate is None:
        pytest.skip("the accelerate command is not on PATH")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="")  # fmt: skip
    cmd = [accelerate, "launch", "--config_file", str(ROOT / "examples" / "accelerate" / config),
           "--main_process_port", "0", str(WORKER), str(out), mode]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


def _check(results: list[dict], mode: str, distributed_type: str) -> None:
    from _accelerate_worker import check

    assert [r["world_size"] for r in results] == [2, 2] and sorted(r["rank"] for r in results) == [0, 1]
    assert all(r["distributed_type"].endswith(distributed_type) for r in results), results[0]["distributed_type"]
    kept, moved = check(results, mode)
    assert kept > 0 and moved > 0


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("mode", ["freeze", "train_only"])
def test_ddp_two_cpu_processes(tmp_path, mode):
    _check(_launch("ddp_cpu.yaml", tmp_path, mode), mode, "MULTI_CPU")
