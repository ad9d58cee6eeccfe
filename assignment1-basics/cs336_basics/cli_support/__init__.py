"""What every cs336 command shares so that it keeps the user's files safe, rejects bad values and stops
cleanly: one mechanism per concern, used by all five packages' CLIs.

- `errors`: `UserError`, `run_command` and `OneLineParser`, the error boundary that turns expected failures
  (and bad flags) into one line (`<prog>: error: ...`, exit 2) while a real bug still shows its traceback.
- `atomic`: outputs written beside their destination and renamed into place only on success (`save_figure`
  for matplotlib figures, closed afterwards); outputs that would overwrite inputs refused; run folders that
  need `--resume` or `--overwrite`.
- `ranges`: declared valid ranges on config dataclass fields, checked at construction, errors naming the flag.
- `interrupt`: SIGINT/SIGTERM turned into a request that a loop honours between steps (checkpoint, exit
  130/143).
- `jsonl`: JSON Lines reading that tolerates the half-written last line of a killed run.
"""

from cs336_basics.cli_support.atomic import (
    atomic_path,
    atomic_write,
    check_output,
    prepare_run_dir,
    refuse_overwriting_inputs,
    save_figure,
)
from cs336_basics.cli_support.errors import OneLineParser, UserError, reading, run_command
from cs336_basics.cli_support.interrupt import StopRequest
from cs336_basics.cli_support.jsonl import read_jsonl_tolerant
from cs336_basics.cli_support.ranges import bounded, check_ranges, range_help

__all__ = [
    "OneLineParser",
    "StopRequest",
    "UserError",
    "atomic_path",
    "atomic_write",
    "bounded",
    "check_output",
    "check_ranges",
    "prepare_run_dir",
    "range_help",
    "read_jsonl_tolerant",
    "reading",
    "refuse_overwriting_inputs",
    "run_command",
    "save_figure",
]
