"""Which base model an adapter belongs to: its Hub id / revision and fingerprints of the weights it targets.

An adapter (SET or SPA) is only meaningful on the base weights it was trained on. This module gives the two records
that travel with a saved adapter, and the check that runs when it is loaded:

* `base_model_reference(model)`: where the base model came from, as something other people can load. A model loaded
  from the Hub records its Hub id. A model loaded from a local folder records the Hub id when the folder says where it
  came from (a Hugging Face cache snapshot ``.../models--org--name/snapshots/<commit>``, or a folder written by
  ``peft_safety.sources`` with a ``peft_safety_source.json`` marker naming its Hub id); any other folder is recorded
  as ``source="local"`` with its path, which loads on this machine only.
* `fingerprint_base(model, names)`: for each named weight, the `peft_safety.mask.fingerprint_tensor` fingerprint (4096
  sampled values rounded to bfloat16, plus the shape). Only the weights the adapter touches are fingerprinted, so the
  cost is at most 4096 values per targeted tensor, whatever the model size. A second fingerprint of the float16 cast
  is recorded when it differs, so that an adapter trained on a float32 base also checks clean on a float16 copy.
* `check_base_fingerprints(model, recorded, policy=...)`: recomputes the fingerprints on the model being loaded into
  and raises (``policy="error"``, the default), warns (``"warn"``) or does nothing (``"ignore"``) when one differs.
  The message names the first mismatching tensor and how to override.
* `fingerprint_check_override(policy)`: a context manager that sets the policy for every check inside it (for load
  entry points that take no extra argument); `override_policy(default)` reads it.
* `state_dict_digest(state_dict)`: a key-independent digest of a state dict's tensors, to tie a saved config to the
  weights file written with it (an interrupted save leaves new weights next to an old config);
  `check_weights_digest(config, state_dict)` is the check both tuners run on load.
* `record_base(config, model, names)` / `check_base(config, model)`: what both tuners do with these records when an
  adapter is created from a mask and when a saved one is loaded.
* `ProvenanceConfigMixin`: the provenance fields of both adapter configs, and their loader-chosen
  ``fingerprint_check`` (the project's one spelling of the policy, `peft_safety.vocab.FINGERPRINT_POLICIES`);
  `mask_attribute`: both configs' ``mask`` attribute, which also records where the mask came from (``mask_source``).

What the fingerprint cannot see: quantised base weights (bitsandbytes 4/8-bit: the stored integers are not the float
values), weights on the ``meta`` device and sharded weights (FSDP2 ``DTensor``, DeepSpeed ZeRO-3 placeholders) are
skipped, both when recording and when checking. A base first saved in float16 and then loaded in bfloat16 (or the
reverse) may be reported as different (double rounding); override with ``"warn"`` when you know it is the same
checkpoint.

Example:

```python
>>> from peft_safety.tuner.provenance import base_model_reference, check_base_fingerprints, fingerprint_base
>>> names = ["model.layers.0.self_attn.q_proj.weight"]
>>> recorded = fingerprint_base(model, names)                          # doctest: +SKIP
>>> check_base_fingerprints(model, recorded, policy="error")           # doctest: +SKIP
[]
>>> base_model_reference(model)                                        # doctest: +SKIP
{'base_model': 'HuggingFaceTB/SmolLM2-135M-Instruct', 'revision': None, 'source': 'hub'}
```
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import logging
import os
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..vocab import check_fingerprint_policy
from ._config_files import ConfigFilesMixin

__all__ = [
    "SOURCE_MARKER",
    "ProvenanceConfigMixin",
    "base_model_reference",
    "check_base",
    "check_base_fingerprints",
    "adapter_file",
    "check_weights_digest",
    "digest_of_folder",
    "fingerprint_base",
    "fingerprint_check_override",
    "mask_attribute",
    "override_policy",
    "record_base",
    "refuse_file_mask",
    "state_dict_digest",
]

logger = logging.getLogger(__name__)

#: File that ``peft_safety.sources`` writes into a converted model folder; its ``"hub_id"`` names the Hub original.
SOURCE_MARKER = "peft_safety_source.json"

# .../models--<org>--<name>/snapshots/<commit>[/...]: the layout of the Hugging Face cache.
_HF_CACHE_RE = re.compile(
    r"(?:^|[\\/])models--(?P<repo>[^\\/]+)[\\/]snapshots[\\/](?P<rev>[0-9a-fA-F]{40})(?:[\\/]|$)"
)
# A Hub repo id: "name" or "org/name" with the characters the Hub accepts.
_HUB_ID_RE = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]*/)?[A-Za-z0-9][A-Za-z0-9._-]*$")


_OVERRIDE: contextvars.ContextVar[str | None] = contextvars.ContextVar("peft_safety_fingerprint_check", default=None)


@contextlib.contextmanager
def fingerprint_check_override(policy: str) -> Iterator[None]:
    """Within the block, every base-fingerprint check of a loading adapter uses ``policy`` (whatever its config says).

    For the load entry points that take no extra keyword argument (``PeftModel.load_adapter``, transformers'
    ``model.load_adapter``, ``inject_adapter_in_model``).

    Example:

    ```python
    >>> with fingerprint_check_override("warn"):                           # doctest: +SKIP
    ...     peft_model.load_adapter("my-set-adapter", adapter_name="other")
    ```
    """
    token = _OVERRIDE.set(check_fingerprint_policy(policy, where="policy"))
    try:
        yield
    finally:
        _OVERRIDE.reset(token)


def override_policy(default: str) -> str:
    """The policy in force: the innermost `fingerprint_check_override`, else ``default``."""
    current = _OVERRIDE.get()
    return current if current is not None else default


def state_dict_digest(state_dict: Mapping[str, torch.Tensor]) -> str:
    """A digest of a state dict's tensors (dtype, shape and bytes), independent of key names and order.

    Key names are left out on purpose: loaders rename keys (adapter names, ``base_model.model.`` prefixes, checkpoint
    conversion mappings) but never change values, so the digest of the file at save time equals the digest of the
    state dict a loader receives. Used to tie a config to the weights file it was saved with.

    Args:
        state_dict: name -> tensor (non-tensor values are ignored).

    Returns:
        ``"b2b:<32 hex digits>"``.
    """
    per_tensor = []
    for value in state_dict.values():
        if not isinstance(value, torch.Tensor):
            continue
        t = value.detach().to("cpu").contiguous().reshape(-1)
        h = hashlib.blake2b(digest_size=16)
        h.update(f"{t.dtype}|{tuple(value.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
        per_tensor.append(h.hexdigest())
    total = hashlib.blake2b(digest_size=16)
    for item in sorted(per_tensor):
        total.update(item.encode())
    return f"b2b:{total.hexdigest()}"


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under a ``PeftModel`` (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _reference_of(text: str) -> dict[str, Any] | None:
    if os.path.isdir(text):
        marker = os.path.join(text, SOURCE_MARKER)
        if os.path.isfile(marker):
            try:
                with open(marker, encoding="utf-8") as fh:
                    hub_id = json.load(fh).get("hub_id")
            except (OSError, ValueError, AttributeError):
                hub_id = None
            if isinstance(hub_id, str) and _HUB_ID_RE.match(hub_id):
                return {"base_model": hub_id, "revision": None, "source": "hub"}
        match = _HF_CACHE_RE.search(os.path.abspath(text))
        if match:
            repo = match.group("repo").replace("--", "/")
            return {"base_model": repo, "revision": match.group("rev"), "source": "hub"}
        return {"base_model": text, "revision": None, "source": "local"}
    if _HUB_ID_RE.match(text):
        return {"base_model": text, "revision": None, "source": "hub"}
    return None


def base_model_reference(model: nn.Module) -> dict[str, Any]:
    """Where ``model``'s weights came from, in a form that can be written into a saved artifact.

    Reads ``model.config._name_or_path`` (then ``model.name_or_path``). A local folder becomes its Hub id when the
    folder says so (Hugging Face cache snapshot, or a ``peft_safety_source.json`` marker); otherwise it is recorded as
    local. The revision is known for cache snapshots (the commit) and when the config carries ``_commit_hash``.

    Args:
        model: a transformers model, or a ``PeftModel`` around one.

    Returns:
        ``{"base_model": str | None, "revision": str | None, "source": "hub" | "local" | None}``; all `None` when
        the model names no origin (e.g. built from a config).
    """
    inner = _unwrap(model)
    config = getattr(inner, "config", None)
    candidates = [getattr(config, "_name_or_path", None), getattr(inner, "name_or_path", None)]
    for candidate in candidates:
        if isinstance(candidate, os.PathLike):
            candidate = os.fspath(candidate)
        if not isinstance(candidate, str) or not candidate.strip():
            continue
        ref = _reference_of(candidate)
        if ref is None:
            continue
        commit = getattr(config, "_commit_hash", None)
        if ref["source"] == "hub" and ref["revision"] is None and isinstance(commit, str) and commit:
            ref["revision"] = commit
        return ref
    return {"base_model": None, "revision": None, "source": None}


def _weight_of(model: nn.Module, name: str) -> torch.Tensor | None:
    """The tensor ``name`` of the base model, looking through PEFT wrappers (``base_layer``); None if absent."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    module_key, _, attr = name.rpartition(".")
    try:
        module = model.get_submodule(module_key) if module_key else model
    except AttributeError:
        return None
    if isinstance(module, BaseTunerLayer):
        module = module.get_base_layer()
    tensor = getattr(module, attr, None)
    return tensor if isinstance(tensor, torch.Tensor) else None


