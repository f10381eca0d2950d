"""The exception types a user sees (their message names the problem and the fix) and `align`'s exit codes."""

EXIT_BAD_INPUT = 2  # an AlignError or ConfigError: fix the input and rerun
EXIT_LABELING = 3  # not a failure: a label stage (judge: people) waits on labelers; rerun to continue
EXIT_INTERRUPTED = 130  # Ctrl-C: rerun to resume


class AlignError(RuntimeError):
    """A problem the user can fix (bad input, missing file, diverged run); printed without a traceback."""


class LabelingPending(AlignError):
    """A round labeled by people is not complete yet: the run stops (exit code EXIT_LABELING) with the
    run directory resumable; the message says how far the round is and how to serve it."""
