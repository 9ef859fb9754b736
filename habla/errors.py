"""The one exception type users see: a one-line message, printed by the CLI without a traceback."""


class HablaError(Exception):
    """A problem with the user's input or environment, explained in one line (exit code 2)."""
