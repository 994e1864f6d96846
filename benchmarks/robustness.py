"""Fuzz corpus of bad inputs against peft-safety's entry points (and PEFT's own loaders on peft-safety's types):
what comes out of each, counted for ``docs/reliability.md``.

Every case feeds one wrong input (a damaged adapter folder, mask or scores file, a bad argument, a wrong command line,
a symlink planted where a file is saved) to one entry point and classifies what happens:

* **clear**: a `peft_safety.errors.SafetyError` (the command line: exit code 2 and one line) whose message names the
  file or value (the case's ``needle``); for a case whose right outcome is a result (a save next to a planted
  symlink), the correct result.
* **unclear**: another exception (``JSONDecodeError``, safetensors' ``header too small``, an ``HFValidationError``
  about repo ids) or a `SafetyError` that does not name the file.
* **crash**: ``RecursionError``, ``MemoryError``, ``AttributeError``, ``IndexError``, ``ZeroDivisionError``, a
  traceback from the command line, or a hang (no answer within the time limit).
* **silent**: the bad input was accepted (no error), or a save wrote through a planted symlink.

Each case also records its ``route``: ``"peft-safety"`` (our loaders, the command line, our functions) or ``"peft"``
(PEFT's or transformers' own loaders, where a damaged ``adapter_config.json`` is parsed before any peft-safety code
runs). Cases that need the tuner-loading fixes tracked separately are marked ``open`` and counted apart.

```bash
python benchmarks/robustness.py                 # run, write benchmarks/results/robustness.json, print the table
python benchmarks/robustness.py --write-docs    # also rewrite the generated table in docs/reliability.md
```
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import select
import shutil
import signal
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "reliability.md"
BEGIN, END = "<!-- generated:robustness -->", "<!-- /generated -->"
TIMEOUT_S = 30

CRASH_TYPES = (RecursionError, MemoryError, AttributeError, IndexError, ZeroDivisionError, SystemError)


class Wrong(Exception):
    """Raised by a case whose right outcome is a result, when the result is wrong (e.g. a symlink was followed)."""


@dataclass
class Case:
    entry: str
    name: str
    fn: Callable[[], Any]
    needle: str = ""
    route: str = "peft-safety"
    expect: str = "error"  # "error": the input must be refused; "result": the call must do the right thing
    cli: bool = False
    open_item: str | None = None
    outcome: str = ""
    detail: str = ""
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ classification
def classify(case: Case) -> None:
    """Run ``case.fn`` in this process and record its outcome (see the module docstring)."""
    from peft_safety.errors import SafetyError

    start = time.perf_counter()
    stderr = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            result = case.fn()
    except Wrong as err:
        case.outcome, case.detail = "silent", str(err)
    except CRASH_TYPES as err:
        case.outcome, case.detail = "crash", f"{type(err).__name__}: {str(err)[:200]}"
    except SafetyError as err:
        named = case.needle in str(err)
        case.outcome = "clear" if named else "unclear"
        case.detail = f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
    except Exception as err:
        case.outcome, case.detail = "unclear", f"{type(err).__module__}.{type(err).__name__}: {str(err)[:200]}"
    else:
        if case.cli:
            code, text = result, stderr.getvalue()
            lines = [line for line in text.splitlines() if ": error: " in line]
            if code == 0:
                case.outcome, case.detail = "silent", "exit code 0"
            elif code == 2 and len(lines) == 1 and "Traceback" not in text:
                case.outcome = "clear" if case.needle in lines[0] else "unclear"
                case.detail = lines[0][:300]
            else:
                case.outcome, case.detail = "unclear", f"exit code {code}: {text[-300:]}"
        elif case.expect == "result":
            case.outcome, case.detail = "clear", "correct result"
        else:
            case.outcome, case.detail = "silent", f"accepted, returned {type(result).__name__}"
    case.seconds = time.perf_counter() - start


def classify_isolated(case: Case, timeout_s: float | None = None) -> None:
    """`classify` in a forked child, so that a hang inside native code (a FIFO opened by safetensors never returns to
    Python), a crash of the interpreter or a memory bomb is recorded as a crash instead of stopping the run."""
    timeout_s = TIMEOUT_S if timeout_s is None else timeout_s
    start = time.perf_counter()
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: classify, report, leave without running the parent's cleanup
        os.close(read_fd)
        code = 0
        try:
            classify(case)
            payload = json.dumps({"outcome": case.outcome, "detail": case.detail}).encode()
            with os.fdopen(write_fd, "wb") as fh:
                fh.write(payload)
        except BaseException:  # pragma: no cover - reported as a crash by the parent
            code = 1
        os._exit(code)
    os.close(write_fd)
    chunks: list[bytes] = []
    deadline = start + timeout_s
    with os.fdopen(read_fd, "rb") as fh:
        while True:
            left = deadline - time.perf_counter()
            ready, _, _ = select.select([fh], [], [], max(left, 0))
            if not ready:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                case.outcome, case.detail = "crash", f"hang: no answer within {timeout_s:g} s"
                case.seconds = time.perf_counter() - start
                return
            data = os.read(fh.fileno(), 1 << 16)
            if not data:
                break
            chunks.append(data)
    _, status = os.waitpid(pid, 0)
    case.seconds = time.perf_counter() - start
    if not chunks:
        case.outcome, case.detail = "crash", f"the process died (wait status {status})"
        return
    record = json.loads(b"".join(chunks))
    case.outcome, case.detail = record["outcome"], record["detail"]


# ------------------------------------------------------------------------------------------------ fixtures
def build(root: Path) -> dict[str, Any]:
    """A tiny base model folder, a SET and a SAFETY_LORA adapter of it, a mask and a scores file."""
    from peft import LoraConfig, get_peft_model

    from peft_safety import SafetyConfig, SafetyMask
    from peft_safety.scoring.scores import Scores
    from peft_safety.testing import tiny_llama, tiny_tokenizer
    from peft_safety.tuner import get_masked_lora_model

    base = tiny_llama(seed=0)
    base.save_pretrained(root / "base")
    tiny_tokenizer().save_pretrained(root / "base")
    p = dict(base.named_parameters())
    names = [n for n in p if n.endswith(("q_proj.weight", "v_proj.weight"))]
    mask = SafetyMask(
        {n: torch.arange(0, p[n].numel(), 41, dtype=torch.int32) for n in names},
        {n: tuple(p[n].shape) for n in names},
        provenance={"method": "fixed"},
    )
    mask.save_pretrained(root / "mask")
    set_model = get_peft_model(tiny_llama(seed=0), SafetyConfig(mask=mask, init_weights=False))
    set_model.base_model.model.name_or_path = str(root / "base")
    set_model.save_pretrained(root / "set")
    spa = get_masked_lora_model(tiny_llama(seed=0), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), mask)
    spa.base_model.model.name_or_path = str(root / "base")
    spa.save_pretrained(root / "spa")
    Scores({n: torch.rand(p[n].shape) for n in names}).to_safetensors(root / "scores.safetensors")
    (root / "rows.jsonl").write_text(json.dumps({"prompt": "p", "response": "r"}) + "\n")
    return {"mask": mask, "names": names}


ADAPTER_DAMAGE = (
    "cfg_empty",
    "cfg_truncated",
    "cfg_not_json",
    "cfg_list",
    "cfg_nested",
    "cfg_no_type",
    "cfg_unknown_type",
    "cfg_fifo",
    "w_empty",
    "w_truncated",
    "w_trailing",
    "w_devzero",
    "w_fifo",
    "w_missing",
)


def damaged_adapter(root: Path, kind: str, what: str) -> Path:
    folder = root / "damaged" / f"{kind}-{what}"
    if folder.exists():
        return folder
    shutil.copytree(root / kind, folder)
    cfg, weights = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    text = cfg.read_text()
    edits = {
        "cfg_empty": lambda: cfg.write_text(""),
        "cfg_truncated": lambda: cfg.write_text(text[: len(text) // 2]),
        "cfg_not_json": lambda: cfg.write_text("peft_type: SAFETY\n"),
        "cfg_list": lambda: cfg.write_text("[]"),
        "cfg_nested": lambda: cfg.write_text("[" * 100_000 + "]" * 100_000),
        "cfg_no_type": lambda: cfg.write_text(
            json.dumps({k: v for k, v in json.loads(text).items() if k != "peft_type"})
        ),
        "cfg_unknown_type": lambda: cfg.write_text(json.dumps({**json.loads(text), "peft_type": "SAFTEY"})),
        "cfg_fifo": lambda: (cfg.unlink(), os.mkfifo(cfg)),
        "w_empty": lambda: weights.write_bytes(b""),
        "w_truncated": lambda: weights.write_bytes(weights.read_bytes()[:-7]),
        "w_trailing": lambda: weights.write_bytes(weights.read_bytes() + b"\0" * 5),
        "w_devzero": lambda: (weights.unlink(), weights.symlink_to("/dev/zero")),
        "w_fifo": lambda: (weights.unlink(), os.mkfifo(weights)),
        "w_missing": lambda: weights.unlink(),
    }
    edits[what]()
    return folder


# ------------------------------------------------------------------------------------------------ corpus
def corpus(root: Path, fx: dict[str, Any]) -> list[Case]:
    from peft import AutoPeftModelForCausalLM, PeftModel

    from peft_safety import CalibrationSet, SafetyMask, refusal_rows, score, select
    from peft_safety.cli.main import main
    from peft_safety.scoring.scores import Scores
    from peft_safety.sources.models import load_model
    from peft_safety.testing import tiny_llama, tiny_tokenizer

    cases: list[Case] = []
    base = str(root / "base")

    def cli(*argv: str) -> Callable[[], int]:
        return lambda: main([str(a) for a in argv])

    # adapter folders: our loaders and the command line
    ours = "adapter folders: peft-safety's loaders (load_model, peft-safety eval)"
    peft_entry = "adapter folders: PEFT's and transformers' loaders"
    for kind in ("set", "spa"):
        for what in ADAPTER_DAMAGE:
            folder = damaged_adapter(root, kind, what)
            f = str(folder)
            cases.append(Case(ours, f"{kind}/{what}: load_model(folder)", lambda f=f: load_model(f), needle=f))
            cases.append(
                Case(
                    ours,
                    f"{kind}/{what}: load_model(base, adapter=)",
                    lambda f=f: load_model(base, adapter=f),
                    needle=f,
                )
            )
            cases.append(
                Case(
                    ours,
                    f"{kind}/{what}: peft-safety eval --adapter",
                    cli("eval", base, "--adapter", f, "--harmful", "advbench", "--n", "1", "--max-new-tokens", "1"),
                    needle=f,
                    cli=True,
                )
            )
            for loader, fn in (
                ("PeftModel.from_pretrained", lambda f=f: PeftModel.from_pretrained(tiny_llama(seed=0), f)),
                (
                    "PeftModel.load_adapter",
                    lambda f=f, k=kind: PeftModel.from_pretrained(tiny_llama(seed=0), str(root / k)).load_adapter(
                        f, "second"
                    ),
                ),
                ("transformers load_adapter", lambda f=f: tiny_llama(seed=0).load_adapter(f)),
                ("AutoPeftModelForCausalLM", lambda f=f: AutoPeftModelForCausalLM.from_pretrained(f)),
            ):
                cases.append(Case(peft_entry, f"{kind}/{what}: {loader}", fn, needle=f, route="peft"))

    # mask files
    masks = "mask files (SafetyMask.from_pretrained, peft-safety inspect)"
    raw = (root / "mask" / "safety_mask.safetensors").read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = raw[8 : 8 + header_len].decode()

    def mask_file(name: str, data: bytes | None = None, link: str | None = None, fifo: bool = False) -> Path:
        folder = root / "masks" / name
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "safety_mask.safetensors"
        if link:
            path.symlink_to(link)
        elif fifo:
            os.mkfifo(path)
        else:
            path.write_bytes(data)
        return folder

    def with_header(text: str) -> bytes:
        body = text.encode()
        return len(body).to_bytes(8, "little") + body + raw[8 + header_len :]

    mask_cases = {
        "empty": mask_file("empty", b""),
        "truncated data": mask_file("trunc", raw[:-3]),
        "truncated header": mask_file("trunc-header", raw[: 8 + header_len // 2]),
        "trailing bytes": mask_file("trailing", raw + b"\0\0"),
        "adapter weights, not a mask": mask_file("adapter", (root / "set" / "adapter_model.safetensors").read_bytes()),
        "format_version 2": mask_file(
            "v2", with_header(header.replace('"format_version":"1"', '"format_version":"2"'))
        ),
        "format_version 1_0": mask_file(
            "v1_0", with_header(header.replace('"format_version":"1"', '"format_version":"1_0"'))
        ),
        "header length 2^60": mask_file("huge", (2**60).to_bytes(8, "little") + raw[8:]),
        "nested header": mask_file("nested", with_header("[" * 100_000 + "]" * 100_000)),
        "link to /dev/zero": mask_file("devzero", link="/dev/zero"),
        "folder without a mask": (root / "set"),
    }
    for name, folder in mask_cases.items():
        path = folder / "safety_mask.safetensors" if name != "folder without a mask" else folder
        needle = str(path) if name != "folder without a mask" else str(folder)
        cases.append(
            Case(
                masks,
                f"{name}: SafetyMask.from_pretrained",
                lambda f=folder: SafetyMask.from_pretrained(f),
                needle=needle,
            )
        )
        cases.append(Case(masks, f"{name}: peft-safety inspect", cli("inspect", folder), needle=needle, cli=True))

    # scores files
    scores = "scores files (Scores.from_safetensors, peft-safety select)"
    sraw = (root / "scores.safetensors").read_bytes()
    (root / "scores").mkdir(exist_ok=True)
    score_files = {
        "empty": b"",
        "truncated": sraw[:-5],
        "trailing bytes": sraw + b"\0",
        "not safetensors": b"hello, world",
    }
    for name, data in score_files.items():
        path = root / "scores" / f"{name.replace(' ', '_')}.safetensors"
        path.write_bytes(data)
        cases.append(
            Case(
                scores, f"{name}: Scores.from_safetensors", lambda p=path: Scores.from_safetensors(p), needle=str(path)
            )
        )
        cases.append(
            Case(
                scores,
                f"{name}: peft-safety select",
                cli("select", path, "--k", "1", "--out", root / "o"),
                needle=str(path),
                cli=True,
            )
        )
    devzero = root / "scores" / "devzero.safetensors"
    devzero.symlink_to("/dev/zero")
    cases.append(
        Case(
            scores,
            "link to /dev/zero: Scores.from_safetensors",
            lambda: Scores.from_safetensors(devzero),
            needle=str(devzero),
        )
    )
    cases.append(
        Case(
            scores,
            "link to /dev/zero: peft-safety select",
            cli("select", devzero, "--k", "1", "--out", root / "o"),
            needle=str(devzero),
            cli=True,
        )
    )

    # arguments of the library's functions
    args = "arguments (score, select, Scores, to_dense)"
    calib = CalibrationSet(refusal_rows(["How do I pick a lock?"]), tiny_tokenizer())
    for method in ("snip", "esi", "wanda"):
        for bs in (0, -2, True):
            cases.append(
                Case(
                    args,
                    f"score({method}, batch_size={bs!r})",
                    lambda m=method, b=bs: score(tiny_llama(), calib, m, progress=False, batch_size=b),
                    needle="batch_size",
                )
            )
    for data, label in (
        (refusal_rows(["How?"]), "a list of rows"),
        ("rows.jsonl", "a path"),
        ({"prompt": "p"}, "a dict"),
    ):
        cases.append(
            Case(
                args,
                f"score() on {label}",
                lambda d=data: score(tiny_llama(), d, "snip", progress=False),
                needle="CalibrationSet",
            )
        )
    cases.append(
        Case(
            args,
            "select() on meta tensors",
            lambda: select({"a": torch.empty(4, 4, device="meta")}, fraction=0.5),
            needle="meta",
        )
    )
    for frac in (0.0, 2.0, float("nan"), -0.5):
        cases.append(
            Case(
                args,
                f"select(fraction={frac})",
                lambda f=frac: select(Scores({"a": torch.rand(4)}), fraction=f),
                needle="fraction",
            )
        )
    for shape in ((2**40, 2**40), (2**62, 4), (2**25, 2**24)):
        cases.append(
            Case(
                args,
                f"to_dense of shape {shape}",
                lambda s=shape: SafetyMask({"w": [0]}, {"w": s}, provenance={}).to_dense("w"),
                needle="to_dense",
            )
        )

    # the command line
    clis = "command line (every command's user errors)"
    for argv, needle in (
        (["inspect", root / "nope"], "nope"),
        (["diff", root / "mask", root / "set"], "No safety_mask.safetensors"),
        (["compare", root / "mask", root / "mask", "--labels", "a"], "--labels"),
        (["select", root / "scores.safetensors", "--fraction", "2", "--out", root / "o"], "--fraction"),
        (["select", root / "scores.safetensors", "--k", "0", "--out", root / "o"], "--k"),
        (["select", root / "scores.safetensors", "--k", "1", "--scope", "per_rows", "--out", root / "o"], "per_row"),
        (["score", "default", "--data", root / "rows.jsonl", "--method", "snp", "--out", root / "o"], "snip"),
        (["score", "default", "--data", root / "missing.jsonl", "--out", root / "o"], "missing.jsonl"),
        (
            ["score", "default", "--data", root / "rows.jsonl", "--batch-size", "0", "--out", root / "o"],
            "--batch-size",
        ),
        (["eval", "default", "--harmful", "advbnch"], "advbench"),
        (["eval", "default", "--judges", "wei2042"], "wei2042"),
        (["eval", "default", "--n", "0"], "--n"),
        (["push", root / "mask", "not a repo"], "not a repo"),
        (["push", root / "mask", "me/mask", "--mode", "lora"], "lora"),
        (["fetch", "--data", "harmbnch_test"], "harmbench_test"),
    ):
        cases.append(Case(clis, " ".join(str(a) for a in argv[:1] + argv[-2:]), cli(*argv), needle=needle, cli=True))

    # saves next to planted symlinks
    saves = "saves (adapter_config.json, README.md, masks) next to a planted symlink"

    def planted(name: str, target_name: str) -> tuple[Path, Path]:
        folder = root / "planted" / name
        folder.mkdir(parents=True, exist_ok=True)
        victim = root / "planted" / f"{name}.victim"
        victim.write_text("KEEP")
        (folder / target_name).symlink_to(victim)
        return folder, victim

    def save_adapter(kind: str, target_name: str) -> None:
        folder, victim = planted(f"{kind}-{target_name}", target_name)
        PeftModel.from_pretrained(tiny_llama(seed=0), str(root / kind)).save_pretrained(folder)
        if victim.read_text() != "KEEP":
            raise Wrong(f"save_pretrained wrote through the symlink at {target_name}")

    def save_mask() -> None:
        folder, victim = planted("mask", "safety_mask.safetensors")
        fx["mask"].save_pretrained(folder)
        if victim.read_text() != "KEEP":
            raise Wrong("the mask save wrote through the symlink")

    def card() -> None:
        from peft_safety.mask.cards import write_card

        folder, victim = planted("card", "README.md")
        write_card(folder, mask=fx["mask"])
        if victim.read_text() != "KEEP" or "KEEP" in (folder / "README.md").read_text():
            raise Wrong("write_card read or wrote through the symlink")

    for kind in ("set", "spa"):
        cases.append(
            Case(
                saves,
                f"{kind}: save_pretrained, symlink at adapter_config.json",
                lambda k=kind: save_adapter(k, "adapter_config.json"),
                expect="result",
            )
        )
        cases.append(
            Case(
                saves,
                f"{kind}: save_pretrained, symlink at README.md",
                lambda k=kind: save_adapter(k, "README.md"),
                expect="result",
                route="peft",
            )
        )
    cases.append(Case(saves, "SafetyMask.save_pretrained, symlink at the mask file", save_mask, expect="result"))
    cases.append(Case(saves, "write_card, symlink at README.md", card, expect="result"))

    cases += tuner_cases(root)
    return cases


def tuner_cases(root: Path) -> list[Case]:
    """Wrong loads whose fixes belong to the tuner (a policy written into the file, non-finite LoRA factors, weights
    the config does not place, a relabelled peft_type). Counted apart while they are open."""
    from peft import PeftModel

    from peft_safety.testing import tiny_llama
    from peft_safety.tuner.provenance import state_dict_digest

    entry = "tuner loads (adapter content)"
    item = "tuner loading fixes (issue 22, items 1-10)"
    cases: list[Case] = []

    def edited(kind: str, name: str, edit_config=None, edit_weights=None) -> str:
        from safetensors.torch import load_file, save_file

        folder = root / "tuner" / f"{kind}-{name}"
        if not folder.exists():
            shutil.copytree(root / kind, folder)
            cfg = json.loads((folder / "adapter_config.json").read_text())
            tensors = load_file(folder / "adapter_model.safetensors")
            if edit_weights:
                tensors = edit_weights(tensors)
                save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
                cfg["weights_digest"] = state_dict_digest(tensors)
            if edit_config:
                cfg = edit_config(cfg)
            (folder / "adapter_config.json").write_text(json.dumps(cfg))
        return str(folder)

    other_base = tiny_llama(seed=1)

    def policy_in_file(kind: str) -> str:
        return edited(kind, "policy", edit_config=lambda c: {**c, "base_fingerprint_check": "ignore"})

    def nan_b(t):
        return {k: (torch.full_like(v, float("nan")) if "lora_B" in k else v) for k, v in t.items()}

    def relabel(c):
        return {**c, "peft_type": "LORA"}

    def first_target(kind: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
        def drop(c):
            targets = c.get("target_modules")
            if isinstance(targets, list) and len(targets) > 1:
                c = {**c, "target_modules": targets[1:]}
            return c

        return drop

    for kind in ("set", "spa"):
        f = policy_in_file(kind)
        cases.append(
            Case(
                entry,
                f"{kind}: fingerprint policy 'ignore' written in the file, transformers load_adapter on another base",
                lambda f=f: other_base.load_adapter(f),
                needle="fingerprint",
                route="peft",
                open_item=item,
            )
        )
        f = edited(kind, "relabel", edit_config=relabel)
        cases.append(
            Case(
                entry,
                f"{kind}: peft_type relabelled LORA, PeftModel.from_pretrained",
                lambda f=f: PeftModel.from_pretrained(tiny_llama(seed=0), f),
                needle="LORA",
                route="peft",
                open_item=item,
            )
        )
    f = edited("spa", "nan_b", edit_weights=nan_b)
    cases.append(
        Case(
            entry,
            "spa: lora_B NaN (digest recomputed), PeftModel.from_pretrained",
            lambda: PeftModel.from_pretrained(tiny_llama(seed=0), f),
            needle="finite",
            open_item=item,
        )
    )
    f2 = edited("spa", "drop_target", edit_config=first_target("spa"))
    cases.append(
        Case(
            entry,
            "spa: a masked module dropped from target_modules, PeftModel.from_pretrained",
            lambda: PeftModel.from_pretrained(tiny_llama(seed=0), f2),
            needle="target_modules",
            open_item=item,
        )
    )
    return cases


# ------------------------------------------------------------------------------------------------ report
KINDS = ("clear", "unclear", "crash", "silent")
PEFT_PATH_KEYS = ("unclear_on_peft_path", "crash_on_peft_path", "silent_on_peft_path")


def summarise(cases: list[Case]) -> list[dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    for c in cases:
        key = c.entry if c.open_item is None else f"{c.entry} [open: {c.open_item}]"
        row = rows.setdefault(
            key,
            {"entry": key, "tried": 0, **dict.fromkeys(KINDS, 0), **dict.fromkeys(PEFT_PATH_KEYS, 0)},
        )
        row["tried"] += 1
        row[c.outcome] += 1
        if c.outcome != "clear" and c.route == "peft":
            row[f"{c.outcome}_on_peft_path"] += 1
    return list(rows.values())


def render(payload: dict[str, Any]) -> str:
    """The table of docs/reliability.md; in parentheses, the part that only PEFT's own loaders produce."""
    lines = [
        "| entry point | bad inputs tried | clear | unclear (on PEFT's path) | crashes (on PEFT's path) | silent (on PEFT's "
        "path) |",
        "|---|---|---|---|---|---|",
    ]
    rows = [*payload["summary"], {"entry": "**all** (without the open rows)", **payload["totals"]}]
    for r in rows:
        lines.append(
            f"| {r['entry']} | {r['tried']} | {r['clear']} | {r['unclear']} ({r['unclear_on_peft_path']}) | "
            f"{r['crash']} ({r['crash_on_peft_path']}) | {r['silent']} ({r['silent_on_peft_path']}) |"
        )
    return "\n".join(lines)


