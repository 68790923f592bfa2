"""Command line: `python -m adadiff_export COMMAND`. This package is the only place that registers commands,
parses arguments and prints; each command (or group) is one module here, calling the library.

Errors that users can fix (a bad checkpoint, missing data, a bad flag, a damaged engines folder) print one
line on stderr and exit with status 2; nothing is half-written.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from . import (bench, build, calibrate, classifier, convert, demo, evaluate, loadtest, profile, register_plans, sample,
               serve, tradeoff, train, verify)

# Every command, in the order `--help` lists them; each module has `add_parser(sub)`.
COMMANDS = (train, classifier, sample, evaluate, convert, build, verify, register_plans, profile, calibrate, tradeoff,
            bench, demo, serve, loadtest)

# What a user can fix besides our own UserError subclasses: bad values, and files that are missing, in the way
# or not writable.
USER_OS_ERRORS = (FileExistsError, FileNotFoundError, PermissionError, IsADirectoryError)


def build_parser() -> argparse.ArgumentParser:
    """The parser of `python -m adadiff_export` with every command registered."""
    parser = argparse.ArgumentParser(
        prog="python -m adadiff_export",
        description="AdaDiff early-exit diffusion: train, sample, evaluate, and export to per-layer engines.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run one command; returns the exit status (0, 2 for an error the user can fix, 130 when interrupted)."""
    from ..errors import UserError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (UserError, ValueError, *USER_OS_ERRORS) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
