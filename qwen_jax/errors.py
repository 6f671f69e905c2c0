"""The base class of errors caused by bad input (a file, a config, an argument), which command lines report as one
line and a non-zero exit, and the argument parser they use."""

import argparse
import sys
from typing import NoReturn


class InputError(ValueError):
    """Bad input, reported to the user as is."""


class OneLineArgumentParser(argparse.ArgumentParser):
    """An argument parser whose errors are one `error: ...` line and exit code 2 (no usage block)."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)
