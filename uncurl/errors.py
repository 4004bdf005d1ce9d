"""Errors a user can act on, each with the exit code the CLI returns for it.

Exit codes (documented in README):
  0  success
  1  unexpected internal error (a bug: please report it)
  2  bad input: unknown family or task, --keep out of range, missing data, occupied --out, ...
  3  the written checkpoint failed its own checks (reload, keys, shapes, NaN/Inf, forward)
  4  gate: the task metric dropped by more than --max-drop (the checkpoint and report are written)
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_BAD_INPUT = 2
EXIT_CHECK_FAILED = 3
EXIT_GATE = 4


class UncurlError(Exception):
    """A problem with the user's input or environment; the message says what to change."""

    exit_code = EXIT_BAD_INPUT


class CheckpointCheckError(UncurlError):
    """The pruned checkpoint did not pass the checks run before reporting success."""

    exit_code = EXIT_CHECK_FAILED
