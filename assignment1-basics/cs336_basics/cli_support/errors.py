"""The error boundary of every cs336 command: expected failures become one line and exit code 2."""

import argparse
import gzip
import json
import sys
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn


class UserError(ValueError):
    """A problem with what the user asked for or gave us (a value, a file): shown as one line, exit 2.

    A `ValueError` subclass, so callers that catch `ValueError` keep working.
    """


# Failures that come from the user's input or environment, not from a bug in our code.
EXPECTED: tuple[type[BaseException], ...] = (
    UserError,
    FileNotFoundError,
    IsADirectoryError,
    NotADirectoryError,
    FileExistsError,
    PermissionError,
    gzip.BadGzipFile,
    zlib.error,
    json.JSONDecodeError,
    UnicodeDecodeError,
)


def describe(error: BaseException) -> str:
    """One line: the message, plus the file an OSError names."""
    if isinstance(error, OSError) and error.filename is not None and not isinstance(error, UserError):
        reason = error.strerror or type(error).__name__
        return f"{reason}: {error.filename}"
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


@contextmanager
def reading(path: Any) -> Iterator[None]:
    """Wraps the reading of one input so a damaged file (truncated gzip, not gzip, bad UTF-8 or JSON, a folder
    where a file belongs) surfaces as a `UserError` naming it."""
    try:
        yield
    except UserError:
        raise
    except (EOFError, gzip.BadGzipFile, zlib.error, json.JSONDecodeError, UnicodeDecodeError,
            IsADirectoryError, NotADirectoryError) as e:
        raise UserError(f"cannot read {path}: {describe(e)}") from e


def run_command(prog: str, func: Callable[[], Any], expected: tuple[type[BaseException], ...] = ()) -> int:
    """Runs `func`; an expected failure prints `<prog>: error: <what>` to stderr and returns 2, Ctrl-C that
    reaches here returns 130 without a traceback. Anything else propagates (a bug keeps its traceback)."""
    try:
        func()
    except EXPECTED + expected as e:
        if not getattr(e, "reported_elsewhere", False):  # e.g. by rank 0 of a torchrun launch
            print(f"{prog}: error: {describe(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return 0


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line (`<prog> <cmd>: error: ...`, exit 2) like every other failure, not the
    usage block; the usage stays one `--help` away. Under torchrun rank 0 alone reports."""

    def error(self, message: str) -> NoReturn:
        from cs336_basics.training.distributed import env_rank

        if env_rank() != 0:  # every rank parses the same flags
            self.exit(2)
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")
