"""The one exception type the CLI turns into a clean message and a non-zero exit."""


class UserError(Exception):
    """Bad input from the user: a wrong path, a mismatched checkpoint, an invalid size.

    The message is a complete paragraph meant for the person at the terminal; the CLI prints it
    without a traceback and exits with status 1.
    """


def first_line(err: BaseException) -> str:
    """The first line of ``err``'s message, or its type name when the message is empty (as
    for torch.load on an empty file)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
