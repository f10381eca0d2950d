"""The one exception type a user sees: its message names the problem and the fix."""


class AlignError(RuntimeError):
    """A problem the user can fix (bad input, missing file, diverged run); printed without a traceback."""
