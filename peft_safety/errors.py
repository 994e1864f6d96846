"""The exceptions peft-safety raises when an input is wrong (standard library only, so every stage may import it).

Every check of an argument, a file or a model that peft-safety makes on purpose raises a `SafetyError` (or one of its
subclasses below) with a message that names the value or file and says how to fix it. Anything else that escapes
the library (an `IndexError`, a `RuntimeError` from torch, a plain `ValueError` from a third-party package) is not a
verdict on the input but a failure: the command line prints those with their traceback, and only `SafetyError` (and
huggingface_hub's typed errors) as one line.

Each class also derives from the built-in exception the same check raised before it existed, so ``except
ValueError`` / ``pytest.raises(TypeError)`` keep catching it:

| class | also a | raised for |
|---|---|---|
| `SafetyError` | `ValueError` | a wrong value: an argument out of range, an unknown name, a mask that does not fit a model |
| `SafetyTypeError` | `TypeError` | an argument of the wrong type |
| `SafetyFileError` | `ValueError` | a file that exists but cannot be what it claims: empty, truncated, not JSON, a device |
| `SafetyFileNotFoundError` | `FileNotFoundError` | a path that does not exist, or a folder that lacks a file it needs |
| `SafetyImportError` | `ImportError` | an optional dependency (an extra such as ``[trl]``) that is not installed |
| `HubUnreachableError` | `ConnectionError` | the Hugging Face Hub could not be reached (offline, network down) |

Example:

```python
>>> from peft_safety.errors import SafetyError
>>> try:
...     raise SafetyError("fraction=2 must be in (0, 1]")
... except ValueError as err:
...     print(type(err).__name__, err)
SafetyError fraction=2 must be in (0, 1]
```
"""

from __future__ import annotations

__all__ = [
    "NETWORK_MODULES",
    "HubUnreachableError",
    "SafetyError",
    "SafetyFileError",
    "SafetyFileNotFoundError",
    "SafetyImportError",
    "SafetyTypeError",
    "is_network_error",
]

#: packages whose exceptions are network failures (their forks, e.g. ``httpx2``, included by prefix)
NETWORK_MODULES = ("httpx", "httpcore", "requests", "urllib3", "aiohttp")


class SafetyError(ValueError):
    """A check of peft-safety refused an input; the message names the value or file and the fix."""


class SafetyTypeError(SafetyError, TypeError):
    """An argument of the wrong type (also a `TypeError`)."""


class SafetyFileError(SafetyError):
    """A file that exists but is damaged or is not what its name says (empty, truncated, not JSON, a device)."""


class SafetyFileNotFoundError(SafetyError, FileNotFoundError):
    """A path that does not exist, or a folder without a file it must hold (also a `FileNotFoundError`)."""


class SafetyImportError(SafetyError, ImportError):
    """An optional dependency is missing; the message gives the ``pip install`` line (also an `ImportError`)."""


class HubUnreachableError(SafetyError, ConnectionError):
    """The Hugging Face Hub could not be reached; nothing was changed there (also a `ConnectionError`)."""


def is_network_error(err: BaseException) -> bool:
    """Whether ``err`` (or an error it was raised from) is a failure to reach a server: a `ConnectionError`, a
    `TimeoutError` (huggingface_hub's ``OfflineModeIsEnabled`` is one) or an exception of an HTTP client package
    (`NETWORK_MODULES`). Argument errors (`ValueError`, `TypeError`) never are, whatever module raised them."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (ConnectionError, TimeoutError)):
            return True
        if not isinstance(current, (ValueError, TypeError)):
            for cls in type(current).__mro__:
                if cls.__module__.split(".")[0].startswith(NETWORK_MODULES):
                    return True
        current = current.__cause__ or current.__context__
    return False
