"""The command-line tools' one error path (`pafm.train`, `pafm.eval`, `pafm.sample`, `pafm.prep`, `pafm.export`,
`pafm.models.interop`): every user error is one line on stderr and exit code 2, printed once under torchrun, and an
error seen by one rank stops them all (`all_ranks_agree`)."""
from __future__ import annotations

import argparse
import re
import sys

from pafm.distributed import SharedError, agree, launched, one_line, peer_failure, print_once

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


def exit_code(err: BaseException) -> int | None:
    """The exit code of a tool stopped by `err`: the code its class declares (`exit_code = 3`), 2 for a user error
    (USER_ERRORS), 1 for a collective failed because a peer rank went away; None for anything else (a bug, whose
    traceback is its report)."""
    declared = getattr(type(err), "exit_code", None)
    if declared is not None:
        return declared
    if isinstance(err, USER_ERRORS):
        return 2
    if peer_failure(err):
        return 1
    return None


def report_error(err: BaseException, rank: int | None = None, label: str = "error", after_os_error: str = "") -> int:
    """Print `err` as one line on stderr and return its exit code (`exit_code`); an error that is no user's is
    raised again, its traceback being its report.  Every tool's `main` ends in `except Exception as err: return
    report_error(err)`.

    Who prints: a SharedError (every rank raised it together) on rank 0 alone; an OSError or a peer's failure on
    every rank that met it (each its own file, disk or collective), naming the rank where `rank` is given and
    followed by `after_os_error`; anything else once per launch (`print_once`), by the first rank to report it."""
    code = exit_code(err)
    if code is None:
        raise err
    where = "" if rank is None else f" (rank {rank})"
    if isinstance(err, SharedError):
        if launched()[0] == 0:
            print(f"{label}: {error_text(err)}", file=sys.stderr, flush=True)
    elif isinstance(err, OSError):
        print(f"{label}{where}: {error_text(err)}{after_os_error}", file=sys.stderr, flush=True)
    elif code == 1:
        first = error_text(str(err).splitlines()[0]) if str(err) else type(err).__name__
        print(f"{label}{where}: a collective failed, most likely because another rank stopped: {first}",
              file=sys.stderr, flush=True)
    else:
        print_once(f"{label}: {error_text(err)}")
    return code


def all_ranks_agree(fn, *args):
    """`fn(*args)` on every rank; a user error on any rank is raised on every rank (the lowest rank's message, as a
    SharedError), so rank 0 reports it even where it alone did not see it.  In a single process it is raised as is."""
    return agree(fn, *args, errors=USER_ERRORS)
