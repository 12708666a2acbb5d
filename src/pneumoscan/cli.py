"""The ``pneumoscan`` command: one sub-command per verb, each a thin call into the library.

Each verb lives in ``pneumoscan/commands/<verb>.py`` with ``add_arguments(parser)`` and
``run(args) -> int``. Errors a user can fix are printed as one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from pneumoscan import __version__
from pneumoscan.console import printable
from pneumoscan.errors import PneumoscanError

# verb -> one-line help; the module pneumoscan.commands.<verb> implements it
COMMANDS = {
    "train": "train a model on a folder of X-rays or PneumoniaMNIST",
    "evaluate": "figures of a trained run on a data set, with 95%% intervals",
    "compare": "two runs on the same images: each one's figures and their difference",
    "predict": "predict files, folders or globs with a trained run",
    "explain": "Grad-CAM heat-map overlays for files",
    "eda": "class balance, sample grid and image statistics of a data set",
    "report": "one self-contained HTML report of a run",
    "cv": "patient-grouped K-fold cross-validation; saves the folds as an ensemble run",
    "stack": "a logistic-regression stack over cross-validated runs",
    "export": "export a run to ONNX",
    "serve": "a web service and browser page for a run",
    "models": "list model names and parameter counts",
    "demo": "synthetic data -> train, evaluate, eda in about a minute on a CPU",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's usage errors: one line, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


# Those that keep decoded images (report: its Grad-CAM gallery's; demo: its runs').
DECODING_COMMANDS = ("train", "cv", "eda", "evaluate", "compare", "report", "demo")
CACHE_NOTE = ("Decoded images are kept in $PNEUMOSCAN_CACHE/decoded, by default "
              "~/.cache/pneumoscan/decoded (under $XDG_CACHE_HOME when set), at most "
              "$PNEUMOSCAN_CACHE_GB gigabytes (default 10), the least recently used going first; "
              "deleting the folder is always safe.")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="pneumoscan",
        description="Train, evaluate, explain and serve pediatric chest X-ray pneumonia "
        "classifiers. Research use only: not a medical device.",
    )
    parser.add_argument("--version", action="version", version=f"pneumoscan {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for verb, help_text in COMMANDS.items():
        module = _command_module(verb)
        if module is None:
            continue
        # argparse %-formats help strings but prints descriptions as they are.
        p = sub.add_parser(verb, help=help_text, description=help_text.replace("%%", "%"),
                           formatter_class=_DefaultsShown,
                           epilog=CACHE_NOTE if verb in DECODING_COMMANDS else None)
        module.add_arguments(p)
        p.set_defaults(_run=module.run, _parser=p)
    return parser


class _DefaultsShown(argparse.HelpFormatter):
    """Help that ends each option's text with its default, unless the text already says it
    or there is none to say (a flag, an option whose absence means something else)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unsaid = action.default is None or action.default is False  # nothing, or a flag
        if (action.option_strings and "default" not in text and not unsaid
                and action.default != argparse.SUPPRESS):
            text += " (default: %(default)s)"
        return text


def _command_module(verb: str):
    try:
        return importlib.import_module(f"pneumoscan.commands.{verb}")
    except ModuleNotFoundError as e:
        if e.name == f"pneumoscan.commands.{verb}":
            return None  # a verb this installation does not ship
        raise


def main(argv: Sequence[str] | None = None) -> int:
    # A file name the console cannot encode (a Windows code page, a log redirected there), or
    # one that is not UTF-8 (Linux names are bytes, which reach Python as surrogates), is
    # printed escaped rather than ending the command mid-table with a traceback.
    from pneumoscan.console import ESCAPE_UNDECODABLE

    for stream in (sys.stdout, sys.stderr):
        if callable(getattr(stream, "reconfigure", None)):
            stream.reconfigure(errors=ESCAPE_UNDECODABLE)
    try:
        try:
            return _main(argv)
        finally:
            sys.stdout.flush()  # here, not at exit, so that a closed pipe is caught below
    except BrokenPipeError:
        # Whoever read the output stopped early (`pneumoscan models | head`): nothing is wrong
        # here. Point stdout at /dev/null so that Python's exit flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _under_torchrun() -> bool:
    return os.environ.get("WORLD_SIZE", "1").strip() not in ("", "0", "1")


