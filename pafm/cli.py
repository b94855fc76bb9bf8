"""The error handling shared by the command-line tools (`pafm.sample`, `pafm.eval`, `pafm.prep`): every user error
is one line on stderr and exit code 2, printed once under torchrun, and an error seen by one rank stops them all."""
from __future__ import annotations

import argparse
import os
import sys

import torch.distributed as dist

# ConfigError, DataError, ExportError and MetricError are ValueErrors; OSError covers missing or unwritable files.
USER_ERRORS = (ValueError, OSError)


class SharedError(ValueError):
    """A user error that every rank raises together: rank 0 alone reports it, so torchrun shows it once."""


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line on stderr and exit code 2, like every other error of the tools."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def parse_args(parser: argparse.ArgumentParser, argv):
    """(namespace, None), or (None, exit code) where argparse stopped (an error: 2, --help: 0)."""
    try:
        return parser.parse_args(argv), None
    except SystemExit as stop:
        return None, stop.code if isinstance(stop.code, int) else 2


def one_line(err) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 1000 else text[:997] + "..."


def report_error(err) -> int:
    """Print `err` as one line on stderr (a SharedError on rank 0 only); returns the exit code 2."""
    if not isinstance(err, SharedError) or int(os.environ.get("RANK", "0")) == 0:
        print(f"error: {one_line(err)}", file=sys.stderr, flush=True)
    return 2


def all_ranks_agree(fn, *args):
    """`fn(*args)` on every rank; when a user error occurs on any rank, every rank raises it (the lowest rank's
    message, as a SharedError), so rank 0 reports it even where it alone did not see it.  Without a process group
    the error is re-raised as is."""
    result, error = None, None
    try:
        result = fn(*args)
    except USER_ERRORS as err:
        error = err
    if dist.is_initialized() and dist.get_world_size() > 1:
        messages = [None] * dist.get_world_size()
        dist.all_gather_object(messages, None if error is None else one_line(error))
        first = next((m for m in messages if m is not None), None)
        if first is not None:
            raise SharedError(first) from None
    elif error is not None:
        raise error
    return result