def write_docs(payload: dict[str, Any]) -> None:
    text = DOC.read_text(encoding="utf-8")
    start, stop = text.index(BEGIN) + len(BEGIN), text.index(END)
    DOC.write_text(text[:start] + "\n" + render(payload) + "\n" + text[stop:], encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "robustness.json"))
    parser.add_argument("--write-docs", action="store_true", help="rewrite the generated table in docs/reliability.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    prov = _bench.provenance(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        fx = build(root)
        cases = corpus(root, fx)
        for i, case in enumerate(cases, 1):
            classify_isolated(case)
            print(f"[{i}/{len(cases)}] {case.outcome:8s} {case.entry[:40]:40s} {case.name[:70]}", flush=True)
        for c in cases:  # machine-independent records: the temporary folder is not part of the result
            c.detail = c.detail.replace(tmp, "<tmp>")
    summary = summarise(cases)
    totals = {k: sum(r[k] for r in summary if "[open" not in r["entry"]) for k in ("tried", *KINDS, *PEFT_PATH_KEYS)}
    payload = {
        "provenance": _bench.finish(prov),
        "timeout_s": TIMEOUT_S,
        "summary": summary,
        "totals": totals,
        "cases": [
            {
                "entry": c.entry,
                "case": c.name,
                "route": c.route,
                "outcome": c.outcome,
                "open": c.open_item,
                "detail": c.detail,
                "seconds": round(c.seconds, 3),
            }
            for c in cases
        ],
    }
    _bench.write_json(args.out, payload)
    print()
    print(render(payload))
    if args.write_docs:
        write_docs(payload)
        print(f"\n{DOC} updated")
    counts = Counter(c.outcome for c in cases if c.open_item is None)
    print(f"\n{dict(counts)}; written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
