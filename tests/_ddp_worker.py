"""One rank of the 2-process DDP freeze test (launched by tests/test_trainer_ddp.py with torch.distributed env vars).

Trains a tiny Llama with SafetySFTTrainer (full fine-tuning, safety_mode="freeze") under DDP on CPU (gloo) and writes
this rank's final parameters to ``<out>/rank<r>.pt``.
"""

from __future__ import annotations

import os
import sys

import torch


def main(out: str) -> None:
    from datasets import Dataset

    from peft_safety.mask import Neuron, SafetyMask, Weight
    from peft_safety.testing import tiny_llama, tiny_tokenizer
    from peft_safety.training.config import SafetySFTConfig
    from peft_safety.training.trainer import SafetySFTTrainer

    torch.set_num_threads(1)
    model = tiny_llama(seed=0)
    q, v = "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.v_proj.weight"
    mask = SafetyMask(
        indices={q: [0, 7, 99, 512], v: [2, 5]},
        shapes={q: (32, 32), v: (16, 32)},
        granularity={q: Weight(), v: Neuron(axis=0)},
        provenance={"method": "test"},
    )
    rank = int(os.environ["RANK"])
    rows = [{"prompt": f"Q{i} from rank {rank}?", "completion": f" A{i * (rank + 1)}."} for i in range(16)]
    args = SafetySFTConfig(
        output_dir=os.path.join(out, "trainer"),
        max_steps=3,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        weight_decay=0.1,
        max_grad_norm=0.5,
        max_length=32,
        bf16=False,
        activation_checkpointing=False,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        logging_steps=1,
        safety_mode="freeze",
        ddp_backend="gloo",
    )
    trainer = SafetySFTTrainer(
        model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tiny_tokenizer(), safety_mask=mask
    )
    trainer.train()
    frozen_logged = [h.get("safety/frozen_entries") for h in trainer.state.log_history]
    torch.save(
        {
            "params": {n: p.detach().clone() for n, p in trainer.model.named_parameters()},
            "world_size": torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1,
            "frozen_logged": frozen_logged,
        },
        os.path.join(out, f"rank{rank}.pt"),
    )


if __name__ == "__main__":
    main(sys.argv[1])