def _checkable(tensor: torch.Tensor) -> bool:
    # bitsandbytes stores packed integers (Params4bit: uint8, Int8Params: int8): not the float values. Sharded
    # weights (FSDP2 DTensors, DeepSpeed ZeRO-3 placeholders with `ds_shape`) hold only a part of the values.
    if not tensor.dtype.is_floating_point or tensor.device.type == "meta" or tensor.numel() == 0:
        return False
    return not (hasattr(tensor, "ds_shape") or type(tensor).__name__ == "DTensor")


def _fingerprints(tensor: torch.Tensor) -> list[str]:
    from ..mask import fingerprint_tensor

    prints = [fingerprint_tensor(tensor)]
    if tensor.dtype != torch.float16:
        half = fingerprint_tensor(tensor.detach().to(torch.float16))
        if half != prints[0]:
            prints.append(half)
    return prints


def fingerprint_base(model: nn.Module, names: Iterable[str]) -> dict[str, list[str]]:
    """Fingerprints of the named base weights (only those; cost: at most 4096 values per tensor, twice).

    Args:
        model: the base model, a model with PEFT layers injected (their ``base_layer`` weights are read) or a
            ``PeftModel``.
        names: parameter names relative to the base model, e.g. ``"model.layers.0.self_attn.q_proj.weight"``.

    Returns:
        ``{name: [fingerprint, fingerprint of the float16 cast (when it differs)]}``. Quantised weights and weights
        on the meta device are left out (they cannot be compared with float weights).

    Raises:
        ValueError: a name the model does not have.
    """
    inner = _unwrap(model)
    out: dict[str, list[str]] = {}
    for name in names:
        tensor = _weight_of(inner, name)
        if tensor is None:
            raise ValueError(f"Cannot fingerprint {name!r}: the model has no such tensor.")
        if _checkable(tensor):
            out[name] = _fingerprints(tensor)
    return out


