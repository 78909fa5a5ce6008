"""The error a user can fix: bad input (data, files, arguments, plugins), not a bug in this code.

The command line prints these as one line, without a traceback (`--verbose` shows it); any other
exception keeps its traceback. It is a ValueError, so callers that catch ValueError still do.
"""


class InputError(ValueError):
    """Bad input; the message names the thing and what to do."""
