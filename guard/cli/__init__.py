"""The ``guard`` command line.

Every sub-command lives in its own module of this package and exposes two functions:
``add_parser(subparsers)`` (declares its flags) and ``run(args) -> int`` (does the work through the
public ``guard`` API and returns the exit code). The argparse namespace never travels into the library.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .._validation import MissingExtraError

#: sub-command name -> module (relative to this package) implementing it
COMMANDS = {
    "info": "info",
    "train": "train",
    "eval": "evaluate",
    "archive": "archive",
    "calibrate": "calibrate",
    "serve": "serve",
    "poison": "poison",
    "scan": "scan",
    "repair": "repair",
    "distance": "distance",
    "harden": "harden",
    "cleanse": "cleanse",
    "sweep": "sweep",
}


class CLIError(Exception):
    """A user error the CLI reports as one line on stderr with exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="guard", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress at INFO level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in COMMANDS.items():
        importlib.import_module(f"{__name__}.{module}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return int(args.func(args) or 0)
    except (CLIError, ValueError, TypeError, FileNotFoundError, MissingExtraError) as exc:
        print(f"guard {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