def check_base_fingerprints(
    model: nn.Module,
    recorded: Mapping[str, str | Sequence[str]] | None,
    *,
    policy: str = "error",
    what: str = "This adapter",
    recorded_base: str | None = None,
    override: str = "fingerprint_check='warn' (or 'ignore')",
) -> list[str]:
    """Compare ``model``'s weights with fingerprints recorded when an artifact was made.

    Args:
        model: the model the artifact is being loaded into (PEFT wrappers are looked through).
        recorded: ``{name: fingerprint or list of accepted fingerprints}`` (as written by `fingerprint_base`);
            `None` or empty: nothing to check.
        policy: ``"error"`` (raise), ``"warn"`` (one warning naming every mismatch) or ``"ignore"``.
        what: how to name the artifact in the message (e.g. ``"SAFETY adapter 'default'"``).
        recorded_base: the base model the artifact records (Hub id or path), quoted in the message.
        override: how the user turns the check down, quoted in the message.

    Returns:
        The names whose fingerprint differs or which the model lacks (empty when everything matches). Quantised and
        meta tensors are not compared.

    Raises:
        ValueError: ``policy="error"`` and a fingerprint differs or a recorded tensor is missing; or a bad policy.
        TypeError: ``recorded`` is not a mapping of strings.
    """
    check_fingerprint_policy(policy, where="fingerprint_check")
    if policy == "ignore" or not recorded:
        return []
    if not isinstance(recorded, Mapping):
        raise TypeError(f"recorded fingerprints must be a dict, got {type(recorded).__name__}.")
    inner = _unwrap(model)
    mismatches: list[str] = []
    details: list[str] = []
    for name, wanted in recorded.items():
        accepted = [wanted] if isinstance(wanted, str) else list(wanted)
        if not isinstance(name, str) or not accepted or not all(isinstance(w, str) for w in accepted):
            raise TypeError(f"recorded fingerprint of {name!r} must be a string or a list of strings, got {wanted!r}.")
        tensor = _weight_of(inner, name)
        if tensor is None:
            mismatches.append(name)
            details.append(f"{name!r} is missing from the model")
            continue
        if not _checkable(tensor):
            logger.info("Base fingerprint of %s not checked: %s weights on %s", name, tensor.dtype, tensor.device)
            continue
        from ..mask import fingerprint_tensor

        got = fingerprint_tensor(tensor)
        if got in accepted:
            continue
        if tensor.dtype != torch.float16 and fingerprint_tensor(tensor.detach().to(torch.float16)) in accepted:
            continue
        mismatches.append(name)
        details.append(f"the fingerprint of {name!r} differs (recorded {accepted[0]!r}, found {got!r})")
    if not mismatches:
        return []
    base = f" ({recorded_base})" if recorded_base else ""
    more = f", and {len(mismatches) - 1} more tensor(s)" if len(mismatches) > 1 else ""
    message = (
        f"{what} was made on other base weights than this model's{base}: {details[0]}{more}. Load it on the base "
        f"model it was made from (same checkpoint and revision). If the difference is intended (e.g. a fine-tuned "
        f"copy of that base), pass {override}."
    )
    if policy == "error":
        raise ValueError(message)
    warnings.warn(message, UserWarning, stacklevel=3)
    return mismatches


