"""The error handling shared by the command-line tools (`pafm.sample`, `pafm.eval`, `pafm.prep`): every user error
is one line on stderr and exit code 2, printed once under torchrun, and an error seen by one rank stops them all."""
from __future__ import annotations

import argparse
import os
import re
import sys

from pafm.distributed import SharedError, agree, one_line  # noqa: F401 - the tools import them from here

# ConfigError, DataError, ExportError and MetricError are ValueErrors; OSError covers missing or unwritable files.
USER_ERRORS = (ValueError, OSError)


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line on stderr and exit code 2, like every other error of the tools."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def checked(convert, allowed):
    """An argparse type: `convert(text)`, refused unless the config rule `allowed` (pafm.config.Allowed) allows it."""

    def parse(text: str):
        value = convert(text)
        if not allowed.test(value):
            raise argparse.ArgumentTypeError(f"must be {allowed.text}, got {text}")
        return value

    parse.__name__ = convert.__name__  # argparse names the type in "invalid float value: 'x'"
    return parse


def parse_args(parser: argparse.ArgumentParser, argv):
    """(namespace, None), or (None, exit code) where argparse stopped (an error: 2, --help: 0)."""
    try:
        return parser.parse_args(argv), None
    except SystemExit as stop:
        return None, stop.code if isinstance(stop.code, int) else 2


# Terminal escape sequences (colours, cursor moves) and other control characters.
_CONTROL = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-_]?|[\x00-\x1f\x7f]")


def error_text(err) -> str:
    """`err` as one line of plain text: escape codes that a library's message or a pasted value may carry are
    removed, so that a log file holds the words alone."""
    return _CONTROL.sub("", one_line(err))


def launched_as_rank0() -> bool:
    """Whether this process is rank 0 (or alone) by the launcher's environment, before any process group exists."""
    return int(os.environ.get("RANK", "0")) == 0


def report_error(err) -> int:
    """Print `err` as one line on stderr (a SharedError on rank 0 only); returns the exit code 2."""
    if not isinstance(err, SharedError) or launched_as_rank0():
        print(f"error: {error_text(err)}", file=sys.stderr, flush=True)
    return 2


def all_ranks_agree(fn, *args):
    """`fn(*args)` on every rank; a user error on any rank is raised on every rank (the lowest rank's message, as a
    SharedError), so rank 0 reports it even where it alone did not see it.  In a single process it is raised as is."""
    return agree(fn, *args, errors=USER_ERRORS)
