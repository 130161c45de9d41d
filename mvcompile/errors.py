"""The one exception type the CLI turns into a clean message and a non-zero exit."""


class UserError(Exception):
    """Bad input from the user: a wrong path, a mismatched checkpoint, an invalid size.

    The message is a complete paragraph meant for the person at the terminal; the CLI prints it
    without a traceback and exits with status 1.
    """
