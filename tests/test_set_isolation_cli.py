"""``peft-safety score --isolate-p``: the SET mask with the top utility entries removed (Wei et al.'s isolation)."""

from __future__ import annotations

import json

import torch

from peft_safety.cli.main import main
from peft_safety.mask import SafetyMask
from peft_safety.scoring import score
from peft_safety.scoring.calibration import CalibrationSet
from peft_safety.testing import tiny_llama, tiny_tokenizer

SAFETY = [{"prompt": f"how to harm {i}", "response": "I cannot help with that."} for i in range(4)]
UTILITY = [{"prompt": f"bake bread {i}", "response": f"Mix flour, water and yeast; wait {i} hours."} for i in range(4)]


def _top(scores, fraction: float) -> set[tuple[str, int]]:
    """Naive global top-fraction: every (name, flat index) whose score is among the floor(f * N + 1/2) largest."""
    flat = [(float(v), n, i) for n, t in scores.items() for i, v in enumerate(t.flatten().tolist())]
    k = int(fraction * len(flat) + 0.5)
    flat.sort(key=lambda x: -x[0])
    return {(n, i) for _, n, i in flat[:k]}


def test_score_isolate_p_removes_top_utility_entries(tmp_path):
    model = tiny_llama(seed=0)
    model.save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    for name, rows in (("safety", SAFETY), ("utility", UTILITY)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = ["score", str(tmp_path / "model"), "--data", str(tmp_path / "safety.jsonl"), "--method", "snip",
            "--fraction", "0.05", "--no-progress", "--max-length", "128"]  # fmt: skip
    assert main([*base, "--out", str(tmp_path / "plain")]) == 0
    iso = [
        *base,
        "--out",
        str(tmp_path / "iso"),
        "--isolate-p",
        "0.05",
        "--utility-data",
        str(tmp_path / "utility.jsonl"),
    ]
    assert main(iso) == 0
    plain, isolated = SafetyMask.from_pretrained(tmp_path / "plain"), SafetyMask.from_pretrained(tmp_path / "iso")
    tok = tiny_tokenizer()
    s = score(model, CalibrationSet(SAFETY, tok, max_length=128), "snip", progress=False)
    u = score(model, CalibrationSet(UTILITY, tok, max_length=128), "snip", progress=False)
    top_s, top_u = _top(s, 0.05), _top(u, 0.05)

    def entries(mask):
        return {(n, int(i)) for n in mask.names for i in torch.nonzero(mask.to_dense(n).flatten()).flatten().tolist()}

    got = entries(isolated)
    assert got == top_s - top_u  # Wei et al.: top-q(safety) minus top-p(utility)
    assert entries(plain) == top_s and len(got) < len(top_s)
    assert isolated.provenance["isolation_p"] == 0.05
    assert main([*base, "--out", str(tmp_path / "x"), "--isolate-p", "2"]) == 2  # a bad p is refused