def digest_of_folder(directory: str) -> str | None:
    """`state_dict_digest` of the adapter weights in ``directory`` (safetensors or ``.bin``; None when there are none)."""
    from peft.utils.constants import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME

    path = os.path.join(directory, SAFETENSORS_WEIGHTS_NAME)
    if os.path.isfile(path):
        from safetensors.torch import load_file

        return state_dict_digest(load_file(path))
    path = os.path.join(directory, WEIGHTS_NAME)
    if os.path.isfile(path):
        import torch

        return state_dict_digest(torch.load(path, map_location="cpu", weights_only=True))
    return None


def check_weights_digest(config: Any, state_dict: Mapping[str, torch.Tensor], what: str) -> None:
    """Refuse weights that were not saved with ``config`` (the ``weights_digest`` a save recorded), then clear it.

    Once checked, the in-memory config describes the model, not a file: the digest is set to `None` so that a later
    in-memory state-dict round trip (after training) is not mistaken for an interrupted save.

    Raises:
        ValueError: the digests differ (a save interrupted after the weights and before the config).
    """
    digest = getattr(config, "weights_digest", None)
    if digest is None:
        return
    got = state_dict_digest(state_dict)
    if got != digest:
        raise ValueError(
            f"{what}'s {adapter_file(config, 'adapter_config.json')} and its weights "
            f"({adapter_file(config, 'adapter_model.safetensors')}) do not belong together (weights digest {got}, the "
            f"config records {digest}): a save was probably interrupted after writing the weights and before writing "
            "the config, or one of the files was edited by hand. Save the adapter again (or restore both files from "
            "the same save)."
        )
    config.weights_digest = None


def adapter_file(config: Any, filename: str) -> str:
    """``<folder>/<filename>`` when ``config`` was read from a folder (``<Config>.from_pretrained``, which every PEFT
    loader calls), else ``filename``: how load errors name the file they are about."""
    folder = getattr(config, "__dict__", {}).get("_loaded_from")
    return os.path.join(folder, filename) if folder else filename


def refuse_file_mask(config: Any, mask: Any) -> None:
    """A config built from ``adapter_config.json`` (PEFT passes the file's ``peft_type`` on, which a config built in
    code never needs) must not take its mask from the file: such a mask would replace the saved layout and turn the
    load into a creation that records the base instead of checking it.

    Raises:
        ValueError: ``mask`` is a JSON value (not a `SafetyMask`) and ``peft_type`` was given.
    """
    from ..mask import SafetyMask

    if mask is None or isinstance(mask, SafetyMask) or config.peft_type is None:
        return
    raise ValueError(
        f"{type(config).__name__} was given mask={mask!r} together with peft_type={config.peft_type!r}, as "
        "adapter_config.json would: a saved adapter never stores its mask there (its weights file holds the indices), "
        "and a mask named by the file would skip the base-model check. Remove the 'mask' key from the file (or, in "
        "code, pass mask= without peft_type=)."
    )


