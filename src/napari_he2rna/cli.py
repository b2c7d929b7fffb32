"""The ``he2rna`` command line: one sub-command per module in :mod:`napari_he2rna.commands`.

Each command module exposes ``register(subparsers)``, which adds its parser and sets ``func`` to a function
taking the parsed arguments and returning an exit code. User-facing errors (:class:`He2rnaError`) are printed
as one sentence on stderr with exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from pathlib import Path

from . import __version__
from .errors import Cancelled, He2rnaError, He2rnaWarning

_PACKAGE_DIR = str(Path(__file__).resolve().parent)

# Order is the order of `he2rna --help`.
COMMAND_MODULES = [
    "info",
    "make_sample",
    "cohort",
    "extract",
    "train",
    "evaluate",
    "predict",
    "spatialize",
    "align",
    "compare",
    "convert",
    "view",
    "make_demo_model",
    "represent",
    "transfer",
    "slide_ex",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="he2rna",
        description="Predict gene expression from H&E slides (HE2RNA) and paint it onto the slide.",
    )
    parser.add_argument("--version", action="version", version=f"napari-he2rna {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f".commands.{name}", __package__)
        except ModuleNotFoundError as exc:  # a command not written yet must not break the others
            if exc.name and exc.name.endswith(f"commands.{name}"):
                continue
            raise
        module.register(sub)
    return parser


def user_warning_line(message, category, filename) -> str | None:
    """The ``he2rna: warning: ...`` line of a warning meant for the user, None for others.

    Meant for the user: :class:`He2rnaWarning` and the user warnings this package raises itself.
    """
    ours = issubclass(category, He2rnaWarning) or (
        issubclass(category, UserWarning) and str(Path(filename).resolve()).startswith(_PACKAGE_DIR)
    )
    return f"he2rna: warning: {message}" if ours else None


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    text = user_warning_line(message, category, filename)
    if text is None:
        _default_show_warning(message, category, filename, lineno, file, line)
    else:
        print(text, file=sys.stderr if file is None else file, flush=True)


_default_show_warning = warnings.showwarning


def main(argv: list[str] | None = None) -> int:
    warnings.showwarning = _show_warning  # the package's warnings are one line each, no source excerpt
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    from .threads import daemon_threads_for_dask

    try:
        # dask's threaded scheduler on daemon threads: Ctrl-C while dask starts a worker never hangs the exit
        with daemon_threads_for_dask():
            return int(args.func(args) or 0)
    except Cancelled:
        print("he2rna: cancelled.", file=sys.stderr)
        return 130
    except He2rnaError as exc:
        print(f"he2rna: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("he2rna: interrupted.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
