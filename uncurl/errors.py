"""Errors a user can act on, each with the exit code the CLI returns for it.

Exit codes (documented in README):
  0  success
  1  unexpected internal error (a bug: please report it)
  2  bad input: unknown family or task, --keep out of range, missing data, an --out that is
     not uncurl's to replace or is held by another run, a full or read-only disk, ...
  3  the written checkpoint failed its own checks (reload, keys, shapes, NaN/Inf, forward)
  4  gate: the task metric dropped by more than --max-drop (the checkpoint and report are written)
  5  coverage gate (uncurl monitor --min-coverage): the traffic's routing mass on experts the pruned
     model kept or merged is below the bound (the monitor's output is written)
  128 + N  stopped by signal N while holding --out: 143 SIGTERM, 129 SIGHUP (the unfinished output
     removed, --out as it was; SIGINT stays KeyboardInterrupt, which cleans up the same way)
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_BAD_INPUT = 2
EXIT_CHECK_FAILED = 3
EXIT_GATE = 4
EXIT_COVERAGE = 5


class Terminated(SystemExit):
    """SIGTERM or SIGHUP arrived during a run (``output.claim``): raised in the main thread so every
    cleanup runs, then an exit with 128 + the signal number. A SystemExit, so ``except Exception``
    does not swallow it, and an uncaught one ends the process quietly with that code."""

    def __init__(self, signum: int):
        import signal

        super().__init__(128 + signum)
        self.exit_code = 128 + signum
        self.message = (f"stopped by {signal.Signals(signum).name}; the unfinished output was removed and "
                        f"--out is as it was")

    def __str__(self) -> str:
        return self.message


class UncurlError(Exception):
    """A problem with the user's input or environment; the message says what to change."""

    exit_code = EXIT_BAD_INPUT


class CheckpointCheckError(UncurlError):
    """The pruned checkpoint did not pass the checks run before reporting success."""

    exit_code = EXIT_CHECK_FAILED