def record_base(config: Any, model: nn.Module, names: Iterable[str]) -> None:
    """Write the base model's records into an adapter config created from a mask: the fingerprints of ``names``
    (`fingerprint_base`), where the base came from (``base_model_source``) and, for a Hub base, its id and revision."""
    config.base_fingerprints = fingerprint_base(model, names) or None
    ref = base_model_reference(model)
    config.base_model_source = ref["source"]
    if ref["source"] == "hub":
        config.base_model_name_or_path = ref["base_model"]
        if config.revision is None:
            config.revision = ref["revision"]


#: How a user turns the check down, quoted in the error.
_OVERRIDE_HINT = (
    "fingerprint_check='warn' (or 'ignore') to PeftModel.from_pretrained / <Config>.from_pretrained, or load inside "
    "`with peft_safety.tuner.provenance.fingerprint_check_override('warn'):`"
)


def check_base(config: Any, model: nn.Module, what: str) -> list[str]:
    """Compare a loading adapter's recorded base fingerprints with ``model`` under the policy in force (the
    innermost `fingerprint_check_override`, else the config's loader-chosen ``fingerprint_check``).

    Returns:
        The mismatching names (see `check_base_fingerprints`).

    Raises:
        ValueError: a mismatch under the ``"error"`` policy.
    """
    return check_base_fingerprints(
        model,
        config.base_fingerprints,
        policy=override_policy(config.fingerprint_check),
        what=what,
        recorded_base=config.base_model_name_or_path,
        override=_OVERRIDE_HINT,
    )


