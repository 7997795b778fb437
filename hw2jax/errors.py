"""The project's own errors: bad input or a damaged file, each with a message that names the fix.

The command line prints a :class:`Hw2jaxError` as one line (exit code 2); any other exception is
a bug and keeps its traceback. Each class also derives from the built-in error it refines, so
``except ValueError`` still catches an :class:`InputError`.
"""


class Hw2jaxError(Exception):
    """Expected failures whose message says what to do."""


class InputError(Hw2jaxError, ValueError):
    """A value that cannot be used: a config value, an argument, a shape, a file's contents."""


class InputTypeError(Hw2jaxError, TypeError):
    """An argument of the wrong type."""


class MissingFileError(Hw2jaxError, FileNotFoundError):
    """A file or folder that should be there is not."""
