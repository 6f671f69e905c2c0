"""The base class of errors caused by bad input (a file, a config, an argument), which command lines report as one
line and a non-zero exit."""


class InputError(ValueError):
    """Bad input, reported to the user as is."""
