"""Entry point of the ``peft-safety`` command.

Each subcommand lives in its own module ``peft_safety.cli.<name>_cmd``, which imports nothing heavy at module level
and defines:

* ``HELP``: one line shown in ``peft-safety --help``;
* ``add_arguments(parser: argparse.ArgumentParser) -> None``, or, for a command that brings its own parser (``train``
  uses TRL's ``TrlParser``), ``OWN_PARSER = True`` with ``parse(argv, prog)`` and ``help_text(prog)``;
* ``run(args) -> int``: calls one library function, prints, returns the exit code;
* optionally ``check(args) -> None``: argument checks that need no model (paths, names, ranges), run before ``run``.

Speed: ``peft-safety --help`` imports no subcommand module, and ``peft-safety CMD --help`` imports only that module, so
neither imports torch, peft or transformers. The two commands whose flags come from heavy dataclasses (``train``:
every TRL SFT flag; ``demo``: the main-job config) set ``SLOW_HELP = True``: their help text is rendered once and
cached under ``$PEFT_SAFETY_CACHE/cli-help`` (default ``~/.cache/peft_safety``), keyed by the installed versions and the
package's source files, so it is rebuilt whenever either changes.

Errors: only errors that mean "this input is wrong" are printed as one line on stderr with exit code 2: the
`peft_safety.errors.SafetyError` family (every check peft-safety makes on purpose raises one, naming the value or
file and the fix), huggingface_hub's typed errors (an unknown repo, a missing file, an invalid repo id), network
failures (with the Hub repos and files the command was fetching), and, while the command line is being parsed, the
parser's own errors (argparse exits with code 2 itself; TRL's and transformers' parsers raise ``ValueError`` for a
bad flag combination or YAML key). Anything else, a ``ValueError`` or ``KeyError`` from deep inside training included,
is a failure of the program, not a verdict on the input: it propagates with its traceback (exit code 1), so that it
can be reported and fixed. ``PEFT_SAFETY_DEBUG=1`` shows the traceback of one-line errors too.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .._version import __version__

#: subcommand name -> module name inside ``peft_safety.cli``
SUBCOMMANDS: dict[str, str] = {
    "inspect": "inspect_cmd",
    "diff": "diff_cmd",
    "select": "select_cmd",
    "score": "score_cmd",
    "compare": "compare_cmd",
    "train": "train_cmd",
    "repair": "repair_cmd",
    "eval": "eval_cmd",
    "push": "push_cmd",
    "fetch": "fetch_cmd",
    "demo": "demo_cmd",
}

_SHORT_HELP: dict[str, str] = {
    "inspect": "show a mask's summary: counts per layer and module",
    "diff": "compare two masks: IoU globally and per module",
    "select": "turn saved scores into a mask",
    "score": "score a model's parameters on a calibration set and save a mask",
    "compare": "overlap and stability report of several masks",
    "train": "TRL's SFT script with a mask: SET (train only the mask) or SPA (freeze it)",
    "repair": "SET as a repair after fine-tuning: a SAFETY adapter for the fine-tuned model, on a mask of the aligned one",
    "eval": "refusal, over-refusal and utility evaluation of a model or adapter",
    "push": "upload a mask folder to the Hugging Face Hub",
    "fetch": "fetch the embedded default model and data sets into the local cache",
    "demo": "the main job: score, SET, SPA and evaluation on the embedded default model",
}

#: errors a command-line parser raises for a bad flag, a bad combination of flags or a bad --config file
_PARSE_ERRORS = (ValueError, TypeError, OSError)

#: packages whose versions decide a cached help text
_HELP_PACKAGES = ("trl", "transformers", "peft", "accelerate", "torch")


def _load(name: str):
    return importlib.import_module(f"peft_safety.cli.{SUBCOMMANDS[name]}")


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="peft-safety",
        description="Safety-critical parameters for PEFT and TRL. 'peft-safety COMMAND --help' shows a command's flags.",
    )
    parser.add_argument("--version", action="version", version=f"peft-safety {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        sub.add_parser(name, help=_SHORT_HELP[name], add_help=False)
    return parser


def command_parser(name: str, module=None) -> argparse.ArgumentParser:
    """The argparse parser of subcommand ``name`` (not for ``OWN_PARSER`` commands)."""
    module = module or _load(name)
    parser = argparse.ArgumentParser(
        prog=f"peft-safety {name}", description=getattr(module, "HELP", _SHORT_HELP[name])
    )
    module.add_arguments(parser)
    return parser


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The top-level parser; with ``argv`` naming a subcommand, that subcommand's flags are filled in (as the old API
    did). Kept for scripts; `main` parses subcommands itself."""
    parser = _top_parser()
    wanted = next((a for a in (argv or ()) if not a.startswith("-")), None)
    if wanted in SUBCOMMANDS and not getattr(_load(wanted), "OWN_PARSER", False):
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        _load(wanted).add_arguments(sub.choices[wanted])
    return parser