@dataclass
class ProvenanceConfigMixin(ConfigFilesMixin):
    """Provenance fields and config-file behaviour shared by peft-safety's adapter configs (put it before the PEFT
    config class in the bases).

    * the fields ``base_fingerprints``, ``base_model_source`` and ``weights_digest``, validated in `__post_init__`;
    * ``fingerprint_check``: what loading does when the base weights differ from ``base_fingerprints`` (``"error"``,
      the default, ``"warn"`` or ``"ignore"``). It is the loader's choice, so it is an attribute and not a dataclass
      field: ``to_dict`` and ``save_pretrained`` never see it, and a value added to ``adapter_config.json`` by hand
      is dropped by PEFT's loader as an unknown key instead of weakening the check;
    * `save_pretrained` records ``weights_digest``, the digest of the weights file already in the folder:
      ``PeftModel.save_pretrained`` writes the weights first and the config last, so the digest ties the config to the
      weights it was saved with, and a later save interrupted after its weights file fails the check on load. The
      digest is written to the file only; the in-memory config is left as it was;
    * `from_pretrained` takes ``fingerprint_check=...`` (so does ``PeftModel.from_pretrained``, which passes its
      keyword arguments on); without it the policy is ``"error"``.
    """

    base_fingerprints: dict[str, list[str]] | None = field(
        default=None,
        metadata={
            "help": "Filled by the tuner: fingerprints of the base weights the adapter targets "
            "(peft_safety.tuner.provenance.fingerprint_base), checked when the adapter is loaded. Do not set by hand."
        },
    )
    base_model_source: str | None = field(
        default=None,
        metadata={
            "help": "Filled by the tuner: 'hub' when base_model_name_or_path is a Hub id (also for a local copy whose "
            "folder names its Hub id), 'local' for a local folder that names none, None when unknown."
        },
    )
    weights_digest: str | None = field(
        default=None,
        metadata={
            "help": "Written by save_pretrained after the weights file: a digest of the saved tensors. A folder whose "
            "weights do not match it (an interrupted save left new weights with an old config) is refused on load."
        },
    )

    def __post_init__(self) -> None:
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()
        if self.base_fingerprints is not None and not isinstance(self.base_fingerprints, dict):
            raise TypeError(f"base_fingerprints must be a dict, got {type(self.base_fingerprints).__name__}.")

    def _init_mask(self, mask: Any, *, kinds: tuple[str, ...], allow_empty: bool, how: str) -> None:
        """The end of both configs' ``__post_init__``: take the mask (see `mask_attribute`), or check the
        ``mask_layout`` of a saved adapter (``_layout.check_layout``); neither is an error naming ``how`` to build one.
        """
        from ._layout import check_layout

        #: what the tuner derives from the mask in memory (never serialised; read when the layers are built)
        self._safety_indices: dict[str, Any] = {}
        self.__dict__["_mask"] = None
        if mask is not None:
            self.mask = mask
        elif self.mask_layout is None:
            raise ValueError(
                f"{type(self).__name__} needs a mask: {how}. A saved adapter carries mask_layout instead; this config "
                "has neither."
            )
        else:
            self.mask_layout = check_layout(self.mask_layout, kinds=kinds, allow_empty=allow_empty)

    @property
    def fingerprint_check(self) -> str:
        """What loading does when the base weights differ from the recorded fingerprints: ``"error"`` (default),
        ``"warn"`` or ``"ignore"`` (`peft_safety.vocab.FINGERPRINT_POLICIES`). Never saved."""
        return self.__dict__.get("_fingerprint_check", "error")

    @fingerprint_check.setter
    def fingerprint_check(self, policy: str) -> None:
        self.__dict__["_fingerprint_check"] = check_fingerprint_policy(policy)

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        previous = self.weights_digest
        self.weights_digest = digest_of_folder(save_directory)
        try:
            super().save_pretrained(save_directory, **kwargs)  # type: ignore[misc]
        finally:
            self.weights_digest = previous

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs: Any):
        policy = kwargs.pop("fingerprint_check", "error")
        check_fingerprint_policy(policy)
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)  # type: ignore[misc]
        config.fingerprint_check = policy
        folder = os.fspath(pretrained_model_name_or_path)
        # where the config was read from: named by every load error about this adapter's files (never saved)
        config.__dict__["_loaded_from"] = os.path.join(folder, subfolder) if subfolder else folder
        return config

    @classmethod
    def from_json_file(cls, path_json_file: str, **kwargs: Any) -> dict[str, Any]:
        """Read ``adapter_config.json``; a ``"mask"`` key is refused (a saved adapter never stores its mask there, and
        a mask named by the file would replace the saved layout and skip the base-fingerprint check)."""
        loaded = super().from_json_file(path_json_file, **kwargs)  # type: ignore[misc]
        if isinstance(loaded, dict) and "mask" in loaded:
            raise ValueError(
                f"{path_json_file} has a 'mask' key ({loaded['mask']!r}). A saved adapter never stores its mask in "
                "adapter_config.json (the indices live in its weights file and mask_layout describes them), and a "
                "mask named by the file would replace what was saved and skip the base-model check. The file was "
                "edited by hand: remove the key, or save the adapter again."
            )
        return loaded


def mask_attribute(config_name: str, on_set: Callable[[Any, Any], None]) -> property:
    """The ``mask`` attribute of an adapter config whose dataclass takes ``mask`` as an init-only argument.

    The mask is never a dataclass field (so ``to_dict()`` and ``save_pretrained`` never see it, as SHiRA keeps its
    runtime ``mask_fn`` off its fields); the attribute reads it back and replaces it. Setting a path or Hub id loads it
    with ``SafetyMask.from_pretrained`` and records it as ``mask_source``; a ``SafetyMask`` fills ``mask_source`` from
    its provenance when the config has none. ``on_set(config, mask)`` then derives what the config keeps from it.

    Args:
        config_name: the config class's name, for messages.
        on_set: called with the config and the loaded ``SafetyMask``.
    """

    def get(self: Any) -> Any:
        return self.__dict__.get("_mask")

    def set_(self: Any, mask: Any) -> None:
        from ..mask import SafetyMask

        if isinstance(mask, str):
            self.mask_source = mask
            mask = SafetyMask.from_pretrained(mask)
        elif not isinstance(mask, SafetyMask):
            raise TypeError(
                f"{config_name}(mask=...) takes a SafetyMask or a path / Hub repo id string, got {type(mask).__name__}."
            )
        elif self.mask_source is None:
            source = mask.provenance.get("source")
            self.mask_source = source if isinstance(source, str) else None
        on_set(self, mask)
        self.__dict__["_mask"] = mask

    doc = "The ``SafetyMask`` the adapter is built from; `None` for a config read from a saved adapter. Never saved."
    return property(get, set_, doc=doc)