def _peer_gone(e: RuntimeError) -> bool:
    distributed = sys.modules.get("pneumoscan.distributed")  # imported by whatever trained
    return distributed is not None and distributed.is_peer_gone(e)


def _has_checkpoint(out: str | None) -> bool:
    """Whether an interrupted train left something for --resume (not when stopped before its
    first checkpoint, in its start-up or first epoch)."""
    from pneumoscan.run_folder import has_checkpoint

    return out is not None and has_checkpoint(Path(out))


def _file_in_the_way(e: OSError) -> str | None:
    """The file that stands where a folder was to be made or entered ("File exists", "Not a
    directory"), or None."""
    if not isinstance(e, (FileExistsError, NotADirectoryError)) or not e.filename:
        return None
    path = Path(os.fsdecode(e.filename))
    for candidate in (*reversed(path.parents), path):  # the outermost first
        if os.path.lexists(candidate) and not os.path.isdir(candidate):
            return str(candidate)
    return None


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras:  # said by the command's own parser, so the line names the command
        getattr(args, "_parser", parser).error(f"unrecognized arguments: {' '.join(extras)}")
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        if args.command != "train" and _under_torchrun():
            raise PneumoscanError(
                f"{args.command} runs as one process: start it without torchrun (train alone "
                f"spreads over several), or unset WORLD_SIZE={os.environ['WORLD_SIZE']} if "
                "something else set it")
        return int(args._run(args) or 0)
    except PneumoscanError as e:
        print(printable(f"pneumoscan {args.command}: error: {e}"), file=sys.stderr)
        return 2
    except BrokenPipeError:
        raise  # the reader went away: main() ends quietly
    except OSError as e:  # the system refused: a folder that cannot be written, a full disk
        where, reason = (f"{e.filename}: " if e.filename else ""), e.strerror or e
        if blocker := _file_in_the_way(e):
            where, reason = f"{blocker}: ", "exists and is not a folder"
        print(printable(f"pneumoscan {args.command}: error: {where}{reason}"), file=sys.stderr)
        return 2
    except RuntimeError as e:
        if not (_under_torchrun() and _peer_gone(e)):
            raise
        first = (str(e).strip().splitlines() or [""])[0][:160]
        print(printable(f"pneumoscan {args.command}: error: another process of this torchrun "
                        f"stopped or could not be reached ({first}); its own output says why"),
              file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        hint = ("; the same command with --resume continues from the last checkpoint"
                if args.command == "train" and _has_checkpoint(getattr(args, "out", None))
                else "")
        # Ctrl-C reaches every torchrun process at once: one line, from rank 0. (An error is
        # still printed by each process that meets it: it may be that process's alone.)
        what, status = ("terminated", 143) if isinstance(e, Terminated) else ("interrupted", 130)
        if os.environ.get("RANK", "0") == "0":
            print(f"pneumoscan {args.command}: {what}{hint}", file=sys.stderr)
        return status


class Terminated(KeyboardInterrupt):
    """SIGTERM, as a job scheduler sends it to stop a command: ended as Ctrl-C ends it (files
    whole, decode workers stopped, --resume offered), with the status 143 it asks for."""


def _terminate(_signum, _frame) -> None:
    # A second SIGTERM, while this one's clean-up runs, ends the process at once.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise Terminated


def console_main() -> None:
    """The ``pneumoscan`` executable and ``python -m pneumoscan``: run, then end the process.

    Everything is written and flushed by now. Python's exit would still sweep every object for
    reference cycles, which after torch, timm and a run is over a second of a one-image
    ``predict``; frozen objects are left to the operating system, which takes the memory back
    anyway. Not in ``main``: a caller in a long-lived process still needs its collector.
    """
    # Not under torchrun: a process waiting in a collective for another runs no Python until
    # torch's timeout, so a Python handler would keep it from stopping; there SIGTERM kills.
    if not _under_torchrun():
        signal.signal(signal.SIGTERM, _terminate)
    status = main()
    gc.freeze()
    sys.exit(status)


if __name__ == "__main__":
    console_main()