# ---------------------------------------------------------------------------------------------------- help cache
def _cache_root() -> Path:
    env = os.environ.get("PEFT_SAFETY_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "peft_safety"


def _help_key(name: str) -> str:
    """Versions of the packages the help is built from, and size/mtime of every source file of peft_safety."""
    from importlib import metadata

    digest = hashlib.sha256(f"{name}|{__version__}|{sys.version_info[:2]}".encode())
    for package in _HELP_PACKAGES:
        try:
            digest.update(f"|{package}={metadata.version(package)}".encode())
        except metadata.PackageNotFoundError:
            digest.update(f"|{package}=-".encode())
    root = Path(__file__).resolve().parents[1]
    for path in sorted(root.rglob("*.py")):
        st = path.stat()
        digest.update(f"|{path.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def help_text(name: str, module=None) -> str:
    """The ``--help`` text of subcommand ``name``, from the cache when the command's help is slow to build."""
    module = module or _load(name)
    prog = f"peft-safety {name}"

    def build() -> str:
        if getattr(module, "OWN_PARSER", False):
            return module.help_text(prog)
        return command_parser(name, module).format_help()

    if not getattr(module, "SLOW_HELP", False):
        return build()
    path = _help_path(name)
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        pass
    text = build()
    _write_help(path, text)
    return text


def _help_path(name: str) -> Path:
    return _cache_root() / "cli-help" / f"{name}-{_help_key(name)}.txt"


def _write_help(path: Path, text: str) -> None:
    try:
        from .._io import atomic_write_text

        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text)
    except OSError:
        pass  # a read-only home only costs speed


def _warm_help_cache(name: str, module) -> None:
    """After a run has imported the heavy modules anyway, cache the help text if it is missing (milliseconds)."""
    if getattr(module, "SLOW_HELP", False):
        path = _help_path(name)
        if not path.is_file():
            _write_help(path, module.help_text(f"peft-safety {name}"))


# ---------------------------------------------------------------------------------------------------- errors
def _is_hub_error(err: BaseException) -> bool:
    """One of huggingface_hub's typed errors (``RepositoryNotFoundError``, ``EntryNotFoundError``,
    ``HFValidationError``, ``HfHubHTTPError``, ...): what the Hub said about the input, not a bug."""
    return any(cls.__module__.split(".")[0] == "huggingface_hub" for cls in type(err).__mro__[:-2])


def is_user_error(err: BaseException) -> bool:
    """Whether ``err`` is printed as one line (see the module docstring) rather than with its traceback."""
    from ..errors import SafetyError, is_network_error

    return isinstance(err, SafetyError) or _is_hub_error(err) or is_network_error(err)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 600 else text[:597] + "..."


def error_line(command: str, err: BaseException) -> str:
    """The single line printed for ``err``: what failed and how to fix it."""
    from ..errors import SafetyError, is_network_error

    if is_network_error(err) and not isinstance(err, SafetyError):
        from ._common import hub_context

        where = hub_context()
        return (
            f"peft-safety {command}: error: Hugging Face Hub request failed{where} "
            f"({type(err).__name__}: {_one_line(err)}). Check the network connection and HF_TOKEN, or work offline "
            "with local folders (HF_HUB_OFFLINE=1 uses only the local cache)."
        )
    return f"peft-safety {command}: error: {_one_line(err)}"


def _debug() -> bool:
    return os.environ.get("PEFT_SAFETY_DEBUG", "") not in ("", "0")


# ---------------------------------------------------------------------------------------------------- main
def _escape_unencodable_output() -> None:
    """Text the terminal cannot encode (a mask's provenance may hold any string) is printed escaped (``\\udcff``,
    ``\\xe9``), not turned into a ``UnicodeEncodeError`` after the command has done its work."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            with contextlib.suppress(ValueError, OSError):  # a detached or closed stream
                reconfigure(errors="backslashreplace")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _escape_unencodable_output()
    if not argv or argv[0] not in SUBCOMMANDS:
        parser = _top_parser()
        if not argv:
            parser.print_help()
            return 2
        parser.parse_args(argv)  # --help, --version, or "invalid choice" (exit code 2), all by argparse
        parser.print_help()
        return 2
    name, rest = argv[0], argv[1:]
    module = _load(name)
    if "-h" in rest or "--help" in rest:
        print(help_text(name, module), end="")
        return 0
    from ._common import reset_hub_context

    reset_hub_context()
    try:
        if getattr(module, "OWN_PARSER", False):
            args = module.parse(rest, f"peft-safety {name}")
            _warm_help_cache(name, module)
        else:
            args = command_parser(name, module).parse_args(rest)  # usage errors: exit code 2, by argparse
    except _PARSE_ERRORS as err:  # a bad flag, flag combination or --config file, found by the parser
        if _debug():
            raise
        print(error_line(name, err), file=sys.stderr)
        return 2
    try:
        from ._checks import CHECKS

        check = getattr(module, "check", None) or CHECKS.get(name)
        if check is not None:
            check(args)
        return int(module.run(args) or 0)
    except Exception as err:
        if _debug() or not is_user_error(err):
            raise  # a failure of the program: its traceback is what a bug report needs
        print(error_line(name, err), file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
